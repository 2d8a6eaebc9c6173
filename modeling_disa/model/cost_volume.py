"""Cost volume: cosine similarity between dense image embeddings and class prompt embeddings, the per-image class
cap (top-`class_cap` classes by maximum cost), and the convolutional cost embedding."""

import torch
import torch.nn.functional as F
from torch import nn


def cosine_cost_volume(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """
    Args:
        image_embeds (`(batch, C, grid, grid)`): dense image embeddings (any norm).
        text_embeds (`(batch, T, P, C)`): class prompt embeddings (any norm).

    Returns:
        `(batch, P, T, grid, grid)` cosine similarities (no temperature), CAT-Seg's ``corr``.
    """
    image_embeds = F.normalize(image_embeds, dim=1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    return torch.einsum("bchw,btpc->bpthw", image_embeds, text_embeds)


def select_top_classes(cost: torch.Tensor, class_cap: int) -> torch.Tensor:
    """
    Indices of the `class_cap` classes with the highest maximum cost over prompts and pixels, per image.

    Args:
        cost (`(batch, P, T, grid, grid)`).

    Returns:
        `(batch, class_cap)` long indices into T, in ascending class order (so the processed subset keeps the
        caller's class order).
    """
    max_cost = cost.transpose(1, 2).flatten(2).amax(dim=-1)
    indices = max_cost.topk(class_cap, dim=-1).indices
    return indices.sort(dim=-1).values


class DiSaCostEmbedding(nn.Module):
    """P-channel raw cost -> D-channel embedded cost, one conv applied to every class slice.

    Shapes: `(batch, P, T, grid, grid)` -> `(batch, D, T, grid, grid)`.
    """

    def __init__(self, num_prompts: int, hidden_dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(num_prompts, hidden_dim, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, cost: torch.Tensor) -> torch.Tensor:
        batch, prompts, classes, height, width = cost.shape
        embedded = self.conv(cost.transpose(1, 2).reshape(batch * classes, prompts, height, width))
        return embedded.reshape(batch, classes, -1, height, width).transpose(1, 2)
