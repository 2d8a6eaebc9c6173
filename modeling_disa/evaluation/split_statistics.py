"""Is SDM's split healthy? Presence and foreground statistics of a DiSa model's forward passes.

SDM predicts, per image and class, a presence probability (`DiSaSegmentationOutput.itm_logits`, `(B, T)`) and a set
of foreground tokens on the patch grid (`foreground_mask`, `(B, T, h, w)` bool, returned with
`output_saliency=True`). A run whose split drifts away from the classes loses the gain SDM is meant to bring, while
its loss can look normal; these statistics, against the ground truth of the same batches, show the drift:

- `presence_present` / `presence_absent`: mean predicted presence probability (sigmoid of `itm_logits`) over the
  (image, class) pairs whose class is present (at least one scored ground-truth pixel) / absent;
- the foreground statistics of :class:`~modeling_disa.evaluation.saliency.SaliencyLocalization`, with its token
  rule: `present_with_foreground` (share of present classes with any foreground token), `foreground_precision`
  (share of foreground tokens on their own class), `foreground_recall`, `foreground_grid_share` (share of the grid
  marked foreground, over present classes) and `foreground_grid_share_all` (over every class),
  `mean_foreground_tokens_present` / `mean_foreground_tokens_absent` (foreground tokens per present / absent class);
- `present_pruned`: share of present (image, class) pairs that the class cap dropped.

**Class cap.** With a vocabulary larger than `config.class_cap`, the model processes `class_cap` classes per image
(`class_indices`); the others get no foreground token and the presence logit `config.pruned_class_logit`, which are
not predictions. Every statistic above except `present_pruned` counts the processed (image, class) pairs only;
`present_pruned` says how many present classes that leaves out.

Ratios with an empty denominator are ``None``. The counts add up across batches and processes (`to_tensor`, summed,
then `from_tensor`), so a dataset's or a logging window's statistics do not depend on how it was split.
"""

from __future__ import annotations

import torch

from .saliency import SaliencyLocalization, _as_labels, processed_classes

_PRESENCE_COUNTS = ("present_pairs", "present_probability_sum", "absent_pairs", "absent_probability_sum", "pruned")


