"""Does SDM's foreground split land on the classes? Localization statistics of the foreground tokens.

DiSa's saliency-aware disentanglement (SDM) marks, per image and class, a set of *foreground tokens* on the patch
grid (`DiSaSegmentationOutput.foreground_mask`, `(B, T, h, w)` bool, returned with `output_saliency=True`); the rest
of the grid goes through the background branch. The design assumes that a class's foreground tokens lie on the
class. :class:`SaliencyLocalization` measures whether they do, against the ground-truth label map.

**Token on a class.** The label map `(H, W)` is projected onto the `(h, w)` token grid by area averaging (the
bins of `torch.nn.functional.adaptive_avg_pool2d`: token `(i, j)` covers rows `floor(i H / h)` to
`ceil((i + 1) H / h) - 1` and the same for columns, so neighbouring bins share a row or column when `H` is not a
multiple of `h`). Pixels equal to `ignore_index` are left out. A token is **on class c** when more than half of the
scored (not ignored) pixels of its bin belong to c; a token whose bin holds no scored pixel is left out of every
count below.

**Counts** (summed over the images of a dataset; channel t of the mask and label id t name the same class):

- a *present* class of an image has at least one scored ground-truth pixel in it, an *absent* class has none;
- only the classes the model processed count: with a vocabulary larger than `config.class_cap`, the model keeps
  `class_cap` classes per image (`DiSaSegmentationOutput.class_indices`) and returns no foreground token for the
  others; pass `class_indices` to leave those (image, class) pairs out of every count below (without it, every
  class counts, so a present class dropped by the cap counts as one without foreground);
- `foreground_precision` = foreground tokens on their own class / all foreground tokens of present classes;
- `foreground_recall` = foreground tokens on their own class / tokens on a present class (the share of each
  class's ground-truth tokens that its foreground covers);
- `present_with_foreground` = share of (image, present class) pairs with at least one foreground token;
- `mean_foreground_tokens_present` / `mean_foreground_tokens_absent`: foreground tokens per (image, class) pair
  (absent classes should get none when SDM routes by predicted presence);
- `foreground_grid_share` = foreground tokens of present classes / (scored tokens x present pairs);
- `foreground_grid_share_all` = the same over every processed class, present or absent.

Ratios with an empty denominator are ``None``. Standalone: depends on torch and NumPy only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_COUNTS = (
    "images",
    "present_pairs",
    "present_with_foreground",
    "foreground_tokens",
    "foreground_on_class",
    "class_tokens",
    "scored_tokens_present",
    "absent_pairs",
    "absent_foreground_tokens",
    "scored_tokens_all",
)


def _as_labels(labels) -> torch.Tensor:
    t = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(labels))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"Expected an integer label map, got dtype {t.dtype}.")
    return t.detach().cpu().to(torch.int64)


def token_majority(
    label: torch.Tensor, class_ids: torch.Tensor, grid_size: tuple[int, int], ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens of the `(h, w)` grid lie on each class.

    Args:
        label (`(H, W)` int): ground-truth class ids, `ignore_index` for unscored pixels.
        class_ids (`(C,)` int): the classes to test.
        grid_size: the token grid `(h, w)`.

    Returns:
        on (`(C, h, w)` bool): token `(i, j)` is on class `class_ids[c]` (more than half of the scored pixels of
        its area-averaging bin belong to it), and scored (`(h, w)` bool): the bin holds at least one scored pixel.
    """
    valid = label != ignore_index
    members = (label[None] == class_ids[:, None, None]) & valid[None]
    # float64: the pooled shares a / n and v / n compare as the counts 2 a > v do (a, v small integers)
    share = F.adaptive_avg_pool2d(members.to(torch.float64), grid_size)
    scored_share = F.adaptive_avg_pool2d(valid[None].to(torch.float64), grid_size)[0]
    return 2 * share > scored_share, scored_share > 0


def processed_classes(class_indices: torch.Tensor | None, batch: int, num_classes: int) -> torch.Tensor:
    """`(B, T)` bool: the classes the model processed per image, from its `(B, K)` `class_indices` (all when
    None), refusing indices of another batch or vocabulary."""
    if class_indices is None:
        return torch.ones(batch, num_classes, dtype=torch.bool)
    if not isinstance(class_indices, torch.Tensor) or class_indices.is_floating_point() or class_indices.dim() != 2:
        raise ValueError(
            "class_indices must be the model's (B, K) integer `class_indices` output, got "
            f"{type(class_indices).__name__} {tuple(getattr(class_indices, 'shape', ()))}."
        )
    class_indices = class_indices.detach().cpu().to(torch.int64)
    if class_indices.shape[0] != batch or (
        class_indices.numel() and (int(class_indices.min()) < 0 or int(class_indices.max()) >= num_classes)
    ):
        raise ValueError(
            f"class_indices {tuple(class_indices.shape)} do not index {num_classes} classes of a batch of {batch}: "
            "pass the `class_indices` of the same forward as the other outputs."
        )
    processed = torch.zeros(batch, num_classes, dtype=torch.bool)
    return processed.scatter_(1, class_indices, True)


