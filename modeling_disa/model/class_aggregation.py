"""Class cost aggregation: linear attention across the class axis at every (pooled) pixel, with text guidance in
the queries and keys, learnable padding of the class axis up to `class_cap`, and CAT-Seg's residual form.

There is no positional encoding over classes, so the layer is permutation-equivariant in the class order.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .routing import TokenRoute


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """ "Transformers are RNNs" attention with the elu+1 feature map.

    Args:
        q, k, v (`(R, L, heads, head_dim)`): R rows (pixels) of L tokens (classes).

    Returns:
        `(R, L, heads, head_dim)`.
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    length = v.shape[1]
    # Dividing V by the length before the products and multiplying back after keeps fp16 sums in range.
    v = v / length
    kv = torch.einsum("nshd,nshv->nhdv", k, v)
    normaliser = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, normaliser) * length


def _pad_classes(values: torch.Tensor, padding: torch.Tensor, length: int) -> torch.Tensor:
    """`(B, pixels, T, C)` values and a `(1, 1, C)` padding token -> `(B, pixels, length, C)`."""
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q, k, v `(R, T, D)` -> `(R, T, D)`."""
        heads = (self.num_heads, -1)
        out = linear_attention(q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads), self.eps)
        return out.flatten(-2)


class DiSaClassTokenLayers(nn.Module):
    """The per-token layers of a class-aggregation layer (and its class padding): one branch's weights."""

    def __init__(self, config):
        super().__init__()
        dim, guidance_dim = config.hidden_dim, config.text_guidance_dim
        self.norm1 = nn.LayerNorm(dim)
        self.attention = DiSaClassAttention(dim, guidance_dim, config.num_attention_heads, config.linear_attention_eps)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * config.mlp_ratio), nn.ReLU(), nn.Linear(dim * config.mlp_ratio, dim)
        )
        if config.class_cap > 0:
            self.padding_tokens = nn.Parameter(torch.zeros(1, 1, dim))
            self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim))

    def project(self, tokens: torch.Tensor, guidance: torch.Tensor):
        """Before class attention: LN, then q/k from [LN(x); guidance] and v from LN(x)."""
        normed = self.norm1(tokens)
        both = torch.cat([normed, guidance], dim=-1)
        return self.attention.q(both), self.attention.k(both), self.attention.v(normed)

    def update(self, tokens: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """After attention: residual, then MLP + residual."""
        tokens = tokens + attended
        return tokens + self.mlp(self.norm2(tokens))


class DiSaClassAggregation(DiSaClassTokenLayers):
    """Pre-LN linear-attention transformer layer over the class axis: `(B, D, T, h, w)` -> same. With SDM,
    `background` holds the background branch's per-token layers and padding."""

    def __init__(self, config):
        super().__init__(config)
        self.class_cap = config.class_cap
        self.residual = config.class_residual
        if config.use_sdm:
            self.background = DiSaClassTokenLayers(config)

    def forward(
        self,
        x: torch.Tensor,
        text_guidance: torch.Tensor,
        pooling: tuple[int, int],
        route: TokenRoute | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x (`(B, D, T, h, w)`): cost volume, T <= class_cap.
            text_guidance (`(B, T, G)`): projected text embeddings.
            pooling (`(ph, pw)`): spatial average pooling applied before attention ((2, 2) train, (1, 1) eval).
            route (`TokenRoute` over `(B, T, h, w)`, optional): SDM's branch of every token (see
                `TokenRoute.class_layout` for pooled cells and padding classes).
        """
        batch, dim, classes, height, width = x.shape
        pooled = F.avg_pool2d(x.transpose(1, 2).reshape(batch * classes, dim, height, width), pooling)
        ph, pw = pooled.shape[-2:]
        tokens = pooled.view(batch, classes, dim, ph * pw).permute(0, 3, 1, 2)  # (B, pixels, T, D)
        guidance = text_guidance.unsqueeze(1).expand(-1, ph * pw, -1, -1)
        padded = self.class_cap > 0
        if route is not None:
            route = route.class_layout(pooling, self.class_cap)
        if padded:
            # Routed padding classes belong to the background branch, so they take its padding tokens. The classes
            # are written into a class_cap-long copy of the padding (no tensor whose size is class_cap - T, which
            # may be 0 or 1), so `torch.export` keeps the number of classes dynamic up to class_cap.
            source = self.background if route is not None else self
            tokens = _pad_classes(tokens, source.padding_tokens, self.class_cap)
            guidance = _pad_classes(guidance, source.padding_guidance, self.class_cap)
        tokens = tokens.flatten(0, 1)
        guidance = guidance.flatten(0, 1)
        if route is not None:
            # The background branch runs on every token and the foreground rows are then overwritten with the
            # foreground branch's: the layout is mostly background (every padding class is), so gathering the
            # background rows and scattering them back would copy nearly the whole layout at every projection (on a
            # ViT-B view at 10 classes that made DiSa ~10 % slower than CAT-Seg mode), to spare the background
            # layers only the few foreground rows.
            fg = route.foreground_rows(tokens)
            q, k, v = (
                route.overwrite(full, rows)
                for full, rows in zip(
                    self.background.project(tokens, guidance), self.project(fg, route.foreground_rows(guidance))
                )
            )
            del guidance
            attended = self.attention.attend(q, k, v)
            del q, k, v
            updated_fg = self.update(fg, route.foreground_rows(attended))
            del fg
            updated = route.overwrite(self.background.update(tokens, attended), updated_fg)
            del attended, updated_fg
        else:
            q, k, v = self.project(tokens, guidance)
            updated = self.update(tokens, self.attention.attend(q, k, v))
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
