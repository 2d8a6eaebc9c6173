"""Hierarchical refinement module (HRM) of DiSa. *Reconstruction* (the paper names pixel-wise, category-wise and
semantic (channel)-wise refinement with "global pooling and re-weighting" and "multi-level updates"):

every stage pools the volume X `(batch, C, T, h, w)` to a descriptor, maps it to a logit a with a small conv/MLP
and re-weights with a residual, X <- X * (1 + tanh(a)) (identity when a = 0, bounded in (0, 2)):

- pixel-wise: [mean_C, max_C] per class map -> 3x3 conv -> a `(batch, 1, T, h, w)` (spatial context per pixel);
- category-wise: mean over h, w -> MLP C -> C/r -> 1 -> a `(batch, 1, T, 1, 1)`;
- channel (semantic)-wise: mean over T, h, w -> MLP C -> C/r -> C -> a `(batch, C, 1, 1, 1)`.

It runs after each aggregation layer (C = hidden_dim) and after each decoder stage (C = decoder_dims), each stage
and each level switchable in `DiSaConfig`.
"""

import torch
from torch import nn


class DiSaPixelRefinement(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, classes, height, width = x.shape
        descriptor = torch.stack([x.mean(dim=1), x.amax(dim=1)], dim=2)  # (B, T, 2, h, w)
        logit = self.conv(descriptor.flatten(0, 1)).view(batch, classes, 1, height, width).transpose(1, 2)
        return x * (1 + torch.tanh(logit))


class DiSaCategoryRefinement(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.mlp(x.mean(dim=(-2, -1)).transpose(1, 2))  # (B, T, 1)
        return x * (1 + torch.tanh(logit.transpose(1, 2)[..., None, None]))


class DiSaChannelRefinement(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.mlp(x.mean(dim=(2, 3, 4)))  # (B, C)
        return x * (1 + torch.tanh(logit[:, :, None, None, None]))


STAGES = {"pixel": DiSaPixelRefinement, "category": DiSaCategoryRefinement, "channel": DiSaChannelRefinement}


class DiSaRefinementLevel(nn.Module):
    """The enabled stages, applied pixel -> category -> channel, at one level of width `channels`."""

    def __init__(self, channels: int, stages, reduction: int):
        super().__init__()
        for name in ("pixel", "category", "channel"):
            if name in stages:
                self.add_module(name, STAGES[name](channels, reduction))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.children():
            x = stage(x)
        return x


class DiSaHierarchicalRefinement(nn.Module):
    """HRM levels: `aggregation.{i}` after aggregation layer i, `decoder.{j}` after decoder stage j."""

    def __init__(self, config):
        super().__init__()
        stages, reduction = list(config.hrm_stages), config.hrm_reduction
        self.aggregation = nn.ModuleList(
            DiSaRefinementLevel(config.hidden_dim, stages, reduction)
            for _ in range(config.num_aggregation_layers if config.hrm_after_aggregation else 0)
        )
        self.decoder = nn.ModuleList(
            DiSaRefinementLevel(dim, stages, reduction) for dim in (config.decoder_dims if config.hrm_at_decoder else ())
        )

    def after_aggregation(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation[index](x) if len(self.aggregation) else x

    def after_decoder_stage(self, level: int, x: torch.Tensor) -> torch.Tensor:
        return self.decoder[level](x) if len(self.decoder) else x
