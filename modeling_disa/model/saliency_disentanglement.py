"""Saliency-aware disentanglement module (SDM) of DiSa. *Reconstruction* (the paper names the parts; see
`model_card.md`):

1. Class queries (from the CLIP text embeddings) cross-attend to the dense visual tokens in one pre-LN transformer
   block at CLIP vision width; an image-text-matching (ITM) head gives one class-presence logit per class, trained
   with BCE against "class present in the crop" (`losses.itm_loss`).
2. Grad-CAM saliency S_t = mean_heads(A_t * ReLU(d s_t / d A_t)) on the patch grid, where s_t is the class's own
   ITM logit. The same rule holds in training and inference,
   so no labels are needed. s_t depends on A_t only through z_t = A_t V, hence d s_t / d A_tj = g_t . V_j with
   g_t = d s_t / d z_t, which is written out here in closed form (through the output projection, the MLP with its
   LayerNorm and GELU, and the ITM head). No backward pass runs, so saliency works under `torch.inference_mode()`.
3. Per image and class, the top-k tokens of S_t are foreground and the rest background; k = 96 of 576 by default
   (the same ratio on other grids), or adaptive: the smallest k whose tokens hold `ADAPTIVE_SALIENCY_MASS` of the
   saliency, clamped to [ADAPTIVE_MIN_RATIO, ADAPTIVE_MAX_RATIO] of the grid.
4. Foreground and background tokens are aggregated by separate branches (every aggregation block's own weights
   are the foreground branch, its `background` child the background one), each token routed through its own
   branch's weights with attention over the whole class map (about the cost of one branch).
5. A fusion block merges the two branches' "ensemble features": each token's own branch output, and the other
   branch's class-wise mean. `fusion="own"` (the token's own output), `"weighted"` (learned sigmoid gate per pixel,
   class and channel), `"sum"` or `"concat"` (+ linear).

SDM reads its inputs detached: the presence loss trains SDM's own head and never re-tunes CLIP or the cost embedding
that every class reads.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_disa import ADAPTIVE_MAX_RATIO, ADAPTIVE_MIN_RATIO, ADAPTIVE_SALIENCY_MASS


@dataclass
class SaliencyOutput(ModelOutput):
    """
    Args:
        itm_logits (`(B, T)`): class-presence logits.
        saliency (`(B, T, h, w)`): saliency (detached).
        foreground_mask (`(B, T, h, w)` bool): foreground tokens.
        foreground_k (`(B, T)` long): number of foreground tokens per image and class.
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
    """Class-to-patch cross-attention block with an ITM head, at CLIP vision width V.

    queries `(B, T, projection_dim)` and tokens `(B, N, V)` -> attention `(B, heads, T, N)`,
    ITM logits `(B, T)`.
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
        """Returns the residual query `(B, T, V)`, attention `(B, heads, T, N)` and values `(B, heads, N, d)`."""
        query = self.query_proj(queries)
        q = self.q_proj(self.query_norm(query)).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(tokens).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(tokens).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        attention = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return query, attention, v

    def itm_from_attention(self, attention: torch.Tensor, values: torch.Tensor, query: torch.Tensor):
        """ITM logits as a function of the attention (the function Grad-CAM differentiates).

        Returns `(logits (B, T), intermediates)` with the activations the closed-form gradient needs."""
        z = (attention @ values).transpose(1, 2).flatten(-2)  # (B, T, V)
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


class DiSaCostSaliency(nn.Module):
    """Class-to-token cross-attention over the embedded cost volume, with a presence (ITM) head, at cost width D.

    For class t the keys and values at token j are read from the class's own cost feature C_tj (the cosine
    similarity of token j to class t, embedded by the 7x7 conv), so every weight is shared by all classes, as in the
    rest of the aggregation head: the presence and saliency rules transfer to class names never seen in training,
    which a head over CLIP tokens and class embeddings does not (presence AUROC 0.71 on unseen stuff in the toy
    world). Attention logits a_tj = w . LN(C_tj) / temperature, A_t = softmax_j(a_t), attended feature
    z_t = sum_j A_tj V(C_tj), presence logit s_t = MLP(z_t). Grad-CAM as with the CLIP-width block:
    d s_t / d A_tj = g_t . V_tj with g_t = d s_t / d z_t in closed form.

    volume `(B, D, T, h, w)` -> attention `(B, T, N)`, values `(B, T, N, D)`, logits `(B, T)`.
    """

    def __init__(self, config):
        super().__init__()
        dim = config.hidden_dim
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, 1)
        self.value = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, volume: torch.Tensor):
        tokens = self.norm(volume.flatten(3).permute(0, 2, 3, 1))  # (B, T, N, D)
        attention = self.key(tokens).squeeze(-1).softmax(dim=-1)  # (B, T, N)
        values = self.value(tokens)
        z = torch.einsum("btn,btnd->btd", attention, values)
        hidden = self.fc(z)
        logits = self.out(F.gelu(hidden)).squeeze(-1)
        return attention, values, logits, hidden

    def gradient_wrt_attention(self, values: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Closed-form d s_t / d A_tj `(B, T, N)`."""
        grad_z = (gelu_derivative(hidden) * self.out.weight[0]) @ self.fc.weight  # (B, T, D)
        return torch.einsum("btd,btnd->btn", grad_z, values)


