"""Saliency-aware disentanglement module (SDM) of DiSa. *Reconstruction* (the paper names the parts; see
`model_card.md`):

1. Class queries (from the CLIP text embeddings) cross-attend to the dense visual tokens in one pre-LN transformer
   block at CLIP vision width; an image-text-matching (ITM) head gives one class-presence logit per class, trained
   with BCE against "class present in the crop" (`losses.itm_loss`).
2. Grad-CAM saliency S_t = mean_heads(A_t * ReLU(d s_t / d A_t)) on the patch grid, where s_t is the class's own
   ITM logit (`saliency_target="predicted_logit"`, or its sigmoid). The same rule holds in training and inference,
   so no labels are needed. s_t depends on A_t only through z_t = A_t V, hence d s_t / d A_tj = g_t . V_j with
   g_t = d s_t / d z_t, which is written out here in closed form (through the output projection, the MLP with its
   LayerNorm and GELU, and the ITM head). No backward pass runs, so saliency works under `torch.inference_mode()`.
3. Per image and class, the top-k tokens of S_t are foreground and the rest background; k = 96 of 576 by default
   (the same ratio on other grids), or adaptive: the smallest k whose tokens hold `adaptive_saliency_mass` of the
   saliency, clamped to [adaptive_min_ratio, adaptive_max_ratio] of the grid.
4. Foreground and background tokens are aggregated by separate branches (the host's aggregator is the foreground
   branch, `background_aggregator` the background one): either routed (each token through its own branch, attention
   restricted to its branch; about the cost of one branch) or as two full masked cost volumes.
5. A fusion block merges the two branches' "ensemble features": each token's own branch output, and the other
   branch's class-wise mean. `fusion="weighted"` (learned sigmoid gate per pixel, class and channel), `"sum"` or
   `"concat"` (+ linear).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput


@dataclass
class SaliencyOutput(ModelOutput):
    """
    Args:
        itm_logits (`(batch, T)`): class-presence logits.
        saliency (`(batch, T, grid, grid)`): saliency (detached).
        foreground_mask (`(batch, T, grid, grid)` bool): foreground tokens.
        foreground_k (`(batch, T)` long): number of foreground tokens per image and class.
    """

    itm_logits: torch.FloatTensor | None = None
    saliency: torch.FloatTensor | None = None
    foreground_mask: torch.BoolTensor | None = None
    foreground_k: torch.LongTensor | None = None


def gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the exact (erf) GELU: Phi(x) + x phi(x)."""
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def layer_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """Vector-Jacobian product of `norm` at `x` with `grad_out` (both `(..., width)`)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    inv_std = torch.rsqrt(var + norm.eps)
    x_hat = (x - mean) * inv_std
    g = grad_out * norm.weight
    return inv_std * (g - g.mean(dim=-1, keepdim=True) - x_hat * (g * x_hat).mean(dim=-1, keepdim=True))


class DiSaITMCrossAttention(nn.Module):
    """Class-to-patch cross-attention block with an ITM head, at CLIP vision width W.

    queries `(batch, T, projection_dim)` and tokens `(batch, N, W)` -> attention `(batch, heads, T, N)`,
    ITM logits `(batch, T)`.
    """

    def __init__(self, config):
        super().__init__()
        width = config.vision_config.hidden_size
        self.num_heads = config.sdm_num_heads
        self.head_dim = width // self.num_heads
        self.query_proj = nn.Linear(config.projection_dim, width)
        self.query_norm = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * config.sdm_mlp_ratio)
        self.fc2 = nn.Linear(width * config.sdm_mlp_ratio, width)
        self.itm_fc = nn.Linear(width, width)
        self.itm_out = nn.Linear(width, 1)

    def attention(self, queries: torch.Tensor, tokens: torch.Tensor):
        """Returns the residual query `(B, T, W)`, attention `(B, heads, T, N)` and values `(B, heads, N, d)`."""
        query = self.query_proj(queries)
        q = self.q_proj(self.query_norm(query)).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(tokens).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(tokens).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        attention = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return query, attention, v

    def itm_from_attention(self, attention: torch.Tensor, values: torch.Tensor, query: torch.Tensor):
        """ITM logits as a function of the attention (the function Grad-CAM differentiates).

        Returns `(logits (B, T), intermediates)` with the activations the closed-form gradient needs."""
        z = (attention @ values).transpose(1, 2).flatten(-2)  # (B, T, W)
        u = query + self.out_proj(z)
        h1 = self.fc1(self.mlp_norm(u))
        u2 = u + self.fc2(F.gelu(h1))
        h2 = self.itm_fc(u2)
        logits = self.itm_out(F.gelu(h2)).squeeze(-1)
        return logits, (u, h1, h2)

    def itm_gradient_wrt_attention(self, values: torch.Tensor, intermediates) -> torch.Tensor:
        """Closed-form d s_t / d A_{t,h,j} = g_{t,h} . V_{h,j}, `(B, heads, T, N)`."""
        u, h1, h2 = intermediates
        grad_h2 = gelu_derivative(h2) * self.itm_out.weight[0]
        grad_u2 = grad_h2 @ self.itm_fc.weight
        grad_h1 = (grad_u2 @ self.fc2.weight) * gelu_derivative(h1)
        grad_u = grad_u2 + layer_norm_backward(grad_h1 @ self.fc1.weight, u, self.mlp_norm)
        grad_z = (grad_u @ self.out_proj.weight).unflatten(-1, (self.num_heads, self.head_dim))  # (B, T, h, d)
        return torch.einsum("bthd,bhnd->bhtn", grad_z, values)


def foreground_split(saliency: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        saliency (`(batch, T, N)`).

    Returns:
        mask (`(batch, T, N)` bool) with exactly k True per row, and k (`(batch, T)` long). Ties are broken by
        token index (stable sort), so the split is deterministic.
    """
    tokens = saliency.shape[-1]
    order = torch.sort(saliency, dim=-1, descending=True, stable=True).indices
    fixed = min(max(config.foreground_k(tokens), 1), tokens - 1)
    k = torch.full(saliency.shape[:-1], fixed, dtype=torch.long, device=saliency.device)
    if config.foreground_topk_mode == "adaptive":
        low = max(1, math.ceil(config.adaptive_min_ratio * tokens))
        high = min(tokens - 1, math.floor(config.adaptive_max_ratio * tokens))
        sorted_values = torch.gather(saliency, -1, order).clamp_min(0)
        total = sorted_values.sum(dim=-1, keepdim=True)
        share = sorted_values.cumsum(dim=-1) / total.clamp_min(torch.finfo(saliency.dtype).tiny)
        adaptive = (share < config.adaptive_saliency_mass).sum(dim=-1) + 1
        k = torch.where(total.squeeze(-1) > 0, adaptive, k).clamp(low, high)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(tokens, device=order.device).expand_as(order))
    return ranks < k.unsqueeze(-1), k


