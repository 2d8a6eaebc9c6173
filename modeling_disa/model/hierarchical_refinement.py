"""Hierarchical refinement module (HRM) of DiSa. *Reconstruction* (the paper names pixel-wise, category-wise and
semantic (channel)-wise refinement with "global pooling and re-weighting" and "multi-level updates"):

every stage pools the class slices X `(B, T, C, h, w)` to a descriptor, maps it to a logit a with a small conv/MLP
and re-weights with a residual, X <- X * (1 + tanh(a)) (identity when a = 0, bounded in (0, 2)). The layer that
outputs a starts at zero, so every stage starts as the identity and a DiSa model starts as its CAT-Seg host: HRM can
only add what training finds useful (with a random last layer, every stage re-scaled features by a random factor in
(0, 2) at initialisation, and DiSa's segmentation loss trained more slowly than CAT-Seg mode's).

- pixel-wise: [mean_C, max_C] per class map -> 3x3 conv -> a `(B, T, 1, h, w)` (spatial context per pixel);
- category-wise: mean over h, w -> MLP C -> C/r -> 1 -> a `(B, T, 1, 1, 1)`;
- channel (semantic)-wise: mean over T, h, w -> MLP C -> C/r -> C -> a `(B, 1, C, 1, 1)`.

With HRM, a level is a child (`refinement`) of each aggregation layer (C = D) and of each decoder stage
(C = decoder_dims); each stage is switchable in `DiSaConfig` (`hrm_stages`).
"""

import torch
from torch import nn

from .configuration_disa import HRM_REDUCTION


def reweight(x: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """X * (1 + tanh(a)). Without autograd (inference) X is scaled in place: at the decoder's 4x resolution a fresh
    copy per stage costs as much as the product; every caller passes a tensor that it does not read again."""
    scale = 1 + torch.tanh(logit)
    return x * scale if torch.is_grad_enabled() else x.mul_(scale)


class DiSaPixelRefinement(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=3, padding=1)
        self.conv.zero_init = True  # a = 0: the stage starts as the identity (`DiSaPreTrainedModel._init_weights`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, classes, _, height, width = x.shape
        descriptor = torch.stack([x.mean(dim=2), x.amax(dim=2)], dim=2)  # (B, T, 2, h, w)
        logit = self.conv(descriptor.flatten(0, 1)).view(batch, classes, 1, height, width)
        return reweight(x, logit)


class DiSaCategoryRefinement(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.mlp[-1].zero_init = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # averaged as a (B, C, T) map, the layout the reference implementation reduced in: the kernel's summation
        # order follows the layout, and the outputs stay bit-identical to it
        logit = self.mlp(x.transpose(1, 2).mean(dim=(-2, -1)).transpose(1, 2))  # (B, T, 1)
        return reweight(x, logit[..., None, None])


class DiSaChannelRefinement(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.mlp[-1].zero_init = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.mlp(x.mean(dim=(1, 3, 4)))  # (B, C)
        return reweight(x, logit[:, None, :, None, None])


STAGES = {"pixel": DiSaPixelRefinement, "category": DiSaCategoryRefinement, "channel": DiSaChannelRefinement}


class DiSaRefinementLevel(nn.Module):
    """The enabled stages, applied pixel -> category -> channel, at one level of width `channels`, on class slices
    `(B, T, C, h, w)` (the decoder's layout as it is; the aggregation layer passes a transposed view)."""

    def __init__(self, channels: int, stages, reduction: int):
        super().__init__()
        for name in ("pixel", "category", "channel"):
            if name in stages:
                self.add_module(name, STAGES[name](channels, reduction))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.children():
            x = stage(x)
        return x


def refinement_level(config, channels: int) -> DiSaRefinementLevel | None:
    """The HRM level of a stage of width `channels`, or None without HRM."""
    if not config.use_hrm:
        return None
    return DiSaRefinementLevel(channels, list(config.hrm_stages), HRM_REDUCTION)
