"""Boundary IoU for semantic segmentation (Cheng et al., CVPR 2021), accumulated over a dataset (torch, any device).

For a class ``c`` with ground-truth mask ``G`` and predicted mask ``P`` in one image, ``G_d`` is the set of pixels
within distance ``d`` of ``G``'s contour and ``P_d`` the same for ``P``;

    Boundary IoU_c = |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|

with ``d = max(1, int(round(dilation_ratio * image_diagonal)))`` (``dilation_ratio`` 0.02 by default). The mask
boundary follows the official ``boundary_iou`` API (``mask_to_boundary``): the mask is padded by one pixel of
background (so an image border cuts a contour), eroded ``d`` times with a 3x3 square, and the boundary is the mask
minus its erosion. ``d`` erosions with a 3x3 square equal one erosion with a ``(2d + 1)`` square, so a pixel of
class ``c`` lies on ``c``'s boundary exactly when its ``(2d + 1)`` window (clipped to the padded image) holds
another value: the maximum and the minimum label over the window differ. That needs two separable max-pools per
label map and covers every class of the image at once.

Semantic segmentation, like :class:`~modeling_disa.evaluation.metrics.SegmentationConfusionMatrix`: pixels whose
ground truth is ``ignore_index`` count in neither ``G`` nor ``P`` (both masks are restricted to the scored pixels
before their boundaries are taken, so a prediction equal to the ground truth scores 1); per class, the boundary
intersection and union are summed over the images, IoU is taken per class, and the mean runs over the classes
present in the ground truth (``rule="present_in_gt"``) or in the ground truth or the prediction.

Standalone: depends on torch and NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import RULES, ArrayLike, _as_tensor, _ProcessCounts

DEFAULT_DILATION_RATIO = 0.02
_FLOAT32_EXACT = 1 << 24  # labels go through max-pooling as float32, exact up to 2**24


def boundary_dilation(height: int, width: int, dilation_ratio: float = DEFAULT_DILATION_RATIO) -> int:
    """Boundary width ``d`` in pixels for an image of ``height x width``, rounded as the official code."""
    return max(1, int(round(dilation_ratio * math.sqrt(height**2 + width**2))))


def boundary_labels(labels: torch.Tensor, dilation: int, outside: int) -> torch.Tensor:
    """Label map reduced to its class boundaries.

    Args:
        labels: ``(B, H, W)`` integer class ids; pixels that belong to no class hold ``outside``.
        dilation: boundary width ``d`` in pixels.
        outside: value of the pixels outside every class mask (also the one-pixel padding).

    Returns:
        ``(B, H, W)`` int64: a pixel's class id where it lies on its class mask's boundary (``mask - erosion``
        of the official ``mask_to_boundary``), ``outside`` elsewhere.
    """
    x = F.pad(labels.to(torch.float32), (1, 1, 1, 1), value=float(outside)).unsqueeze(1)
    k = 2 * dilation + 1

    def window_max(t: torch.Tensor) -> torch.Tensor:
        # max_pool2d pads with -inf: the window is clipped to the padded image, as cv2.erode's default border
        t = F.max_pool2d(t, (1, k), stride=1, padding=(0, dilation))
        return F.max_pool2d(t, (k, 1), stride=1, padding=(dilation, 0))

    on_edge = (window_max(x) != -window_max(-x))[:, 0, 1:-1, 1:-1]
    labels = labels.to(torch.int64)
    return torch.where(on_edge, labels, torch.full_like(labels, outside))


def boundary_iou_from_counts(
    intersection: ArrayLike,
    gt_area: ArrayLike,
    pred_area: ArrayLike,
    rule: str = "present_in_gt",
    nan_to_num: float | None = None,
) -> dict[str, object]:
    """Per-class and mean Boundary IoU from per-class boundary intersection and boundary areas ``(K,)``.

    A class is present in the ground truth exactly when its ground-truth boundary is not empty (every non-empty
    mask has a boundary), so the averaging rules read the boundary areas. Classes the rule leaves out are NaN.
    """
    if rule not in RULES:
        raise ValueError(f"Unknown mIoU averaging rule {rule!r}; choose one of {RULES}.")
    inter, gt, pred = (
        x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
        for x in (intersection, gt_area, pred_area)
    )
    union = gt + pred - inter
    valid = gt > 0 if rule == "present_in_gt" else union > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(valid, inter / np.where(union > 0, union, 1), np.nan)
    n_valid = int(valid.sum())
    mean = float(np.nansum(iou) / n_valid) if n_valid else float("nan")
    if nan_to_num is not None:
        mean = float(np.nan_to_num(mean, nan=nan_to_num))
        iou = np.nan_to_num(iou, nan=nan_to_num)
    return {
        "mean_boundary_iou": mean,
        "per_category_boundary_iou": iou,
        "num_valid_classes": n_valid,
        "rule": rule,
    }


class BoundaryIoU:
    """Dataset-wide Boundary IoU for semantic segmentation (same label conventions as ``SegmentationConfusionMatrix``).

    Args:
        num_classes: number of scored classes ``K``.
        ignore_index: ground-truth value excluded from scoring.
        dilation_ratio: boundary width as a fraction of the image diagonal (0.02 in the Boundary IoU paper); the
            width is at least one pixel.
        prediction_fold: optional ``(start, to)``; predictions ``>= start`` become ``to`` before the boundaries are
            taken (PAS-20b: ``(20, 20)``).
        num_pred_classes: valid prediction range before folding (defaults to ``num_classes``).
        device: where the counts live (defaults to the device of the first update).

    State: ``counts`` ``(3, K)`` int64, rows = boundary intersection, ground-truth boundary area, predicted boundary
    area, summed over the images (this process's and, after :meth:`reduce`, the other processes' as of that reduce).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        dilation_ratio: float = DEFAULT_DILATION_RATIO,
        prediction_fold: tuple[int, int] | None = None,
        num_pred_classes: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if num_classes <= 0:
            raise ValueError("num_classes must be positive.")
        if num_classes >= _FLOAT32_EXACT:
            raise ValueError(
                f"num_classes {num_classes} is too large for Boundary IoU (at most {_FLOAT32_EXACT - 1})."
            )
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id in [0, {num_classes}).")
        if not (math.isfinite(dilation_ratio) and dilation_ratio > 0):
            raise ValueError(
                f"dilation_ratio must be a positive fraction of the image diagonal, got {dilation_ratio}."
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.dilation_ratio = float(dilation_ratio)
        self.prediction_fold = tuple(prediction_fold) if prediction_fold is not None else None
        self.num_pred_classes = int(num_pred_classes) if num_pred_classes is not None else self.num_classes
        if self.prediction_fold is None and self.num_pred_classes != self.num_classes:
            raise ValueError("num_pred_classes differs from num_classes but no prediction_fold maps them.")
        if self.prediction_fold is not None and not 0 <= self.prediction_fold[1] < self.num_classes:
            raise ValueError(
                f"prediction_fold target {self.prediction_fold[1]} is not a class id in [0, {num_classes})."
            )
        self._device = torch.device(device) if device is not None else None
        # this process's own counts apart from the other processes' (see `_ProcessCounts`), so that update and
        # reduce may interleave
        self._counts: _ProcessCounts | None = None
        if self._device is not None:
            self.reset()

    @classmethod
    def from_dataset_definition(
        cls, definition, dilation_ratio: float = DEFAULT_DILATION_RATIO, device=None
    ) -> BoundaryIoU:
        """Build from a :class:`modeling_disa.evaluation.dataset_definitions.DatasetDefinition` (fold and ignore
        value included)."""
        return cls(
            definition.num_scored_classes,
            definition.ignore_index,
            dilation_ratio,
            definition.prediction_fold,
            definition.num_classes,
            device=device,
        )

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        """Zero all counts (this process's and those gathered from other processes)."""
        own = torch.zeros(3, self.num_classes, dtype=torch.int64, device=self._device or "cpu")
        self._counts = _ProcessCounts(own, f"(3, {self.num_classes}) Boundary IoU counts")

    @property
    def counts(self) -> torch.Tensor | None:
        """The ``(3, K)`` int64 counts: this process's plus, after :meth:`reduce`, the other processes' as of that
        reduce. A new tensor (editing it leaves the counts unchanged); ``None`` before the first update, reduce or
        reset."""
        return self._counts.total if self._counts is not None else None

    @property
    def device(self) -> torch.device:
        return self._counts.own.device if self._counts is not None else (self._device or torch.device("cpu"))

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one map ``(H, W)`` or a batch ``(B, H, W)`` of same-size maps of predicted class ids and ground truth.

        ``d`` comes from each map's own size. Raises ``ValueError`` for a shape mismatch, for ground-truth values
        that are neither a class id nor the ignore value, and for predicted ids outside the class range.
        """
        if self._counts is None:
            self._device = pred.device if isinstance(pred, torch.Tensor) else torch.device("cpu")
            self.reset()
        own = self._counts.own
        device = own.device
        k = self.num_classes
        p = _as_tensor(pred, device).to(torch.int64)
        t = _as_tensor(target, device).to(torch.int64)
        if p.shape != t.shape:
            raise ValueError(
                f"Prediction shape {tuple(p.shape)} does not match label shape {tuple(t.shape)}; resize the "
                "prediction to the label size (bilinear on probabilities before argmax) first."
            )
        if p.dim() not in (2, 3):
            raise ValueError(f"Expected label maps of shape (H, W) or (B, H, W), got {tuple(p.shape)}.")
        if p.numel() == 0:
            return
        if p.dim() == 2:
            p, t = p[None], t[None]
        bad_p = (p < 0) | (p >= self.num_pred_classes)
        if bool(bad_p.any()):
            raise ValueError(
                f"Predictions hold class ids {torch.unique(p[bad_p])[:10].tolist()} outside "
                f"[0, {self.num_pred_classes})."
            )
        valid = t != self.ignore_index
        bad_t = valid & ((t < 0) | (t >= k))
        if bool(bad_t.any()):
            raise ValueError(
                f"Ground truth holds values {torch.unique(t[bad_t])[:10].tolist()} outside [0, {k}) that are not "
                f"the ignore value {self.ignore_index}. Wrong ignore_index, or a label map from another dataset?"
            )
        if self.prediction_fold is not None:
            start, to = self.prediction_fold
            p = torch.where(p >= start, torch.full_like(p, to), p)
        # ignored pixels belong to no class mask, in the ground truth and in the prediction alike
        outside = torch.full_like(t, k)
        t = torch.where(valid, t, outside)
        p = torch.where(valid, p, outside)
        d = boundary_dilation(t.shape[-2], t.shape[-1], self.dilation_ratio)
        gb = boundary_labels(t, d, k).reshape(-1)
        pb = boundary_labels(p, d, k).reshape(-1)
        # bin K collects the pixels on no boundary and is dropped
        own[0] += torch.bincount(torch.where(gb == pb, gb, k), minlength=k + 1)[:k]
        own[1] += torch.bincount(gb, minlength=k + 1)[:k]
        own[2] += torch.bincount(pb, minlength=k + 1)[:k]

    # ---------------------------------------------------------------- distributed
    def reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> BoundaryIoU:
        """Sum the counts over processes; afterwards :attr:`counts` and :meth:`compute` cover all processes.

        ``reduce_fn`` receives a copy of this process's own ``(3, K)`` counts and returns (or fills in place) their
        sum over all processes, e.g. ``lambda t: accelerator.reduce(t, reduction="sum")``. Without it,
        ``torch.distributed.all_reduce`` is used when a process group is initialised; otherwise the run is
        single-process and nothing changes. Every call sums each process's own counts afresh, so updates may
        continue after a reduce and a repeated reduce counts no pixel twice (every process must call it the same
        number of times, as for any collective). A ``reduce_fn`` that gathers, averages or takes a maximum is
        refused.
        """
        if self._counts is None:
            self.reset()
        self._counts.reduce(reduce_fn)
        return self

    def reduce_with_accelerator(self, accelerator) -> BoundaryIoU:
        return self.reduce(lambda t: accelerator.reduce(t, reduction="sum"))

    def merge(self, other: BoundaryIoU) -> BoundaryIoU:
        """Add ``other``'s counts to this process's own counts (a later :meth:`reduce` sums them with the rest)."""
        if other.num_classes != self.num_classes:
            raise ValueError("Cannot merge Boundary IoU counts of different class counts.")
        if other.dilation_ratio != self.dilation_ratio:
            raise ValueError(
                f"Cannot merge Boundary IoU counts of dilation ratios {self.dilation_ratio} and "
                f"{other.dilation_ratio}."
            )
        if self._counts is None:
            self.reset()
        theirs = other.counts
        if theirs is not None:
            self._counts.own += theirs.to(self._counts.own.device)
        return self

    # ---------------------------------------------------------------- results
    def compute(self, rule: str = "present_in_gt", nan_to_num: float | None = None) -> dict[str, object]:
        """``mean_boundary_iou``, ``per_category_boundary_iou`` ``(K,)``, ``num_valid_classes``, ``rule`` and
        ``dilation_ratio``."""
        if self._counts is None:
            self.reset()
        counts = self.counts
        out = boundary_iou_from_counts(counts[0], counts[1], counts[2], rule, nan_to_num)
        out["dilation_ratio"] = self.dilation_ratio
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        counts = self.counts
        return {"counts": counts.cpu() if counts is not None else None}


__all__ = [
    "DEFAULT_DILATION_RATIO",
    "BoundaryIoU",
    "boundary_dilation",
    "boundary_iou_from_counts",
    "boundary_labels",
]