def foreground_split(
    saliency: torch.Tensor, config, presence_logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        saliency (`(B, T, N)`).
        presence_logits (`(B, T)`, optional): with `config.presence_threshold`, classes whose predicted
            presence probability is below it get no foreground token (k = 0): every token of an absent class is
            background.

    Returns:
        mask (`(B, T, N)` bool) with exactly k True per row, and k (`(B, T)` long). Ties are broken by
        token index (stable sort), so the split is deterministic.
    """
    tokens = saliency.shape[-1]
    order = torch.sort(saliency, dim=-1, descending=True, stable=True).indices
    fixed = min(max(config.foreground_k(tokens), 1), tokens - 1)
    k = torch.full(saliency.shape[:-1], fixed, dtype=torch.long, device=saliency.device)
    if config.foreground_topk_mode == "adaptive":
        low = max(1, math.ceil(ADAPTIVE_MIN_RATIO * tokens))
        high = min(tokens - 1, math.floor(ADAPTIVE_MAX_RATIO * tokens))
        sorted_values = torch.gather(saliency, -1, order).clamp_min(0)
        total = sorted_values.sum(dim=-1, keepdim=True)
        share = sorted_values.cumsum(dim=-1) / total.clamp_min(torch.finfo(saliency.dtype).tiny)
        adaptive = (share < ADAPTIVE_SALIENCY_MASS).sum(dim=-1) + 1
        k = torch.where(total.squeeze(-1) > 0, adaptive, k).clamp(low, high)
    if config.presence_threshold is not None and presence_logits is not None:
        present = torch.sigmoid(presence_logits.detach().to(saliency.dtype)) >= config.presence_threshold
        k = torch.where(present, k, torch.zeros_like(k))
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(tokens, device=order.device).expand_as(order))
    return ranks < k.unsqueeze(-1), k


class DiSaBranchFusion(nn.Module):
    """Merges foreground / background branch features `(B, D, T, h, w)` each -> `(B, D, T, h, w)`."""

    def __init__(self, config):
        super().__init__()
        dim = config.hidden_dim
        self.mode = config.fusion
        if self.mode == "weighted":
            self.gate = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        elif self.mode == "concat":
            self.projection = nn.Linear(2 * dim, dim)

    def forward(
        self, foreground: torch.Tensor, background: torch.Tensor, own: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            foreground, background (`(B, D, T, h, w)`): the two branch views (see `branch_ensembles`).
            own (`(B, D, T, h, w)`): each token's own branch output.
            context (`(B, D, T, h, w)`): at each token, the other branch's class-wise mean.
        """
        if self.mode == "own":
            return own
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

    def routed(self, volume: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
        """Fusion of a routed volume `(B, D, T, h, w)` (each token already holds its own branch's feature) with
        foreground mask `(B, T, h, w)`. `"own"` returns it as it is, without building the unused views."""
        if self.mode == "own":
            return volume
        fg, bg, context = branch_ensembles(volume, foreground)
        return self(fg, bg, volume, context)


def branch_ensembles(
    volume: torch.Tensor, foreground: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routed volume `(B, D, T, h, w)` + foreground mask `(B, T, h, w)` -> the two branch views (each token keeps
    its own branch's feature and sees the other branch's class-wise mean in place of the missing one) and the
    context map (the other branch's class-wise mean at every token)."""
    fg = foreground.unsqueeze(1).to(volume.dtype)
    bg = 1 - fg
    mean_fg = (volume * fg).sum(dim=(-2, -1), keepdim=True) / fg.sum(dim=(-2, -1), keepdim=True).clamp_min(1)
    mean_bg = (volume * bg).sum(dim=(-2, -1), keepdim=True) / bg.sum(dim=(-2, -1), keepdim=True).clamp_min(1)
    context = mean_bg * fg + mean_fg * bg
    return volume * fg + mean_fg * bg, volume * bg + mean_bg * fg, context


class DiSaSaliencyDisentanglement(nn.Module):
    """SDM's own modules: the presence / saliency head (`cost_saliency` or `itm`) with the foreground split, and
    the branch fusion. The background branch's weights are `background` children of the aggregation blocks."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        if config.saliency_source == "cost":
            self.cost_saliency = DiSaCostSaliency(config)
        else:
            self.itm = DiSaITMCrossAttention(config)
        self.fusion = DiSaBranchFusion(config)

    def forward(
        self, text_queries: torch.Tensor, dense_tokens: torch.Tensor, volume: torch.Tensor | None = None
    ) -> SaliencyOutput:
        """
        Args:
            text_queries (`(B, T, C)`): normalised class embeddings.
            dense_tokens (`(B, N, V)`): dense CLIP tokens (post-LN, before projection; V = vision width).
            volume (`(B, D, T, h, w)`): embedded cost volume (read with `saliency_source="cost"`).
        """
        config = self.config
        # Detached inputs: with the presence loss reaching them, its gradient into CLIP's Q/V weights was 3.7-7x the
        # segmentation loss's and degraded the cost volume every class reads.
        if config.saliency_source == "cost":
            attention, values, logits, hidden = self.cost_saliency(volume.detach())
            with torch.no_grad():
                grad = self.cost_saliency.gradient_wrt_attention(values, hidden)
                saliency = (attention * grad.clamp_min(0)).detach()
            return self._split(logits, saliency)
        query, attention, values = self.itm.attention(text_queries.detach(), dense_tokens.detach())
        logits, intermediates = self.itm.itm_from_attention(attention, values, query)
        with torch.no_grad():
            if config.saliency_source == "attention":
                saliency = attention.mean(dim=1)
            else:
                grad = self.itm.itm_gradient_wrt_attention(values, intermediates)
                saliency = (attention * grad.clamp_min(0)).mean(dim=1)
            saliency = saliency.detach()
        return self._split(logits, saliency)

    def _split(self, logits: torch.Tensor, saliency: torch.Tensor) -> SaliencyOutput:
        """Presence logits `(B, T)` and saliency `(B, T, N)` -> the foreground split on the grid."""
        config = self.config
        with torch.no_grad():
            mask, k = foreground_split(saliency, config, logits)
        grid = config.grid_size
        shape = (*saliency.shape[:2], grid, grid)
        return SaliencyOutput(
            itm_logits=logits, saliency=saliency.view(shape), foreground_mask=mask.view(shape), foreground_k=k
        )