class SaliencyLocalization:
    """Dataset-wide localization statistics of SDM's foreground tokens (see the module docstring for the rules).

    Args:
        ignore_index: ground-truth value left out of scoring.

    Usage: ``update(outputs.foreground_mask, labels)`` per batch, then ``compute()``.
    """

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(len(_COUNTS), dtype=torch.int64)

    @torch.no_grad()
    def update(self, foreground_mask: torch.Tensor, labels, class_indices: torch.Tensor | None = None) -> None:
        """Add a batch.

        Args:
            foreground_mask (`(B, T, h, w)` bool): foreground tokens per image and class.
            labels (`(B, H, W)` int, tensor or array): ground truth; ids in `[0, T)` index the same classes as the
                mask's channels, `ignore_index` marks unscored pixels.
            class_indices (`(B, K)` int, *optional*): the classes the model processed per image under its class cap
                (`DiSaSegmentationOutput.class_indices`); the other classes are left out. None: every class.
        """
        if not isinstance(foreground_mask, torch.Tensor) or foreground_mask.dtype != torch.bool:
            raise TypeError(
                "foreground_mask must be the model's bool (B, T, h, w) `foreground_mask` "
                "(run it with output_saliency=True)."
            )
        if foreground_mask.dim() != 4:
            raise ValueError(f"foreground_mask must be (B, T, h, w), got shape {tuple(foreground_mask.shape)}.")
        labels = _as_labels(labels)
        if labels.dim() != 3 or labels.shape[0] != foreground_mask.shape[0]:
            raise ValueError(
                f"labels must be (B, H, W) with B = {foreground_mask.shape[0]} (the mask's batch), "
                f"got shape {tuple(labels.shape)}."
            )
        mask = foreground_mask.detach().cpu()
        num_classes, grid = mask.shape[1], tuple(mask.shape[-2:])
        processed = processed_classes(class_indices, mask.shape[0], num_classes)
        added = torch.zeros_like(self.counts)
        for fg, label, kept in zip(mask, labels, processed):
            valid = label != self.ignore_index
            present = torch.unique(label[valid])
            if len(present) and (int(present[0]) < 0 or int(present[-1]) >= num_classes):
                bad = present[(present < 0) | (present >= num_classes)].tolist()[:10]
                raise ValueError(
                    f"Ground truth holds class ids {bad} outside the mask's {num_classes} classes and not the "
                    f"ignore value {self.ignore_index}: the labels must index the vocabulary the model was run with."
                )
            present = present[kept[present]]
            on, scored = token_majority(label, present, grid, self.ignore_index)
            fg_present = fg[present] & scored
            absent = kept.clone()
            absent[present] = False
            per_class = fg_present.flatten(1).sum(-1)
            added += torch.stack(
                [
                    torch.tensor(1),
                    torch.tensor(len(present)),
                    (per_class > 0).sum(),
                    per_class.sum(),
                    (fg_present & on).sum(),
                    on.sum(),
                    scored.sum() * len(present),
                    absent.sum(),
                    (fg[absent] & scored).sum(),
                    scored.sum() * kept.sum(),
                ]
            )
        self.counts += added

    def merge(self, other: SaliencyLocalization) -> SaliencyLocalization:
        """Add another accumulator's counts (e.g. one per process, gathered)."""
        self.counts += other.counts
        return self

    def compute(self) -> dict[str, float | int | None]:
        c = dict(zip(_COUNTS, self.counts.tolist()))

        def ratio(num, den):
            return num / den if den else None

        return {
            "foreground_precision": ratio(c["foreground_on_class"], c["foreground_tokens"]),
            "foreground_recall": ratio(c["foreground_on_class"], c["class_tokens"]),
            "present_with_foreground": ratio(c["present_with_foreground"], c["present_pairs"]),
            "mean_foreground_tokens_present": ratio(c["foreground_tokens"], c["present_pairs"]),
            "mean_foreground_tokens_absent": ratio(c["absent_foreground_tokens"], c["absent_pairs"]),
            "foreground_grid_share": ratio(c["foreground_tokens"], c["scored_tokens_present"]),
            "foreground_grid_share_all": ratio(
                c["foreground_tokens"] + c["absent_foreground_tokens"], c["scored_tokens_all"]
            ),
            "num_images": c["images"],
            "present_pairs": c["present_pairs"],
            "absent_pairs": c["absent_pairs"],
        }


__all__ = ["SaliencyLocalization", "processed_classes", "token_majority"]
