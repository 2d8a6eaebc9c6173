"""Guided upsampling decoder: two transposed-conv stages (grid -> 2x -> 4x) on every class slice, each fused with
projected mid-layer CLIP features, and a 3x3 head giving one logit map per class."""

import torch
from torch import nn

from .hierarchical_refinement import refinement_level


class DiSaGuidanceUpsampler(nn.Module):
    """CLIP mid-layer features `(B, C_vision, h, w)` -> decoder guidance at 2x and 4x.

    CAT-Seg's meta-architecture `upsample1` (k=s=2, to 256 ch) and `upsample2` (k=s=4, to 128 ch), followed by the
    aggregator's 3x3 conv + ReLU projections (to 32 and 16 ch).
    """

    def __init__(self, config):
        super().__init__()
        vision_dim = config.vision_config.hidden_size
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(vision_dim, dim, kernel_size=2 ** (i + 1), stride=2 ** (i + 1))
            for i, dim in enumerate(config.decoder_guidance_dims)
        )
        self.projection = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, proj, kernel_size=3, padding=1), nn.ReLU())
            for dim, proj in zip(config.decoder_guidance_dims, config.decoder_guidance_proj_dims)
        )

    def forward(self, guidance_features: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [proj(up(f)) for up, proj, f in zip(self.upsample, self.projection, guidance_features)]


class DiSaDoubleConv(nn.Module):
    """(3x3 conv without bias -> GroupNorm -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int, group_channels: int):
        super().__init__()
        groups = out_channels // group_channels
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DiSaUpBlock(nn.Module):
    """2x transposed conv to `in - guidance` channels, concat guidance, DoubleConv to `out` channels, then the
    optional HRM level (`refinement`)."""

    def __init__(
        self, in_channels: int, out_channels: int, guidance_channels: int, group_channels: int, refinement=None
    ):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DiSaDoubleConv(in_channels, out_channels, group_channels)
        self.refinement = refinement

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, classes: int) -> torch.Tensor:
        """x `(B*T, in, h, w)`, guidance `(B, g, 2h, 2w)` -> `(B*T, out, 2h, 2w)`."""
        x = self.up(x)
        guidance = guidance.repeat_interleave(x.shape[0] // guidance.shape[0], dim=0)
        x = self.conv(torch.cat([x, guidance], dim=1))
        if self.refinement is not None:
            x = self.refinement(x.unflatten(0, (-1, classes))).flatten(0, 1)
        return x


class DiSaDecoder(nn.Module):
    """`(B, D, T, h, w)` + guidance -> per-class logits `(B, T, 4h, 4w)`."""

    def __init__(self, config):
        super().__init__()
        dims, proj = config.decoder_dims, config.decoder_guidance_proj_dims
        group = config.decoder_group_norm_channels
        self.up1 = DiSaUpBlock(config.hidden_dim, dims[0], proj[0], group, refinement_level(config, dims[0]))
        self.up2 = DiSaUpBlock(dims[0], dims[1], proj[1], group, refinement_level(config, dims[1]))
        self.head = nn.Conv2d(dims[1], 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, guidance: list[torch.Tensor]) -> torch.Tensor:
        batch, dim, classes, height, width = x.shape
        h = x.transpose(1, 2).reshape(batch * classes, dim, height, width)
        h = self.up1(h, guidance[0], classes)
        h = self.up2(h, guidance[1], classes)
        logits = self.head(h)
        return logits.view(batch, classes, *logits.shape[-2:])
