"""DiSa mean IoU: ``evaluate`` metric with the interface of ``mean_iou`` and a confusion-matrix core.

Load it offline from its folder::

    import evaluate
    metric = evaluate.load("modeling_disa/evaluation/disa_mean_iou")
    metric.compute(predictions=preds, references=labels, num_labels=150, ignore_index=255)

Same arguments and outputs as ``evaluate-metric/mean_iou``; the core accumulates one ``(K, K)`` confusion
matrix (rows = ground truth, columns = prediction) with ``np.bincount`` instead of three histograms per map.
Extra keyword ``miou_rule``:

* ``"present_in_gt_or_pred"`` (default): mean over classes present in the ground truth or the predictions,
  the ``mean_iou`` rule (and detectron2 v0.6);
* ``"present_in_gt"``: mean over classes present in the ground truth, the rule of detectron2 ``main`` used by
  CAT-Seg / DiSa's published numbers (per-class IoU of the other classes is NaN).

Optional measures (off by default):

* ``boundary_iou=True``: Boundary IoU (Cheng et al., CVPR 2021), IoU of the per-class boundary regions (mask pixels
  within ``d = boundary_dilation_ratio x image diagonal`` of the mask's contour, 0.02 by default, as the official
  ``boundary_iou`` API), summed over the maps and averaged with ``miou_rule``; ignored pixels belong to no mask;
* ``thing_classes=[ids]``: the foreground-bias rates, the share of stuff / background pixels (every class not in
  ``thing_classes``) predicted as a thing class, and the reverse.

Unlike ``mean_iou``, values that cannot be scored raise ``ValueError`` instead of silently falling out of the
histograms: a ground-truth value outside ``[0, num_labels)`` that is not ``ignore_index``, a prediction outside
``[0, num_labels)``, or a prediction/reference size mismatch.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Mean Intersection-over-Union for semantic segmentation, computed from a dataset-wide confusion
matrix. Interface-compatible with `mean_iou`; adds the `miou_rule` option for the classes-present-in-ground-truth
averaging used in open-vocabulary segmentation evaluation (CAT-Seg, DiSa)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted label maps, each `(height, width)`; sizes may differ between maps.
    references (`List[ndarray]`): ground-truth label maps, same sizes as the predictions.
    num_labels (`int`): number of classes.
    ignore_index (`int`): ground-truth value that is not scored (e.g. 255, or 65535 for 16-bit label maps).
    nan_to_num (`float`, optional): replaces NaN in the results.
    label_map (`dict`, optional): old id -> new id, applied to the references.
    reduce_labels (`bool`, optional, default False): references 0 -> 255, others minus 1 (255 stays 255).
    miou_rule (`str`, optional): "present_in_gt_or_pred" (default, as mean_iou) or "present_in_gt".
    boundary_iou (`bool`, optional, default False): also compute Boundary IoU.
    boundary_dilation_ratio (`float`, optional): boundary width as a fraction of the image diagonal (0.02 when
        boundary_iou is on; refused without it).
    thing_classes (`List[int]`, optional): ids of the thing classes; adds the foreground-bias rates.
Returns:
    `Dict`: mean_iou, mean_accuracy, overall_accuracy (floats), per_category_iou, per_category_accuracy
    (arrays of shape (num_labels,)); with boundary_iou: mean_boundary_iou, per_category_boundary_iou; with
    thing_classes: stuff_predicted_as_thing, thing_predicted_as_stuff (floats, NaN without pixels of that kind).
Examples:
    >>> import numpy as np, evaluate
    >>> metric = evaluate.load("modeling_disa/evaluation/disa_mean_iou")
    >>> pred = [np.array([[0, 1], [1, 1]])]
    >>> gt = [np.array([[0, 1], [255, 0]])]
    >>> r = metric.compute(predictions=pred, references=gt, num_labels=2, ignore_index=255)
    >>> round(float(r["mean_iou"]), 4)
    0.5
"""

_CITATION = """@software{disa_mean_iou, title={DiSa mean IoU metric}, note={confusion-matrix implementation}}"""

RULES = ("present_in_gt_or_pred", "present_in_gt")


def _to_array(x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"Label maps must hold integers, got dtype {arr.dtype}.")
    return arr