class DiSaBranchFusion(nn.Module):
    """Merges foreground / background branch features `(batch, D, T, h, w)` each -> `(batch, D, T, h, w)`."""

    def __init__(self, config):
        super().__init__()
        dim = config.hidden_dim
        self.mode = config.fusion
        if self.mode == "weighted":
            self.gate = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        elif self.mode == "concat":
            self.projection = nn.Linear(2 * dim, dim)

    def forward(self, foreground: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        if self.mode == "sum":
            return foreground + background
        fg = foreground.permute(0, 2, 3, 4, 1)
        bg = background.permute(0, 2, 3, 4, 1)
        both = torch.cat([fg, bg], dim=-1)
        if self.mode == "weighted":
            weight = torch.sigmoid(self.gate(both))
            fused = weight * fg + (1 - weight) * bg
        else:
            fused = self.projection(both)
        return fused.permute(0, 4, 1, 2, 3)


def branch_ensembles(volume: torch.Tensor, foreground: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed volume `(B, D, T, h, w)` + foreground mask `(B, T, h, w)` -> the two branch views: each token keeps its
    own branch's feature and sees the other branch's class-wise mean in place of the missing one."""
    fg = foreground.unsqueeze(1).to(volume.dtype)
    bg = 1 - fg
    mean_fg = (volume * fg).sum(dim=(-2, -1), keepdim=True) / fg.sum(dim=(-2, -1), keepdim=True).clamp_min(1)
    mean_bg = (volume * bg).sum(dim=(-2, -1), keepdim=True) / bg.sum(dim=(-2, -1), keepdim=True).clamp_min(1)
    return volume * fg + mean_fg * bg, volume * bg + mean_bg * fg


class DiSaSaliencyDisentanglement(nn.Module):
    """SDM: ITM cross-attention, saliency, foreground/background split, background branch and fusion.

    The foreground branch is the host model's aggregator; this module owns the background branch."""

    def __init__(self, config, aggregator_class):
        super().__init__()
        self.config = config
        self.itm = DiSaITMCrossAttention(config)
        self.background_aggregator = aggregator_class(config)
        self.fusion = DiSaBranchFusion(config)

    def saliency(self, text_queries: torch.Tensor, dense_tokens: torch.Tensor) -> SaliencyOutput:
        """
        Args:
            text_queries (`(batch, T, projection_dim)`): normalised class embeddings.
            dense_tokens (`(batch, N, W)`): dense CLIP tokens (post-LN, before projection).
        """
        config = self.config
        query, attention, values = self.itm.attention(text_queries, dense_tokens)
        logits, intermediates = self.itm.itm_from_attention(attention, values, query)
        with torch.no_grad():
            if config.saliency_source == "attention":
                saliency = attention.mean(dim=1)
            else:
                grad = self.itm.itm_gradient_wrt_attention(values, intermediates)
                if config.saliency_target == "predicted_probability":
                    p = torch.sigmoid(logits)
                    grad = grad * (p * (1 - p))[:, None, :, None]
                saliency = (attention * grad.clamp_min(0)).mean(dim=1)
            saliency = saliency.detach()
            mask, k = foreground_split(saliency, config)
        grid = config.grid_size
        shape = (*saliency.shape[:2], grid, grid)
        return SaliencyOutput(
            itm_logits=logits, saliency=saliency.view(shape), foreground_mask=mask.view(shape), foreground_k=k
        )

    def aggregate(self, aggregator, volume, appearance_guidance, text_guidance, pooling, foreground, layer_hook=None):
        """Dual-branch aggregation of the embedded cost `(B, D, T, g, g)` with foreground mask `(B, T, g, g)`."""
        if self.config.branch_mode == "routed":
            routed_volume = aggregator(
                volume, appearance_guidance, text_guidance, pooling,
                route=foreground, twin=self.background_aggregator, layer_hook=layer_hook,
            )
            fg, bg = branch_ensembles(routed_volume, foreground)
        else:
            mask = foreground.unsqueeze(1).to(volume.dtype)
            fg = aggregator(volume * mask, appearance_guidance, text_guidance, pooling, layer_hook=layer_hook)
            bg = self.background_aggregator(
                volume * (1 - mask), appearance_guidance, text_guidance, pooling, layer_hook=layer_hook
            )
        return self.fusion(fg, bg)
