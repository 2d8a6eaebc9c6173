"""Semantic-segmentation metrics from a dataset-wide confusion matrix (torch, any device).

``SegmentationConfusionMatrix`` accumulates one ``(K, K)`` int64 matrix (rows = ground truth, columns =
prediction) over a whole dataset, ignoring pixels whose ground truth equals ``ignore_index``. Per-process
matrices are summed with :meth:`reduce` (a callable such as ``lambda t: accelerator.reduce(t, "sum")``,
or ``torch.distributed`` when it is initialised), then :meth:`compute` derives

* ``per_category_iou``  IoU_c = TP / (TP + FP + FN)
* ``mean_iou``          mean over the classes selected by the averaging rule
* ``per_category_accuracy`` / ``mean_accuracy``  TP / GT pixels
* ``overall_accuracy`` (alias ``pixel_accuracy``) sum(TP) / all scored GT pixels
* ``frequency_weighted_iou``

Averaging rules (``rule=``):

* ``"present_in_gt"`` (default): classes with at least one ground-truth pixel. detectron2 ``main``
  ``SemSegEvaluator``; the rule behind CAT-Seg's and DiSa's published numbers.
* ``"present_in_gt_or_pred"``: classes present in the ground truth or the predictions (a predicted but
  absent class scores 0). detectron2 v0.6 wheel and ``evaluate``'s ``mean_iou``.

Per-class values of classes the rule leaves out are NaN.

Standalone: depends on torch and NumPy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

RULES = ("present_in_gt", "present_in_gt_or_pred")
ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike, device: torch.device) -> torch.Tensor:
    """Integer label map -> tensor on ``device`` (unsigned 16/32-bit become int32/int64: torch's uint16 is slow)."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if arr.dtype == np.uint16:
            arr = arr.astype(np.int32)
        elif arr.dtype in (np.uint32, np.uint64):
            arr = arr.astype(np.int64)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"Expected an integer label map, got dtype {t.dtype}.")
    if t.dtype == torch.uint16:
        t = t.to(torch.int32)
    elif t.dtype in (torch.uint32, torch.uint64):
        t = t.to(torch.int64)
    return t.to(device=device, non_blocking=True)


def _square_matrix(confusion: ArrayLike) -> np.ndarray:
    """A ``(K, K)`` confusion matrix as float64 NumPy; refuses any other shape."""
    cm = (
        confusion.detach().cpu().double().numpy()
        if isinstance(confusion, torch.Tensor)
        else np.asarray(confusion, dtype=np.float64)
    )
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"Confusion matrix must be square, got shape {cm.shape}.")
    return cm


# Checked copy: `metrics_from_confusion` in modeling_disa/evaluation/disa_mean_iou/disa_mean_iou.py is "Copied from"
# this function (the `evaluate` module must stay self-contained). Change both;
# tests/test_metrics.py::test_evaluate_module_arithmetic_is_the_package_copy checks that they agree.
def metrics_from_confusion_matrix(
    confusion: ArrayLike, rule: str = "present_in_gt", nan_to_num: float | None = None
) -> dict[str, object]:
    """Metrics from a ``(K, K)`` confusion matrix with rows = ground truth and columns = prediction."""
    if rule not in RULES:
        raise ValueError(f"Unknown mIoU averaging rule {rule!r}; choose one of {RULES}.")
    cm = _square_matrix(confusion)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = gt + pred - tp
    valid = gt > 0 if rule == "present_in_gt" else union > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(valid, tp / np.where(union > 0, union, 1), np.nan)
        acc = np.where(gt > 0, tp / np.where(gt > 0, gt, 1), np.nan)
    total = gt.sum()
    n_valid = int(valid.sum())
    mean_iou = float(np.nansum(iou) / n_valid) if n_valid else float("nan")
    n_gt = int((gt > 0).sum())
    mean_acc = float(np.nansum(acc) / n_gt) if n_gt else float("nan")
    overall = float(tp.sum() / total) if total > 0 else float("nan")
    fw = float(np.nansum(np.where(valid, iou, 0.0) * (gt / total))) if total > 0 else float("nan")
    out: dict[str, object] = {
        "mean_iou": mean_iou,
        "mean_accuracy": mean_acc,
        "overall_accuracy": overall,
        "pixel_accuracy": overall,
        "frequency_weighted_iou": fw,
        "per_category_iou": iou,
        "per_category_accuracy": acc,
        "num_valid_classes": n_valid,
        "num_pixels": int(total),
        "rule": rule,
    }
    if nan_to_num is not None:
        for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "pixel_accuracy", "frequency_weighted_iou"):
            out[key] = float(np.nan_to_num(out[key], nan=nan_to_num))
        out["per_category_iou"] = np.nan_to_num(iou, nan=nan_to_num)
        out["per_category_accuracy"] = np.nan_to_num(acc, nan=nan_to_num)
    return out


