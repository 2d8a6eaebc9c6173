"""Spatial cost aggregation: a pair of Swin blocks (window attention, then shifted-window attention) run on every
class slice of the embedded cost volume, with appearance guidance concatenated to the query/key inputs only.

As in CAT-Seg there is no relative-position bias; the shifted-window mask uses -100 for cross-region pairs.
"""

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """`(N, H, W, C)` -> `(N, H/window * W/window, window*window, C)`."""
    n, h, w, c = x.shape
    x = x.view(n, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, -1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """`(N, H/window * W/window, window*window, C)` -> `(N, H, W, C)`."""
    n, c = windows.shape[0], windows.shape[-1]
    x = windows.view(n, height // window, width // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, height, width, c)


def shifted_window_mask(grid: int, window: int, shift: int, masked_value: float) -> torch.Tensor:
    """Additive mask `(num_windows, window*window, window*window)` that keeps shifted windows from mixing regions
    that are not adjacent in the unshifted map."""
    region = torch.zeros(1, grid, grid, 1)
    count = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, rows, cols, :] = count
            count += 1
    ids = window_partition(region, window)[0, ..., 0]
    mask = ids.unsqueeze(1) - ids.unsqueeze(2)
    return mask.masked_fill(mask != 0, masked_value).masked_fill(mask == 0, 0.0)


class DiSaWindowAttention(nn.Module):
    """Multi-head window self-attention whose queries and keys also see the guidance features.

    Input `(N, windows, tokens, hidden_dim + guidance_dim)`; values use the first `hidden_dim` channels only.
    """

    def __init__(self, hidden_dim: int, guidance_dim: int, num_heads: int, use_sdpa: bool = True):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.use_sdpa = use_sdpa
        self.q = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.k = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.v = nn.Linear(hidden_dim, hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x (`(N, windows, tokens, hidden_dim + guidance_dim)`).
            bias (broadcastable to `(N, windows, heads, tokens, tokens)`, optional): additive attention bias.
        """
        q = self._split(self.q(x))
        k = self._split(self.k(x))
        v = self._split(self.v(x[..., : self.hidden_dim]))
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            # Explicit matmuls, so that torch.utils.flop_counter counts the attention on every device.
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            if bias is not None:
                scores = scores + bias
            out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(-3, -2).flatten(-2))


class DiSaSwinMLP(nn.Module):
    def __init__(self, hidden_dim: int, mlp_ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim, hidden_dim * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim * mlp_ratio, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiSaSwinBlock(nn.Module):
    """One (shifted) window-attention block over `(N, grid*grid, hidden_dim)` token maps."""

    def __init__(self, config, shift: int):
        super().__init__()
        grid, window = config.grid_size, config.window_size
        self.grid, self.window = grid, window
        # A window covering the whole map cannot be shifted (CAT-Seg/Swin rule).
        self.shift = shift if grid > window else 0
        use_sdpa = getattr(config, "_attn_implementation", None) != "eager"
        self.norm1 = nn.LayerNorm(config.hidden_dim)
        self.attn = DiSaWindowAttention(
            config.hidden_dim, config.appearance_guidance_dim, config.num_attention_heads, use_sdpa
        )
        self.norm2 = nn.LayerNorm(config.hidden_dim)
        self.mlp = DiSaSwinMLP(config.hidden_dim, config.mlp_ratio)
        self.register_buffer("attn_mask", self.build_attention_mask(), persistent=False)

    def build_attention_mask(self) -> torch.Tensor | None:
        return shifted_window_mask(self.grid, self.window, self.shift, -100.0) if self.shift else None

    def forward(
        self, x: torch.Tensor, guidance: torch.Tensor, group_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            x (`(N, grid*grid, hidden_dim)`): one cost slice per row (N = batch * classes).
            guidance (`(N, grid*grid, guidance_dim)`): normalised appearance guidance.
            group_ids (`(N, grid*grid)` long, optional): tokens attend only to tokens of the same group
                (used by SDM's routed foreground/background branches).

        Returns:
            `(N, grid*grid, hidden_dim)`.
        """
        n, length, dim = x.shape
        grid, window, shift = self.grid, self.window, self.shift
        shortcut = x
        h = torch.cat([self.norm1(x), guidance], dim=-1).view(n, grid, grid, -1)
        if group_ids is not None:
            group_ids = group_ids.view(n, grid, grid, 1).to(h.dtype)
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
            if group_ids is not None:
                group_ids = torch.roll(group_ids, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(h, window)
        bias = None
        if self.attn_mask is not None:
            bias = self.attn_mask.to(h.dtype).unsqueeze(1)
        if group_ids is not None:
            ids = window_partition(group_ids, window)[..., 0]
            blocked = (ids.unsqueeze(-1) != ids.unsqueeze(-2)).unsqueeze(2)
            group_bias = torch.zeros(blocked.shape, dtype=h.dtype, device=h.device)
            group_bias = group_bias.masked_fill(blocked, torch.finfo(h.dtype).min / 4)
            bias = group_bias if bias is None else bias + group_bias
        out = window_reverse(self.attn(windows, bias), window, grid, grid)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        x = shortcut + out.reshape(n, length, dim)
        return x + self.mlp(self.norm2(x))


class DiSaSpatialAggregation(nn.Module):
    """W-MSA then SW-MSA on every class slice: `(batch, D, T, grid, grid)` -> same shape."""

    def __init__(self, config):
        super().__init__()
        self.block_1 = DiSaSwinBlock(config, shift=0)
        self.block_2 = DiSaSwinBlock(config, shift=config.window_size // 2)
        self.guidance_norm = nn.LayerNorm(config.appearance_guidance_dim)

    def forward(
        self, x: torch.Tensor, appearance_guidance: torch.Tensor, group_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            x (`(batch, D, T, grid, grid)`): embedded cost volume.
            appearance_guidance (`(batch, G, grid, grid)`): projected image features.
            group_ids (`(batch, T, grid, grid)` long, optional): attention groups per class slice.
        """
        batch, dim, classes, height, width = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(batch * classes, height * width, dim)
        guidance = appearance_guidance.flatten(2).transpose(1, 2)
        guidance = self.guidance_norm(guidance).repeat_interleave(classes, dim=0)
        if group_ids is not None:
            group_ids = group_ids.reshape(batch * classes, height * width)
        tokens = self.block_1(tokens, guidance, group_ids)
        tokens = self.block_2(tokens, guidance, group_ids)
        return tokens.view(batch, classes, height, width, dim).permute(0, 4, 1, 2, 3)
