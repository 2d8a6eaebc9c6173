"""Cost volume: cosine similarity between dense image embeddings and class prompt embeddings, the per-image class
cap (top-`class_cap` classes by maximum cost), and the convolutional cost embedding."""

import torch
import torch.nn.functional as F
from torch import nn


def cosine_cost_volume(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """
    Args:
        image_embeds (`(B, C, h, w)`): dense image embeddings (any norm).
        text_embeds (`(B, T, P, C)`): class prompt embeddings (any norm).

    Returns:
        `(B, P, T, h, w)` cosine similarities (no temperature), CAT-Seg's ``corr``.
    """
    image_embeds = F.normalize(image_embeds, dim=1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    return torch.einsum("bchw,btpc->bpthw", image_embeds, text_embeds)


def select_top_classes(cost: torch.Tensor, class_cap: int) -> torch.Tensor:
    """
    Indices of the `class_cap` classes with the highest maximum cost over prompts and pixels, per image.

    Args:
        cost (`(B, P, T, h, w)`).

    Returns:
        `(B, class_cap)` long indices into T, in ascending class order (so the processed subset keeps the
        caller's class order).
    """
    max_cost = cost.transpose(1, 2).flatten(2).amax(dim=-1)
    indices = max_cost.topk(class_cap, dim=-1).indices
    return indices.sort(dim=-1).values


def cap_classes(image_embeds: torch.Tensor, text: torch.Tensor, cost: torch.Tensor, class_cap: int):
    """The class cap: with more than `class_cap` classes, keep per image the `class_cap` classes of highest maximum
    cost (`select_top_classes`) and recompute the cost of those.

    Args:
        image_embeds (`(B, C, h, w)`), text (`(B, T, P, C)`), cost (`(B, P, T, h, w)`).

    Returns:
        `(text, cost, class_indices)`: `(B, K, P, C)`, `(B, P, K, h, w)` and `(B, K)` long indices (K = class_cap),
        or the inputs and None when the vocabulary fits (or `class_cap` is 0).
    """
    if not 0 < class_cap < text.shape[1]:
        return text, cost, None
    class_indices = select_top_classes(cost, class_cap)
    text = torch.gather(text, 1, class_indices[:, :, None, None].expand(-1, -1, *text.shape[-2:]))
    return text, cosine_cost_volume(image_embeds, text), class_indices


def scatter_classes(values: torch.Tensor, class_indices: torch.Tensor | None, num_classes: int, fill) -> torch.Tensor:
    """Undo the class cap on an output: `(B, K, ...)` values of the processed classes -> `(B, T, ...)`, `fill` at
    the classes that were dropped (returned as they are without a cap)."""
    if class_indices is None:
        return values
    out = values.new_full((values.shape[0], num_classes, *values.shape[2:]), fill)
    index = class_indices.view(*class_indices.shape, *([1] * (values.ndim - 2))).expand_as(values)
    return out.scatter(1, index, values)


class DiSaCostEmbedding(nn.Module):
    """P-channel raw cost -> D-channel embedded cost, one conv applied to every class slice.

    Shapes: `(B, P, T, h, w)` -> `(B, D, T, h, w)`.
    """

    def __init__(self, num_prompts: int, hidden_dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(num_prompts, hidden_dim, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, cost: torch.Tensor) -> torch.Tensor:
        batch, prompts, classes, height, width = cost.shape
        embedded = self.conv(cost.transpose(1, 2).reshape(batch * classes, prompts, height, width))
        return embedded.reshape(batch, classes, -1, height, width).transpose(1, 2)