class _ProcessCounts:
    """Integer counts accumulated by this process, and the other processes' counts as of the last :meth:`reduce`.

    The process's own counts (``own``) are never replaced, only added to in place; ``reduce`` sums them afresh over
    the processes and keeps the difference apart (``others``). So updates may continue after a reduce and a repeated
    reduce counts nothing twice. Shared by :class:`SegmentationConfusionMatrix` and
    :class:`~modeling_disa.evaluation.boundary.BoundaryIoU`.

    Args:
        own: the int64 buffer this process's updates add to (may be a view of a larger buffer).
        description: what the counts are, for error messages (e.g. ``"(21, 21) confusion matrix"``).
    """

    def __init__(self, own: torch.Tensor, description: str) -> None:
        self.own = own
        self.others: torch.Tensor | None = None
        self.description = description

    @property
    def total(self) -> torch.Tensor:
        """This process's counts plus the other processes' as of the last reduce: a new tensor."""
        return self.own.clone() if self.others is None else self.own + self.others

    def reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Sum the own counts over the processes with ``reduce_fn`` (given a copy of them; returns, or fills in
        place, their sum), else ``torch.distributed.all_reduce`` when a process group is initialised, else nothing
        (single process). Refuses a result that is not an integer sum of the same shape (a gather, an average, a
        maximum) and then leaves the state as it was."""
        local = self.own.clone()
        if reduce_fn is not None:
            out = reduce_fn(local)
            total = local if out is None else out
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.SUM)
            total = local
        else:
            self.others = None
            return
        shape = tuple(self.own.shape)
        if not isinstance(total, torch.Tensor) or tuple(total.shape) != shape:
            got = tuple(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__
            raise ValueError(
                f"reduce_fn must return the sum over processes of the {self.description}, shape {shape}, got {got}; "
                "use a sum all-reduce such as `lambda t: accelerator.reduce(t, reduction='sum')`, not a gather."
            )
        if total.is_floating_point() or total.is_complex() or total.dtype == torch.bool:
            raise ValueError(
                f"reduce_fn returned dtype {total.dtype}; pixel counts must stay integers (use reduction='sum')."
            )
        others = total.to(device=self.own.device, dtype=torch.int64) - self.own
        if bool((others < 0).any()):
            raise ValueError(
                "reduce_fn returned counts below this process's own counts; it must sum over processes "
                "(reduction='sum'), not average or take a maximum."
            )
        self.others = others


class SegmentationConfusionMatrix:
    """Dataset-wide confusion matrix for semantic segmentation.

    Args:
        num_classes: number of scored classes ``K`` (e.g. 847, or 21 for PAS-20b).
        ignore_index: ground-truth value excluded from scoring (255, or 65535 for 16-bit sets).
        prediction_fold: optional ``(start, to)``; predictions ``>= start`` become ``to`` before scoring
            (PAS-20b: ``(20, 20)``). Predictions may then range over ``num_pred_classes``.
        num_pred_classes: valid prediction range before folding (defaults to ``num_classes``; 59 for PAS-20b).
        device: where the matrix lives (defaults to the device of the first update).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        prediction_fold: tuple[int, int] | None = None,
        num_pred_classes: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if num_classes <= 0:
            raise ValueError("num_classes must be positive.")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id in [0, {num_classes}).")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.prediction_fold = tuple(prediction_fold) if prediction_fold is not None else None
        self.num_pred_classes = int(num_pred_classes) if num_pred_classes is not None else self.num_classes
        if self.prediction_fold is None and self.num_pred_classes != self.num_classes:
            raise ValueError("num_pred_classes differs from num_classes but no prediction_fold maps them.")
        self._device = torch.device(device) if device is not None else None
        self._lut: torch.Tensor | None = None
        self._ones: torch.Tensor | None = None
        # This process's own counts: the first K*K bins of `_flat` (the last K collect ignored pixels), kept apart
        # from the other processes' counts by `_counts` so that update and reduce may interleave.
        self._flat: torch.Tensor | None = None
        self._counts: _ProcessCounts | None = None
        if self._device is not None:
            self.reset()

    @classmethod
    def from_dataset_definition(cls, definition, device=None) -> SegmentationConfusionMatrix:
        """Build from a :class:`modeling_disa.evaluation.dataset_definitions.DatasetDefinition` (fold and ignore
        value included)."""
        return cls(
            definition.num_scored_classes,
            definition.ignore_index,
            definition.prediction_fold,
            definition.num_classes,
            device=device,
        )

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        """Zero all counts (this process's and those gathered from other processes)."""
        k = self.num_classes
        self._flat = torch.zeros(k * k + k, dtype=torch.int64, device=self._device or "cpu")
        self._counts = _ProcessCounts(self._flat[: k * k].view(k, k), f"({k}, {k}) confusion matrix")

    @property
    def confusion(self) -> torch.Tensor | None:
        """The ``(K, K)`` int64 counts: this process's pixels plus, after :meth:`reduce`, the other processes'
        pixels as of that reduce. A new tensor (editing it leaves the counts unchanged); ``None`` before the first
        update, reduce or reset."""
        return self._counts.total if self._counts is not None else None

    @property
    def device(self) -> torch.device:
        return self._flat.device if self._flat is not None else (self._device or torch.device("cpu"))

    # ---------------------------------------------------------------- update
    def _row_lut(self, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Lookup table ground-truth value -> row offset ``v * K``; ignore -> ``K * K``; bad -> ``K * K + K``."""
        lut = self._lut
        if lut is None or lut.numel() < size or lut.device != device or lut.dtype != dtype:
            k = self.num_classes
            size = max(size, 256, self.ignore_index + 1 if self.ignore_index >= 0 else 0)
            lut = torch.full((size,), k * k + k, dtype=dtype, device=device)
            lut[:k] = torch.arange(k, device=device, dtype=dtype) * k
            if self.ignore_index >= 0:
                lut[self.ignore_index] = k * k
            self._lut = lut
        return lut

    def _raise_bad_target(self, t: torch.Tensor) -> None:
        k = self.num_classes
        bad = (t != self.ignore_index) & ((t < 0) | (t >= k))
        vals = torch.unique(t[bad])[:10].tolist()
        raise ValueError(
            f"Ground truth holds values {vals} outside [0, {k}) that are not the ignore value "
            f"{self.ignore_index}. Wrong ignore_index, or a label map from another dataset?"
        )

    @torch.no_grad()
    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one map ``(H, W)`` or a batch ``(B, H, W)`` of predicted class ids and ground truth.

        Raises ``ValueError`` for a shape mismatch, for ground-truth values that are neither a class id nor
        the ignore value, and for predicted ids outside the class range.
        """
        if self._flat is None:
            self._device = pred.device if isinstance(pred, torch.Tensor) else torch.device("cpu")
            self.reset()
        device = self._flat.device
        k = self.num_classes
        p = _as_tensor(pred, device)
        t = _as_tensor(target, device)
        if p.shape != t.shape:
            raise ValueError(
                f"Prediction shape {tuple(p.shape)} does not match label shape {tuple(t.shape)}; resize the "
                "prediction to the label size (bilinear on probabilities before argmax) first."
            )
        if p.numel() == 0:
            return
        # predictions: one min/max pass
        hi = self.num_pred_classes
        pmin, pmax = torch.aminmax(p)
        if int(pmin) < 0 or int(pmax) >= hi:
            bad = (p < 0) | (p >= hi)
            raise ValueError(f"Predictions hold class ids {torch.unique(p[bad])[:10].tolist()} outside [0, {hi}).")
        work = torch.int64  # one dtype throughout: mixed int32/int64 arithmetic is ~40x slower on CPU
        p = p.to(work)
        if self.prediction_fold is not None:
            start, to = self.prediction_fold
            p = p.clamp_max(to) if start == to else torch.where(p >= start, torch.full_like(p, to), p)
        tmin, tmax = torch.aminmax(t)
        tmin, tmax = int(tmin), int(tmax)
        if tmin >= 0 and tmax < (1 << 20):
            # one gather: value -> row offset (ignore and invalid values go to bins >= K*K)
            lut = self._row_lut(tmax + 1, device, work)
            tt = t.reshape(-1)
            rows = lut.index_select(0, tt if tt.dtype in (torch.int32, torch.int64) else tt.to(work)).view(t.shape)
        else:
            if tmin < 0 and tmin != self.ignore_index or tmax >= (1 << 20) and tmax != self.ignore_index:
                self._raise_bad_target(t)
            valid = t != self.ignore_index
            if bool(((t < 0) | (t >= k))[valid].any()):
                self._raise_bad_target(t)
            rows = torch.where(valid, t.to(work) * k, torch.full_like(t, k * k, dtype=work))
        if int(rows.max()) >= k * k + k:  # some ground-truth value was mapped to the "bad" offset
            self._raise_bad_target(t)
        idx = (rows + p).reshape(-1)
        # Accumulate in place into a persistent buffer (no per-call K*K allocation): bins [K*K, K*K+K) collect
        # the ignored pixels and are discarded.
        n = idx.numel()
        if self._ones is None or self._ones.numel() < n or self._ones.device != device:
            self._ones = torch.ones(max(n, 1 << 18), dtype=torch.int64, device=device)
        self._flat.scatter_add_(0, idx, self._ones[:n])

    # ---------------------------------------------------------------- distributed
    def reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SegmentationConfusionMatrix:
        """Sum the matrix over processes; afterwards :attr:`confusion` and :meth:`compute` cover all processes.

        ``reduce_fn`` receives a copy of this process's own ``(K, K)`` counts and returns (or fills in place)
        their sum over all processes, e.g. ``lambda t: accelerator.reduce(t, reduction="sum")``. Without it,
        ``torch.distributed.all_reduce`` is used when a process group is initialised; otherwise the run is
        single-process and nothing changes. Every call sums each process's own counts afresh, so updates may
        continue after a reduce and a repeated reduce counts no pixel twice (every process must call it the same
        number of times, as for any collective).
        """
        if self._flat is None:
            self.reset()
        self._counts.reduce(reduce_fn)
        return self

    def reduce_with_accelerator(self, accelerator) -> SegmentationConfusionMatrix:
        return self.reduce(lambda t: accelerator.reduce(t, reduction="sum"))

    def merge(self, other: SegmentationConfusionMatrix) -> SegmentationConfusionMatrix:
        """Add ``other``'s counts to this process's own counts (a later :meth:`reduce` sums them with the rest)."""
        if other.num_classes != self.num_classes:
            raise ValueError("Cannot merge confusion matrices of different sizes.")
        if self._flat is None:
            self.reset()
        theirs = other.confusion
        if theirs is not None:
            self._counts.own += theirs.to(self._counts.own.device)
        return self

    # ---------------------------------------------------------------- results
    def compute(self, rule: str = "present_in_gt", nan_to_num: float | None = None) -> dict[str, object]:
        if self._flat is None:
            self.reset()
        return metrics_from_confusion_matrix(self.confusion, rule=rule, nan_to_num=nan_to_num)

    def state_dict(self) -> dict[str, torch.Tensor]:
        confusion = self.confusion
        return {"confusion": confusion.cpu() if confusion is not None else None}


def results_table_row(results: dict[str, object], class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Flatten :meth:`compute` output into JSON-friendly floats (percent) with per-class IoU by name."""
    row = {
        "mIoU": 100.0 * float(results["mean_iou"]),
        "mAcc": 100.0 * float(results["mean_accuracy"]),
        "pAcc": 100.0 * float(results["overall_accuracy"]),
        "fwIoU": 100.0 * float(results["frequency_weighted_iou"]),
    }
    if class_names is not None:
        ious = results["per_category_iou"]
        row["per_class_iou"] = {n: (None if np.isnan(v) else 100.0 * float(v)) for n, v in zip(class_names, ious)}
    return row


# Checked copy: `foreground_bias_from_confusion` in modeling_disa/evaluation/disa_mean_iou/disa_mean_iou.py is "Copied
# from" this function; tests/test_metrics.py::test_evaluate_module_foreground_bias_is_the_package_copy checks them.
def foreground_bias_rates(confusion: ArrayLike, is_thing: ArrayLike) -> dict[str, float | int]:
    """Foreground bias from a ``(K, K)`` confusion matrix (rows = ground truth, columns = prediction).

    Args:
        confusion: dataset-wide confusion matrix over the scored (non-ignored) pixels.
        is_thing: boolean ``(K,)``, True for a thing (object) class, False for a stuff / background class.

    Returns:
        ``stuff_predicted_as_thing``: share of stuff / background ground-truth pixels predicted as a thing class;
        ``thing_predicted_as_stuff``: share of thing ground-truth pixels predicted as a stuff class (NaN where the
        ground truth holds no pixel of that kind); ``num_stuff_pixels`` and ``num_thing_pixels``.
    """
    cm = _square_matrix(confusion)
    thing = is_thing.detach().cpu().numpy() if isinstance(is_thing, torch.Tensor) else np.asarray(is_thing)
    if thing.dtype != np.bool_ or thing.shape != (cm.shape[0],):
        raise ValueError(
            f"is_thing must be a boolean vector of one entry per class ({cm.shape[0]}), got dtype {thing.dtype} and "
            f"shape {thing.shape}; build it from thing class ids with e.g. np.isin(np.arange(K), thing_ids)."
        )
    stuff = ~thing
    n_stuff = cm[stuff].sum()
    n_thing = cm[thing].sum()
    stuff_as_thing = cm[np.ix_(stuff, thing)].sum()
    thing_as_stuff = cm[np.ix_(thing, stuff)].sum()
    return {
        "stuff_predicted_as_thing": float(stuff_as_thing / n_stuff) if n_stuff > 0 else float("nan"),
        "thing_predicted_as_stuff": float(thing_as_stuff / n_thing) if n_thing > 0 else float("nan"),
        "num_stuff_pixels": int(n_stuff),
        "num_thing_pixels": int(n_thing),
    }


__all__ = [
    "RULES",
    "SegmentationConfusionMatrix",
    "foreground_bias_rates",
    "metrics_from_confusion_matrix",
    "results_table_row",
]