class SplitStatistics:
    """Presence and foreground-split statistics of SDM, accumulated over batches (see the module docstring).

    Args:
        ignore_index: ground-truth value left out of scoring.

    Usage: ``update(outputs.itm_logits, outputs.foreground_mask, labels, outputs.class_indices)`` per batch of a
    forward run with `output_saliency=True`, then ``compute()``.
    """

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index = int(ignore_index)
        self.localization = SaliencyLocalization(self.ignore_index)
        self.reset()

    def reset(self) -> None:
        self.presence = torch.zeros(len(_PRESENCE_COUNTS), dtype=torch.float64)
        self.localization.reset()

    @torch.no_grad()
    def update(
        self,
        itm_logits: torch.Tensor,
        foreground_mask: torch.Tensor,
        labels,
        class_indices: torch.Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            itm_logits (`(B, T)` float): the model's presence logits (`DiSaSegmentationOutput.itm_logits`).
            foreground_mask (`(B, T, h, w)` bool): its foreground tokens (`foreground_mask`, `output_saliency=True`).
            labels (`(B, H, W)` int, tensor or array): ground truth indexing the same T classes, `ignore_index` for
                unscored pixels.
            class_indices (`(B, K)` int, *optional*): the model's `class_indices` (the classes kept by its class
                cap); None when it processed every class.
        """
        if not isinstance(itm_logits, torch.Tensor) or not itm_logits.is_floating_point() or itm_logits.dim() != 2:
            raise ValueError(
                "itm_logits must be the model's (B, T) float presence logits (a model with use_sdm), got "
                f"{type(itm_logits).__name__} {tuple(getattr(itm_logits, 'shape', ()))}."
            )
        if not isinstance(foreground_mask, torch.Tensor) or tuple(foreground_mask.shape[:2]) != tuple(
            itm_logits.shape
        ):
            raise ValueError(
                f"foreground_mask must be (B, T, h, w) with (B, T) = {tuple(itm_logits.shape)} (the itm_logits' "
                f"shape), got {tuple(getattr(foreground_mask, 'shape', ()))}: run the forward with "
                "output_saliency=True."
            )
        # first: it checks the mask, the labels and the class ids, before anything is counted
        self.localization.update(foreground_mask, labels, class_indices)
        batch, num_classes = itm_logits.shape
        labels = _as_labels(labels)
        processed = processed_classes(class_indices, batch, num_classes)
        present = torch.zeros(batch, num_classes, dtype=torch.bool)
        valid = labels != self.ignore_index
        for image, (label, mask) in enumerate(zip(labels, valid)):
            present[image, torch.unique(label[mask])] = True
        probability = itm_logits.detach().to(device="cpu", dtype=torch.float64).sigmoid()
        present_kept, absent_kept = present & processed, ~present & processed
        self.presence += torch.stack(
            [
                present_kept.sum().to(torch.float64),
                probability[present_kept].sum(),
                absent_kept.sum().to(torch.float64),
                probability[absent_kept].sum(),
                (present & ~processed).sum().to(torch.float64),
            ]
        )

    def to_tensor(self) -> torch.Tensor:
        """All counts as one float64 vector (exact for counts below 2**53), to sum across processes."""
        return torch.cat([self.presence, self.localization.counts.to(torch.float64)])

    @classmethod
    def from_tensor(cls, values: torch.Tensor, ignore_index: int = 255) -> SplitStatistics:
        """The accumulator holding `values` (`to_tensor` of one, or the sum of several)."""
        out = cls(ignore_index)
        values = values.detach().to(device="cpu", dtype=torch.float64)
        if values.shape != out.to_tensor().shape:
            expected = out.to_tensor().numel()
            raise ValueError(f"expected the {expected} counts of SplitStatistics.to_tensor, got {tuple(values.shape)}")
        split = len(_PRESENCE_COUNTS)
        out.presence = values[:split].clone()
        out.localization.counts = values[split:].round().to(torch.int64)
        return out

    def merge(self, other: SplitStatistics) -> SplitStatistics:
        """Add another accumulator's counts."""
        self.presence += other.presence
        self.localization.merge(other.localization)
        return self

    def compute(self) -> dict[str, float | int | None]:
        c = dict(zip(_PRESENCE_COUNTS, self.presence.tolist()))

        def ratio(num, den):
            return num / den if den else None

        localization = self.localization.compute()
        return {
            "presence_present": ratio(c["present_probability_sum"], c["present_pairs"]),
            "presence_absent": ratio(c["absent_probability_sum"], c["absent_pairs"]),
            **{key: value for key, value in localization.items() if key not in ("present_pairs", "absent_pairs")},
            "present_pruned": ratio(c["pruned"], c["present_pairs"] + c["pruned"]),
            "present_pairs": localization["present_pairs"],
            "absent_pairs": localization["absent_pairs"],
        }


def split_statistics(outputs, labels, ignore_index: int = 255) -> dict[str, float | int | None]:
    """The statistics of one forward pass: `outputs` is the `DiSaSegmentationOutput` of a model with SDM run with
    `output_saliency=True`, `labels` `(B, H, W)` its batch's ground truth (see :class:`SplitStatistics`)."""
    if getattr(outputs, "itm_logits", None) is None or getattr(outputs, "foreground_mask", None) is None:
        raise ValueError(
            "split_statistics needs the itm_logits and foreground_mask of a model with use_sdm=True, run with "
            "output_saliency=True (and return_dict=True)."
        )
    statistics = SplitStatistics(ignore_index)
    statistics.update(outputs.itm_logits, outputs.foreground_mask, labels, outputs.class_indices)
    return statistics.compute()


__all__ = ["SplitStatistics", "split_statistics"]
