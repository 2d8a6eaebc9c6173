"""Class cost aggregation: linear attention across the class axis at every (pooled) pixel, with text guidance in
the queries and keys, learnable padding of the class axis up to `class_cap`, and CAT-Seg's residual form.

There is no positional encoding over classes, so the layer is permutation-equivariant in the class order.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .routing import as_route, per_branch


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """"Transformers are RNNs" attention with the elu+1 feature map.

    Args:
        q, k, v (`(N, L, heads, head_dim)`).
        groups (`(N, L)` bool, optional): two token groups that attend only within themselves (SDM branches).

    Returns:
        `(N, L, heads, head_dim)`.
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = v.shape[1]
    # Dividing V by the length before the products and multiplying back after keeps fp16 sums in range.
    v = v / length

    def attend(keys):
        kv = torch.einsum("nshd,nshv->nhdv", keys, v)
        normaliser = 1 / (torch.einsum("nlhd,nhd->nlh", q, keys.sum(dim=1)) + eps)
        return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, normaliser) * length

    if groups is None:
        return attend(k)
    member = groups[..., None, None].to(k.dtype)
    return torch.where(groups[..., None, None], attend(k * member), attend(k * (1 - member)))


def _pad_classes(values: torch.Tensor, padding: torch.Tensor, length: int) -> torch.Tensor:
    """`(batch, pixels, T, C)` values and a `(1, 1, C)` padding token -> `(batch, pixels, length, C)`."""
    batch, pixels, classes, channels = values.shape
    # in the values' dtype: under autocast the values are bf16 while the padding parameter stays fp32
    padded = padding.to(values.dtype).expand(batch, pixels, length, channels).clone()
    return padded.index_copy_(2, torch.arange(classes, device=values.device), values)


class DiSaClassAttention(nn.Module):
    """Multi-head linear attention over classes; queries/keys see `[cost; text guidance]`, values the cost only.
    No output projection (CAT-Seg)."""

    def __init__(self, hidden_dim: int, guidance_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.q = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.k = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.v = nn.Linear(hidden_dim, hidden_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: torch.Tensor | None = None):
        """q, k, v `(N, T, hidden_dim)` -> `(N, T, hidden_dim)`; `groups` `(N, T)` bool restricts attention."""
        heads = (self.num_heads, -1)
        out = linear_attention(q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads), self.eps, groups)
        return out.flatten(-2)


def _project(layer: "DiSaClassAggregation", tokens: torch.Tensor, guidance: torch.Tensor):
    """Per-token part before class attention: LN, then q/k from [LN(x); guidance] and v from LN(x)."""
    normed = layer.norm1(tokens)
    both = torch.cat([normed, guidance], dim=-1)
    return layer.attention.q(both), layer.attention.k(both), layer.attention.v(normed)


def _update(layer: "DiSaClassAggregation", tokens: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Per-token part after attention: residual, then MLP + residual."""
    tokens = tokens + attended
    return tokens + layer.mlp(layer.norm2(tokens))


class DiSaClassAggregation(nn.Module):
    """Pre-LN linear-attention transformer layer over the class axis: `(batch, D, T, grid, grid)` -> same."""

    def __init__(self, config):
        super().__init__()
        dim, guidance_dim = config.hidden_dim, config.text_guidance_dim
        self.class_cap = config.class_cap
        self.residual = config.class_residual
        self.restrict_to_branch = config.branch_attention == "restricted"
        self.norm1 = nn.LayerNorm(dim)
        self.attention = DiSaClassAttention(dim, guidance_dim, config.num_attention_heads, config.linear_attention_eps)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * config.mlp_ratio), nn.ReLU(), nn.Linear(dim * config.mlp_ratio, dim))
        if self.class_cap > 0:
            self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim))
            self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim))

    def forward(
        self,
        x: torch.Tensor,
        text_guidance: torch.Tensor,
        pooling: tuple[int, int],
        route: torch.Tensor | None = None,
        twin: "DiSaClassAggregation | None" = None,
    ) -> torch.Tensor:
        """
        Args:
            x (`(batch, D, T, grid, grid)`): cost volume, T <= class_cap.
            text_guidance (`(batch, T, G)`): projected text embeddings.
            pooling (`(ph, pw)`): spatial average pooling applied before attention ((2, 2) train, (1, 1) eval).
            route (`(batch, T, grid, grid)` bool, optional): SDM foreground tokens; a pooled cell is foreground
                when at least half of its tokens are. Padding classes count as background.
            twin (optional): the background branch's class aggregation (routed weights).
        """
        batch, dim, classes, height, width = x.shape
        pooled = F.avg_pool2d(x.transpose(1, 2).reshape(batch * classes, dim, height, width), pooling)
        ph, pw = pooled.shape[-2:]
        tokens = pooled.view(batch, classes, dim, ph * pw).permute(0, 3, 1, 2)  # (B, pixels, T, D)
        guidance = text_guidance.unsqueeze(1).expand(-1, ph * pw, -1, -1)
        padded = self.class_cap > 0
        if route is not None:
            pooled_route = F.avg_pool2d(route.flatten(0, 1).unsqueeze(1).to(x.dtype), pooling) >= 0.5
            route = pooled_route.view(batch, classes, ph * pw).transpose(1, 2)  # (B, pixels, T)
            if padded:
                route = torch.cat([route, route.new_zeros(batch, ph * pw, self.class_cap - classes)], dim=2)
            route = as_route(route.flatten(0, 1))
        if padded:
            # Routed padding classes belong to the background branch, so they take its padding tokens. The classes
            # are written into a class_cap-long copy of the padding (no tensor whose size is class_cap - T, which
            # may be 0 or 1), so `torch.export` keeps the number of classes dynamic up to class_cap.
            source = twin if twin is not None and route is not None else self
            tokens = _pad_classes(tokens, source.padding_tokens, self.class_cap)
            guidance = _pad_classes(guidance, source.padding_guidance, self.class_cap)
        tokens = tokens.flatten(0, 1)
        guidance = guidance.flatten(0, 1)
        q, k, v = per_branch(_project, self, twin, route, tokens, guidance)
        groups = route.mask if route is not None and self.restrict_to_branch else None
        attended = self.attention.attend(q, k, v, groups)
        updated = per_branch(_update, self, twin, route, tokens, attended)
        if self.residual == "catseg":
            # CAT-Seg returns x + up(pool(x) + update): the identity path is counted twice (kept for its weights).
            delta = updated
        else:
            delta = updated - tokens
        delta = delta.view(batch, ph * pw, -1, dim)
        if padded:
            # drop the padding classes; a gather, not a slice, whose layout would depend on whether T == class_cap
            delta = delta.index_select(2, torch.arange(classes, device=delta.device))
        delta = delta.permute(0, 2, 3, 1).reshape(batch * classes, dim, ph, pw)
        if (ph, pw) != (height, width):
            delta = F.interpolate(delta, size=(height, width), mode="bilinear", align_corners=True)
        return x + delta.view(batch, classes, dim, height, width).transpose(1, 2)
