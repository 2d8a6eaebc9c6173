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
Returns:
    `Dict`: mean_iou, mean_accuracy, overall_accuracy (floats), per_category_iou, per_category_accuracy
    (arrays of shape (num_labels,)).
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
    ):
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions and {len(references)} references.")
        cm = np.zeros((num_labels, num_labels), dtype=np.int64)
        for pred, ref in zip(predictions, references):
            label = _apply_reference_transforms(_to_array(ref), label_map, reduce_labels)
            cm += confusion_matrix(_to_array(pred), label, num_labels, ignore_index)
        return metrics_from_confusion(cm, rule=miou_rule, nan_to_num=nan_to_num)
