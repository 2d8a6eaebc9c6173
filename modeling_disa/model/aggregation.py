"""Cost aggregation: `num_aggregation_layers` layers of spatial (Swin pair) then class (linear attention)
aggregation, each optionally followed by its HRM level.

Shapes: the embedded cost volume is `(B, D, T, h, w)` throughout. With SDM, a `TokenRoute` over `(B, T, h, w)`
is the one thing threaded through the layers: it says which branch's weights (the blocks' own, or their
`background` children) every token goes through.
"""

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .class_aggregation import DiSaClassAggregation
from .hierarchical_refinement import refinement_level
from .routing import TokenRoute
from .spatial_aggregation import DiSaSpatialAggregation


class DiSaAggregationLayer(GradientCheckpointingLayer):
    """Spatial then class aggregation, then (with HRM) the refinement level: `(B, D, T, h, w)` -> same."""

    def __init__(self, config):
        super().__init__()
        self.spatial = DiSaSpatialAggregation(config)
        self.class_aggregation = DiSaClassAggregation(config)
        self.refinement = refinement_level(config, config.hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        appearance_guidance: torch.Tensor,
        text_guidance: torch.Tensor,
        pooling: tuple[int, int],
        route: TokenRoute | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x (`(B, D, T, h, w)`): embedded cost volume.
            appearance_guidance (`(B, G, h, w)`), text_guidance (`(B, T, G)`): projected CLIP features.
            pooling (`(ph, pw)`): class-aggregation pooling.
            route (`TokenRoute`, optional): SDM's branch of every token.
        """
        x = self.spatial(x, appearance_guidance, route)
        x = self.class_aggregation(x, text_guidance, pooling, route)
        if self.refinement is not None:
            # refinement levels work on class slices (B, T, D, h, w): a view, not a copy
            x = self.refinement(x.transpose(1, 2)).transpose(1, 2)
        return x


class DiSaCostAggregator(nn.Module):
    """The stack of aggregation layers: `(B, D, T, h, w)` -> same."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(DiSaAggregationLayer(config) for _ in range(config.num_aggregation_layers))

    def forward(self, x, appearance_guidance, text_guidance, pooling, route: TokenRoute | None = None):
        for layer in self.layers:
            x = layer(x, appearance_guidance, text_guidance, pooling, route)
        return x
