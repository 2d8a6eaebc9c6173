"""The toy world's analog of PAS-20b: the thing classes plus a generic "background" that covers every stuff pixel.

PAS-20b scores the 20 VOC object classes and one "background" class that holds every other pixel; it is the
benchmark whose vocabulary rewards a model that does not paint the background with object names. In the toy world:

- **vocabulary** (`PAS20B_NAMES`): the 12 thing names, then ``"background"`` (id 12), prompted like any class;
- **ground truth**: each thing pixel keeps its thing (ids 0-11 in `THING_IDS` order), every stuff pixel becomes
  background, ignored pixels stay ignored (`to_pas20b_ids`);
- **score**: mIoU over the 13 classes present in the ground truth (detectron2's rule, as for every CAT-Seg
  benchmark), with the background IoU and the mean over things beside it (`pas20b_scores`).

CAT-Seg's own PAS-20b never prompts the word: its list holds the 20 VOC classes and 39 context classes, and a pixel
won by any context class counts as background (`DatasetDefinition.fold_predictions`). The same rule in the toy world
is `to_pas20b_ids` applied to the full 24-class prediction: every stuff name folds into background. The comparison
reports both; the prompted one asks whether "background" itself is understood, so it needs a toy CLIP that has
seen the word in its captions (`ClipSettings.background_caption_rate`).
"""

from __future__ import annotations

import numpy as np

from .scenes import CLASS_NAMES, STUFF_IDS, THING_IDS

BACKGROUND_NAME = "background"
PAS20B_NAMES = [CLASS_NAMES[i] for i in THING_IDS] + [BACKGROUND_NAME]
PAS20B_BACKGROUND_ID = len(THING_IDS)
IGNORE_INDEX = 255

_LUT = np.full(256, IGNORE_INDEX, np.int64)
_LUT[THING_IDS] = np.arange(len(THING_IDS))
_LUT[STUFF_IDS] = PAS20B_BACKGROUND_ID


def to_pas20b_ids(ids: np.ndarray) -> np.ndarray:
    """Global class ids (into `CLASS_NAMES`; 255 = ignore) -> analog ids (into `PAS20B_NAMES`): thing -> its thing
    index, stuff -> background, 255 -> 255. Applied to a prediction over all 24 names this is CAT-Seg's PAS-20b fold:
    a pixel won by any stuff (context) name counts as background."""
    ids = np.asarray(ids)
    bad = (ids != IGNORE_INDEX) & ((ids < 0) | (ids >= len(CLASS_NAMES)))
    if bad.any():
        raise ValueError(
            f"class ids {np.unique(ids[bad])[:10].tolist()} are neither one of the {len(CLASS_NAMES)} toy-world "
            f"classes nor the ignore value {IGNORE_INDEX}; the PAS-20b analog maps the full (test / dev) vocabulary."
        )
    return _LUT[ids.astype(np.int64)]


def pas20b_scores(pred: np.ndarray, labels: np.ndarray) -> dict:
    """Analog predictions (ids into `PAS20B_NAMES`) against global-id ground truth -> mIoU % over the classes present
    in the ground truth, the mean over the things among them, the background IoU and the per-class IoU."""
    import torch

    from modeling_disa.evaluation.metrics import SegmentationConfusionMatrix

    cm = SegmentationConfusionMatrix(len(PAS20B_NAMES), ignore_index=IGNORE_INDEX, device="cpu")
    cm.update(torch.from_numpy(np.asarray(pred, np.int64)), torch.from_numpy(to_pas20b_ids(labels)))
    iou = np.asarray(cm.compute(rule="present_in_gt")["per_category_iou"], dtype=np.float64) * 100
    things = iou[:PAS20B_BACKGROUND_ID]
    return {
        "mIoU": float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
        "things": float(np.nanmean(things)) if not np.isnan(things).all() else float("nan"),
        "background": float(iou[PAS20B_BACKGROUND_ID]),
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(PAS20B_NAMES, iou)},
    }
