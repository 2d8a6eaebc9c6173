"""Class cost aggregation: linear attention across the class axis at every (pooled) pixel, with text guidance in
the queries and keys, learnable padding of the class axis up to `class_cap`, and CAT-Seg's residual form.

There is no positional encoding over classes, so the layer is permutation-equivariant in the class order.
"""

import torch
import torch.nn.functional as F
from torch import nn


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """"Transformers are RNNs" attention with the elu+1 feature map.

    Args:
        q, k, v (`(N, L, heads, head_dim)`).

    Returns:
        `(N, L, heads, head_dim)`.
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = v.shape[1]
    # Dividing V by the length before the products and multiplying back after keeps fp16 sums in range.
    kv = torch.einsum("nshd,nshv->nhdv", k, v / length)
    normaliser = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, normaliser) * length


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

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """x `(N, T, hidden_dim)`, guidance `(N, T, guidance_dim)` -> `(N, T, hidden_dim)`."""
        xg = torch.cat([x, guidance], dim=-1)
        heads = (self.num_heads, -1)
        q = self.q(xg).unflatten(-1, heads)
        k = self.k(xg).unflatten(-1, heads)
        v = self.v(x).unflatten(-1, heads)
        return linear_attention(q, k, v, self.eps).flatten(-2)


class DiSaClassAggregation(nn.Module):
    """Pre-LN linear-attention transformer layer over the class axis: `(batch, D, T, grid, grid)` -> same."""

    def __init__(self, config):
        super().__init__()
        dim, guidance_dim = config.hidden_dim, config.text_guidance_dim
        self.class_cap = config.class_cap
        self.residual = config.class_residual
        self.norm1 = nn.LayerNorm(dim)
        self.attention = DiSaClassAttention(dim, guidance_dim, config.num_attention_heads, config.linear_attention_eps)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * config.mlp_ratio), nn.ReLU(), nn.Linear(dim * config.mlp_ratio, dim))
        if self.class_cap > 0:
            self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim))
            self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim))

    def forward(self, x: torch.Tensor, text_guidance: torch.Tensor, pooling: tuple[int, int]) -> torch.Tensor:
        """
        Args:
            x (`(batch, D, T, grid, grid)`): cost volume, T <= class_cap.
            text_guidance (`(batch, T, G)`): projected text embeddings.
            pooling (`(ph, pw)`): spatial average pooling applied before attention ((2, 2) train, (1, 1) eval).
        """
        batch, dim, classes, height, width = x.shape
        pooled = F.avg_pool2d(x.transpose(1, 2).reshape(batch * classes, dim, height, width), pooling)
        ph, pw = pooled.shape[-2:]
        tokens = pooled.view(batch, classes, dim, ph * pw).permute(0, 3, 1, 2)  # (B, pixels, T, D)
        guidance = text_guidance.unsqueeze(1).expand(-1, ph * pw, -1, -1)
        pad = self.class_cap - classes if self.class_cap > 0 else 0
        if pad > 0:
            tokens = torch.cat([tokens, self.padding_tokens.expand(batch, ph * pw, pad, dim)], dim=2)
            guidance = torch.cat(
                [guidance, self.padding_guidance.expand(batch, ph * pw, pad, guidance.shape[-1])], dim=2
            )
        tokens = tokens.flatten(0, 1)
        guidance = guidance.flatten(0, 1)
        attended = tokens + self.attention(self.norm1(tokens), guidance)
        updated = attended + self.mlp(self.norm2(attended))
        if self.residual == "catseg":
            # CAT-Seg returns x + up(pool(x) + update): the identity path is counted twice (kept for its weights).
            delta = updated
        else:
            delta = updated - tokens
        delta = delta.view(batch, ph * pw, -1, dim)[:, :, :classes]
        delta = delta.permute(0, 2, 3, 1).reshape(batch * classes, dim, ph, pw)
        if (ph, pw) != (height, width):
            delta = F.interpolate(delta, size=(height, width), mode="bilinear", align_corners=True)
        return x + delta.view(batch, classes, dim, height, width).transpose(1, 2)