def _apply_reference_transforms(
    label: np.ndarray, label_map: dict[int, int] | None, reduce_labels: bool
) -> np.ndarray:
    label = label.astype(np.int64)
    if label_map:
        src = label.copy()
        for old_id, new_id in label_map.items():
            label[src == old_id] = new_id
    if reduce_labels:
        label = np.where(label == 0, 255, label - 1)
        label = np.where(label == 254, 255, label)
    return label


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_labels: int, ignore_index: int) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction, ignoring `ignore_index` pixels."""
    if pred.shape != label.shape:
        raise ValueError(f"Prediction shape {pred.shape} does not match reference shape {label.shape}.")
    pred = pred.astype(np.int64, copy=False).ravel()
    label = label.astype(np.int64, copy=False).ravel()
    keep = label != ignore_index
    label = label[keep]
    pred = pred[keep]
    k = num_labels
    if label.size:
        bad = (label < 0) | (label >= k)
        if bad.any():
            raise ValueError(
                f"References hold values {np.unique(label[bad])[:10].tolist()} outside [0, {k}) that are "
                f"not ignore_index={ignore_index}."
            )
        badp = (pred < 0) | (pred >= k)
        if badp.any():
            raise ValueError(f"Predictions hold class ids {np.unique(pred[badp])[:10].tolist()} outside [0, {k}).")
    return np.bincount(label * k + pred, minlength=k * k).reshape(k, k)


# Copied from modeling_disa.evaluation.metrics.metrics_from_confusion_matrix (the IoU / accuracy arithmetic, fewer
# outputs, mean_iou's default rule): this module is loaded alone by `evaluate.load(path)`, so it cannot import the
# package. A checked copy: tests/test_metrics.py::test_evaluate_module_arithmetic_is_the_package_copy.
def metrics_from_confusion(cm: np.ndarray, rule: str = "present_in_gt_or_pred", nan_to_num: float | None = None):
    if rule not in RULES:
        raise ValueError(f"Unknown miou_rule {rule!r}; choose one of {RULES}.")
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = gt + pred - tp
    keep = union > 0 if rule == "present_in_gt_or_pred" else gt > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(keep, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    with np.errstate(invalid="ignore"):
        overall = tp.sum() / gt.sum() if gt.sum() > 0 else np.nan
    mean_iou = np.nanmean(iou) if np.any(~np.isnan(iou)) else np.nan
    mean_acc = np.nanmean(acc) if np.any(~np.isnan(acc)) else np.nan
    out = {
        "mean_iou": mean_iou,
        "mean_accuracy": mean_acc,
        "overall_accuracy": overall,
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }
    if nan_to_num is not None:
        out = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in out.items()}
    return out


# Copied from modeling_disa.evaluation.boundary.boundary_dilation (this module cannot import the package).
def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    return max(1, int(round(dilation_ratio * np.sqrt(height**2 + width**2))))


def _window_extreme(x: np.ndarray, d: int, pad_value: int, reduce) -> np.ndarray:
    """Max or min over the (2d + 1) square around each pixel, the window clipped to the array (separable)."""
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (d, d)
        x = reduce(
            np.lib.stride_tricks.sliding_window_view(np.pad(x, pad, constant_values=pad_value), 2 * d + 1, axis), -1
        )
    return x


def boundary_labels(labels: np.ndarray, dilation: int, outside: int) -> np.ndarray:
    """Class id where a pixel lies on its class mask's boundary (official `mask_to_boundary`: pad by one background
    pixel, erode `dilation` times with a 3x3 square, mask minus erosion), `outside` elsewhere. `labels` holds
    values in [0, outside]; `outside` marks pixels of no class."""
    x = np.pad(labels, 1, constant_values=outside)
    hi = _window_extreme(x, dilation, -1, np.max)
    lo = _window_extreme(x, dilation, outside + 1, np.min)
    return np.where((hi != lo)[1:-1, 1:-1], labels, outside)


# Copied from modeling_disa.evaluation.boundary.BoundaryIoU.update (its counts for one map, in NumPy): a checked copy,
# tests/test_metrics.py::test_evaluate_module_boundary_iou_is_the_package_copy.
def boundary_counts(pred: np.ndarray, label: np.ndarray, num_labels: int, ignore_index: int, dilation_ratio: float):
    """(3, K) int64: per-class boundary intersection, ground-truth boundary area, predicted boundary area."""
    k = num_labels
    pred = pred.astype(np.int64, copy=False)
    label = label.astype(np.int64, copy=False)
    valid = label != ignore_index
    label = np.where(valid, label, k)
    pred = np.where(valid, pred, k)
    d = boundary_dilation(label.shape[0], label.shape[1], dilation_ratio)
    gb = boundary_labels(label, d, k).ravel()
    pb = boundary_labels(pred, d, k).ravel()
    return np.stack(
        [
            np.bincount(np.where(gb == pb, gb, k), minlength=k + 1)[:k],
            np.bincount(gb, minlength=k + 1)[:k],
            np.bincount(pb, minlength=k + 1)[:k],
        ]
    )


# Copied from modeling_disa.evaluation.boundary.boundary_iou_from_counts (fewer outputs).
def boundary_iou_from_counts(counts: np.ndarray, rule: str, nan_to_num: float | None = None):
    inter, gt, pred = counts.astype(np.float64)
    union = gt + pred - inter
    valid = gt > 0 if rule == "present_in_gt" else union > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(valid, inter / np.where(union > 0, union, 1), np.nan)
    n_valid = int(valid.sum())
    mean = float(np.nansum(iou) / n_valid) if n_valid else float("nan")
    if nan_to_num is not None:
        mean = float(np.nan_to_num(mean, nan=nan_to_num))
        iou = np.nan_to_num(iou, nan=nan_to_num)
    return {"mean_boundary_iou": mean, "per_category_boundary_iou": iou}


# Copied from modeling_disa.evaluation.metrics.foreground_bias_rates (NumPy inputs, the two rates): a checked copy,
# tests/test_metrics.py::test_evaluate_module_foreground_bias_is_the_package_copy.
def foreground_bias_from_confusion(cm: np.ndarray, is_thing: np.ndarray):
    cm = cm.astype(np.float64)
    stuff = ~is_thing
    n_stuff = cm[stuff].sum()
    n_thing = cm[is_thing].sum()
    stuff_as_thing = cm[np.ix_(stuff, is_thing)].sum()
    thing_as_stuff = cm[np.ix_(is_thing, stuff)].sum()
    return {
        "stuff_predicted_as_thing": float(stuff_as_thing / n_stuff) if n_stuff > 0 else float("nan"),
        "thing_predicted_as_stuff": float(thing_as_stuff / n_thing) if n_thing > 0 else float("nan"),
    }


def _thing_mask(thing_classes, num_labels: int) -> np.ndarray:
    ids = np.asarray(list(thing_classes))
    if ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"thing_classes must be a non-empty list of class ids, got {thing_classes!r}.")
    bad = ids[(ids < 0) | (ids >= num_labels)]
    if bad.size:
        raise ValueError(f"thing_classes holds ids {bad[:10].tolist()} outside [0, {num_labels}).")
    return np.isin(np.arange(num_labels), ids)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DisaMeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
            reference_urls=[
                "https://github.com/facebookresearch/detectron2/blob/main/detectron2/evaluation/sem_seg_evaluation.py"
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: int | None = None,
        label_map: dict[int, int] | None = None,
        reduce_labels: bool = False,
        miou_rule: str = "present_in_gt_or_pred",
        boundary_iou: bool = False,
        boundary_dilation_ratio: float | None = None,
        thing_classes: list[int] | None = None,
    ):
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions and {len(references)} references.")
        if boundary_dilation_ratio is not None and not boundary_iou:
            raise ValueError("boundary_dilation_ratio is set but boundary_iou is off: pass boundary_iou=True.")
        ratio = 0.02 if boundary_dilation_ratio is None else float(boundary_dilation_ratio)
        if not (np.isfinite(ratio) and ratio > 0):
            raise ValueError(
                f"boundary_dilation_ratio must be a positive fraction of the image diagonal, got {ratio}."
            )
        is_thing = _thing_mask(thing_classes, num_labels) if thing_classes is not None else None
        cm = np.zeros((num_labels, num_labels), dtype=np.int64)
        counts = np.zeros((3, num_labels), dtype=np.int64)
        for pred, ref in zip(predictions, references):
            label = _apply_reference_transforms(_to_array(ref), label_map, reduce_labels)
            pred = _to_array(pred)
            cm += confusion_matrix(pred, label, num_labels, ignore_index)  # validates both maps first
            if boundary_iou:
                counts += boundary_counts(pred, label, num_labels, ignore_index, ratio)
        out = metrics_from_confusion(cm, rule=miou_rule, nan_to_num=nan_to_num)
        if boundary_iou:
            out.update(boundary_iou_from_counts(counts, miou_rule, nan_to_num))
        if is_thing is not None:
            rates = foreground_bias_from_confusion(cm, is_thing)
            if nan_to_num is not None:
                rates = {key: float(np.nan_to_num(value, nan=nan_to_num)) for key, value in rates.items()}
            out.update(rates)
        return out
