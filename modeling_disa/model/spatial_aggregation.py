"""Spatial cost aggregation: a pair of Swin blocks (window attention, then shifted-window attention) run on every
class slice of the embedded cost volume, with appearance guidance concatenated to the query/key inputs only.

As in CAT-Seg there is no relative-position bias.
"""

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .routing import TokenRoute

# CAT-Seg's additive value for token pairs of different regions in a shifted window (not -inf: Swin's choice)
SHIFTED_WINDOW_MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """`(R, h, w, C)` -> `(R, h/window * w/window, window*window, C)` (R rows, e.g. B*T slices)."""
    n, h, w, c = x.shape
    x = x.view(n, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, -1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """`(R, h/window * w/window, window*window, C)` -> `(R, h, w, C)`."""
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


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit-matmul attention, the `"eager"` implementation (same contract as
    `transformers.models.clip.modeling_clip.eager_attention_forward`): `(R, heads, L, d)` inputs, an additive
    `attention_mask`, returns `(R, L, heads, d)` and the attention weights."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class DiSaWindowAttention(nn.Module):
    """Multi-head window self-attention whose queries and keys also see the guidance features.

    The projections are per token (`project`, `output`); `attend` mixes tokens inside windows. The attention kernel
    is chosen at every call from `config._attn_implementation` through transformers' attention interface
    (`ALL_ATTENTION_FUNCTIONS`, as `CLIPAttention` in `models/clip/modeling_clip.py` does), so
    `from_pretrained(..., attn_implementation=...)` and `set_attn_implementation(...)` reach it.
    """

    def __init__(self, config, hidden_dim: int, guidance_dim: int, num_heads: int):
        super().__init__()
        self.config = config
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.k = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.v = nn.Linear(hidden_dim, hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """
        Args:
            q, k, v (`(R, windows, tokens, D)`): window-partitioned projections.
            bias (`(windows, 1, tokens, tokens)` or `(R, windows, 1, tokens, tokens)`, optional): additive bias.

        Returns:
            `(R, windows, tokens, D)`.
        """
        n, windows, length, _ = q.shape
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = (t.view(n, windows, length, heads, head_dim).transpose(2, 3) for t in (q, k, v))
        per_row_bias = bias is not None and bias.ndim == 5
        if per_row_bias:
            # a bias per row and window (SDM groups): batch (row, window) pairs, broadcast over heads
            q, k, v = (t.reshape(n * windows, heads, length, head_dim) for t in (q, k, v))
            bias = bias.reshape(n * windows, 1, length, length)
        else:
            # a bias per window only: fold windows into the head axis so it broadcasts over rows. 4-D inputs also
            # keep SDPA on its fused CPU kernel (5-D ones fall back to the slow math path).
            q, k, v = (t.reshape(n, windows * heads, length, head_dim) for t in (q, k, v))
            if bias is not None:
                bias = bias.expand(windows, heads, length, length).reshape(1, windows * heads, length, length)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention_interface(self, q, k, v, bias, scaling=self.scaling, dropout=0.0)
        if not per_row_bias:  # (n, tokens, windows * heads, head_dim) -> (n, windows, tokens, ...)
            out = out.view(n, length, windows, heads * head_dim).transpose(1, 2)
        return out.reshape(n, windows, length, -1)


class DiSaSwinMLP(nn.Module):
    def __init__(self, hidden_dim: int, mlp_ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim, hidden_dim * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim * mlp_ratio, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiSaSwinTokenLayers(nn.Module):
    """The per-token layers of a Swin block (everything but the token mixing inside windows): one branch's weights."""

    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_dim)
        self.attn = DiSaWindowAttention(
            config, config.hidden_dim, config.appearance_guidance_dim, config.num_attention_heads
        )
        self.norm2 = nn.LayerNorm(config.hidden_dim)
        self.mlp = DiSaSwinMLP(config.hidden_dim, config.mlp_ratio)

    def projection_inputs(self, x: torch.Tensor, guidance: torch.Tensor):
        """`(LN(x), [LN(x); guidance])`: the inputs of v and of q / k."""
        normed = self.norm1(x)
        return normed, torch.cat([normed, guidance], dim=-1)

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """The q, k, v layers (q and k read `[LN(x); guidance]`, v reads `LN(x)`)."""
        return self.attn.q, self.attn.k, self.attn.v

    def project(self, x: torch.Tensor, guidance: torch.Tensor):
        """Before attention: LN, then q/k from [LN(x); guidance] and v from LN(x)."""
        normed, both = self.projection_inputs(x, guidance)
        return self.attn.q(both), self.attn.k(both), self.attn.v(normed)

    def update(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """After attention: output projection + residual, then MLP + residual."""
        x = x + self.attn.proj(attended)
        return x + self.mlp(self.norm2(x))


class DiSaSwinBlock(DiSaSwinTokenLayers):
    """One (shifted) window-attention block over `(B*T, N, D)` token maps. With SDM, `background` holds the
    background branch's per-token layers; the window attention itself has no weights and is shared."""

    def __init__(self, config, shift: int):
        super().__init__(config)
        grid, window = config.grid_size, config.window_size
        self.grid, self.window = grid, window
        # A window covering the whole map cannot be shifted (CAT-Seg/Swin rule).
        self.shift = shift if grid > window else 0
        if config.use_sdm:
            self.background = DiSaSwinTokenLayers(config)
        self.register_buffer("attn_mask", self.build_attention_mask(), persistent=False)

    def build_attention_mask(self) -> torch.Tensor | None:
        if not self.shift:
            return None
        return shifted_window_mask(self.grid, self.window, self.shift, SHIFTED_WINDOW_MASK_VALUE)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """`(B*T, N, C)` -> shifted, window-partitioned `(B*T, windows, window*window, C)`."""
        x = x.view(x.shape[0], self.grid, self.grid, -1)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        return window_partition(x, self.window)

    def _unwindow(self, windows: torch.Tensor) -> torch.Tensor:
        x = window_reverse(windows, self.window, self.grid, self.grid)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x.reshape(x.shape[0], self.grid * self.grid, -1)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (`(B*T, N, D)`): one cost slice per row.
            guidance (`(B*T, N, G)`): normalised appearance guidance.

        Returns:
            `(B*T, N, D)` (see `forward_routed` for SDM's two branches).
        """
        q, k, v = self.project(x, guidance)
        return self.update(x, self._attend(q, k, v))

    def forward_routed(self, foreground, background, guidance_foreground, guidance_background, route: TokenRoute):
        """The block on tokens split by a mixed route over `(B*T, N)`: each branch's rows `(n, D)` (and guidance
        rows `(n, G)`) through its own per-token layers; they are merged only for the window attention, where every
        token attends to the tokens of both branches.

        Returns:
            the updated foreground and background rows.
        """
        # the projections are merged straight into the (shifted) window layout and the attention output split from
        # it: the same values as merging into the token layout and partitioning, with two copies fewer
        windowed = route.permute_rows(self._window_order(foreground.device))
        rows, windows = route.mask.shape[0], (self.grid // self.window) ** 2
        q, k, v = (
            t.view(rows, windows, self.window**2, -1)
            for t in windowed.project(self, foreground, guidance_foreground, background, guidance_background)
        )
        attended_fg, attended_bg = windowed.split(self._attend_windows(q, k, v))
        # released before the branches' MLPs, whose hidden layer is the block's largest tensor
        del q, k, v
        foreground = self.update(foreground, attended_fg)
        del attended_fg
        return foreground, self.background.update(background, attended_bg)

    def _window_order(self, device) -> torch.Tensor:
        """`(N,)`: the token at every position of the shifted, window-partitioned layout."""
        tokens = self.grid * self.grid
        return self._windows(torch.arange(tokens, device=device).view(1, tokens, 1)).reshape(-1)

    def _attend(self, q, k, v) -> torch.Tensor:
        """(Shifted) window attention of `(B*T, N, D)` projections."""
        return self._unwindow(self._attend_windows(self._windows(q), self._windows(k), self._windows(v)))

    def _attend_windows(self, q, k, v) -> torch.Tensor:
        """Attention of window-partitioned `(B*T, windows, window*window, D)` projections with the shift mask."""
        bias = None
        if self.attn_mask is not None:
            bias = self.attn_mask.to(q.dtype).unsqueeze(1)
        return self.attn.attend(q, k, v, bias)


class DiSaSpatialAggregation(nn.Module):
    """W-MSA then SW-MSA on every class slice: `(B, D, T, h, w)` -> same shape."""

    def __init__(self, config):
        super().__init__()
        self.block_1 = DiSaSwinBlock(config, shift=0)
        self.block_2 = DiSaSwinBlock(config, shift=config.window_size // 2)
        self.guidance_norm = nn.LayerNorm(config.appearance_guidance_dim)
        if config.use_sdm:
            self.background_guidance_norm = nn.LayerNorm(config.appearance_guidance_dim)

    def forward(
        self, x: torch.Tensor, appearance_guidance: torch.Tensor, route: TokenRoute | None = None
    ) -> torch.Tensor:
        """
        Args:
            x (`(B, D, T, h, w)`): embedded cost volume.
            appearance_guidance (`(B, G, h, w)`): projected image features.
            route (`TokenRoute` over `(B, T, h, w)`, optional): SDM's branch of every token.
        """
        batch, dim, classes, height, width = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(batch * classes, height * width, dim)
        guidance = appearance_guidance.flatten(2).transpose(1, 2)
        if route is not None:
            route = route.view(batch * classes, height * width)
            foreground, background = route.split(tokens)
            # LayerNorm is per token: each branch normalises the (B*N, G) guidance once, and every routed token
            # reads the row of its image and position (token b*T*N + t*N + n -> row b*N + n)
            positions = height * width
            rows = [
                (index // (classes * positions)) * positions + index % positions
                for index in (route.foreground, route.background)
            ]
            guidance = guidance.reshape(batch * positions, -1)
            guidance_fg = self.guidance_norm(guidance).index_select(0, rows[0])
            guidance_bg = self.background_guidance_norm(guidance).index_select(0, rows[1])
            for block in (self.block_1, self.block_2):
                foreground, background = block.forward_routed(foreground, background, guidance_fg, guidance_bg, route)
            tokens = route.merge(foreground, background)
        else:
            # normalising before repeating the guidance for every class is the same (LayerNorm is per token)
            normalised = self.guidance_norm(guidance).repeat_interleave(classes, dim=0)
            tokens = self.block_2(self.block_1(tokens, normalised), normalised)
        return tokens.view(batch, classes, height, width, dim).permute(0, 4, 1, 2, 3)
