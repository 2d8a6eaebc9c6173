"""Data pipeline for DiSa training: loading with `datasets`, column and class checks, CAT-Seg augmentation.

Images are decoded and resized with PIL, as detectron2 resizes them; the random crop, colour jitter and flip are one
albumentations pipeline; normalisation is the model's own `DiSaImageProcessor`, passed in by the training script, so
that training, validation, evaluation and inference share one preprocessing path.

Order of use (as in `training/train.py`):
1. `load_raw_splits`      - a Hub dataset id, a local parquet/arrow folder, or a `save_to_disk` folder.
2. `check_columns`        - the image and label columns exist (missing ones are named).
3. `resolve_class_names`  - from the recipe (list or JSON file) and/or the dataset features; disagreements raise.
4. `TrainTransform` / `EvalTransform` - CAT-Seg augmentation (short-side resize, random crop, SSD photometric
   distortion, horizontal flip) and the fast whole-image eval resize; labels are always resized nearest.
5. `SegmentationDataset` / `StreamingSegmentationDataset` - per-sample deterministic randomness
   (seed, epoch, row index) and the bad-sample policy; the shuffle is accelerate's seedable sampler.
6. `collate_segmentation` - stacks a batch and sums the number of skipped bad samples.

Bad samples (undecodable image, label map of another size, colour label map, label value >= number of classes
that is not the ignore value) raise `BadSampleError` naming the dataset index. With `on_bad_sample="skip"` the
sample is replaced by the next good one, the skip is counted (reported by the training loop), and more than
`max_bad_fraction` of skipped samples still raises: training never goes on silently over garbage.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image


class DataError(ValueError):
    """A dataset-level problem (missing column, empty split, class list mismatch, ...)."""


class BadSampleError(ValueError):
    """One sample cannot be used for training (see the module docstring)."""

    def __init__(self, index: Any, reason: str | None = None):
        # one-argument form: DataLoader workers re-raise exceptions as `type(exc)(message)`
        super().__init__(index if reason is None else f"bad sample at dataset index {index}: {reason}")
        self.index = index
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------
# 1. Loading
# ---------------------------------------------------------------------------------------------------------------


def _is_save_to_disk_folder(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))
    )


def load_raw_splits(
    dataset_name: str,
    dataset_config_name: str | None = None,
    train_split: str | None = "train",
    validation_split: str | None = "validation",
    streaming: bool = False,
    cache_dir: str | None = None,
    validation_fraction: float = 0.0,
    seed: int = 0,
) -> dict:
    """Return {"train": ds or None, "validation": ds or None}.

    `dataset_name` may be a Hub id (`org/name`), a local folder of parquet/arrow files (split names taken from the
    file or folder names, as `datasets` infers them), or a folder written by `save_to_disk` (`load_from_disk`).
    When the validation split is missing and `validation_fraction` > 0, it is carved out of train
    (`train_test_split`, seeded), as HF's example scripts do.
    """
    import datasets

    wanted = {"train": train_split, "validation": validation_split}
    if _is_save_to_disk_folder(dataset_name):
        if dataset_config_name:
            raise DataError(
                f"{dataset_name!r} is a save_to_disk folder, which has no configs: drop dataset_config_name "
                f"({dataset_config_name!r}) or point dataset_name at the dataset that has it"
            )
        loaded = datasets.load_from_disk(dataset_name)
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({train_split or "train": loaded})
        if streaming:
            loaded = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
    else:
        if os.path.isdir(dataset_name) and not any(
            f.endswith((".parquet", ".arrow")) for _, _, files in os.walk(dataset_name) for f in files
        ):
            raise DataError(
                f"{dataset_name!r} is a folder but holds neither parquet/arrow files nor a save_to_disk dataset"
            )
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, streaming=streaming)
    available = list(loaded.keys())
    out = {}
    for role, split in wanted.items():
        if split is None:
            out[role] = None
        elif split in loaded:
            if role == "validation" and validation_fraction > 0:
                raise DataError(
                    f"validation_fraction ({validation_fraction}) carves a validation split out of train when there "
                    f"is none, but {dataset_name!r} has the split {split!r}: drop validation_fraction to validate on "
                    "that split"
                )
            out[role] = loaded[split]
        elif role == "validation" and validation_fraction > 0 and not streaming and out.get("train") is not None:
            parts = out["train"].train_test_split(test_size=validation_fraction, seed=seed)
            out["train"], out["validation"] = parts["train"], parts["test"]
        elif role == "validation" and split == "validation":
            out[role] = None  # the default name; absence just disables validation
        else:
            raise DataError(f"split {split!r} not found in {dataset_name!r}; available splits: {available}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. Column checks
# ---------------------------------------------------------------------------------------------------------------


def dataset_columns(ds) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names is None and getattr(ds, "features", None) is not None:
        names = list(ds.features)
    return list(names or [])


def check_columns(ds, image_column: str, label_column: str, split_name: str = "train") -> None:
    columns = dataset_columns(ds)
    if not columns:  # an IterableDataset with unknown features: the per-sample check will name the column
        return
    missing = [c for c in (image_column, label_column) if c not in columns]
    if missing:
        raise DataError(
            f"{split_name} split is missing column(s) {missing}; it has {columns}. "
            "Set --image_column / --label_column to the right names."
        )


def check_not_empty(ds, split_name: str) -> None:
    try:
        n = len(ds)
    except TypeError:  # streaming: checked when iterating
        return
    if n == 0:
        raise DataError(f"the {split_name} split is empty")


def disable_image_decoding(ds, columns: Iterable[str]):
    """Cast `Image()` columns to `Image(decode=False)` so that a corrupted file becomes a `BadSampleError` in our
    decoder (with its index) instead of an exception deep inside `datasets`."""
    import datasets

    features = getattr(ds, "features", None)
    if not features:
        return ds
    for col in columns:
        feat = features.get(col)
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


# ---------------------------------------------------------------------------------------------------------------
# 3. Class names
# ---------------------------------------------------------------------------------------------------------------


def _find_class_label(feature) -> list[str] | None:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    for attr in ("feature", "dtype"):
        inner = getattr(feature, attr, None)
        if inner is not None and not isinstance(inner, str):
            found = _find_class_label(inner)
            if found:
                return found
    if isinstance(feature, (list, tuple)) and feature:
        return _find_class_label(feature[0])
    return None


def class_names_from_features(ds, label_column: str, class_names_feature: str | None = None) -> list[str] | None:
    """Class names declared by the dataset: a `ClassLabel` feature named `class_names_feature`, or a `ClassLabel`
    nested inside the label column (e.g. `Sequence(Sequence(ClassLabel))`)."""
    features = getattr(ds, "features", None)
    if not features:
        return None
    if class_names_feature:
        if class_names_feature not in features:
            raise DataError(
                f"--class_names_feature {class_names_feature!r} is not a column; columns: {list(features)}"
            )
        names = _find_class_label(features[class_names_feature])
        if names is None:
            raise DataError(
                f"column {class_names_feature!r} is not a ClassLabel feature: {features[class_names_feature]}"
            )
        return names
    if label_column in features:
        return _find_class_label(features[label_column])
    return None


def read_class_names(spec) -> list[str] | None:
    """Recipe value -> list of names. Accepts a list, a path to a JSON list / id2label dict / a dict with
    "class_names" (modeling_disa/evaluation/definitions/*.json) or "classes", or a text file with one name per line."""
    if spec is None or spec == [] or spec == "":
        return None
    if isinstance(spec, (list, tuple)):
        if len(spec) == 1 and isinstance(spec[0], str) and os.path.isfile(spec[0]):
            spec = spec[0]
        else:
            return [str(s) for s in spec]
    path = str(spec)
    if not os.path.isfile(path):
        raise DataError(f"class name file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        data = json.loads(text)
        if isinstance(data, dict):
            for key in ("class_names", "classes", "id2label"):  # benchmark definitions, plain lists, HF id2label
                if key in data:
                    data = data[key]
                    break
        if isinstance(data, dict):
            keys = sorted(data, key=int)
            if [int(k) for k in keys] != list(range(len(keys))):
                raise DataError(f"{path}: id2label keys must be 0..N-1, got {keys[:5]}...")
            return [str(data[k]) for k in keys]
        return [str(x) for x in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_class_names(recipe_names, dataset_names: list[str] | None, source: str = "dataset") -> list[str]:
    names = read_class_names(recipe_names)
    if names is None and dataset_names is None:
        raise DataError(
            "no class names: give --class_names (list or file) or use a dataset whose features declare a ClassLabel"
        )
    if names is not None and dataset_names is not None and list(names) != list(dataset_names):
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(names, dataset_names)) if a != b][:5]
        raise DataError(
            f"class list of the recipe ({len(names)} names) disagrees with the {source} features "
            f"({len(dataset_names)} names); first differences (index, recipe, dataset): {diff}"
        )
    names = names if names is not None else dataset_names
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"duplicate class names: {dup[:10]}")
    if not names:
        raise DataError("the class list is empty")
    return list(names)


# ---------------------------------------------------------------------------------------------------------------
# 4. Decoding and augmentation
# ---------------------------------------------------------------------------------------------------------------


def _open_encoded(value, index, what: str):
    """A `datasets` Image value ({"bytes", "path"}), raw bytes, a path or a PIL image -> PIL image; None for an
    array-like value (decoded by the caller)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
        raise BadSampleError(index, f"{what} entry has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    if isinstance(value, Image.Image):
        return value
    return None


def decode_image(value, index) -> np.ndarray:
    """-> uint8 (H, W, 3) RGB."""
    try:
        img = _open_encoded(value, index, "image")
        if img is None:
            arr = np.asarray(value)
            if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
                arr = arr.transpose(1, 2, 0)
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=2)
            if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
                raise BadSampleError(index, f"image array must be uint8 HxWx3, got {arr.dtype} {arr.shape}")
            return np.ascontiguousarray(arr[..., :3])
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)
    except BadSampleError:
        raise
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError (truncated), ...
        raise BadSampleError(index, f"image cannot be decoded ({type(exc).__name__}: {exc})") from exc


def decode_label(value, index) -> np.ndarray:
    """-> integer (H, W) array (uint8, uint16 or int32/int64), class ids as stored."""
    try:
        img = _open_encoded(value, index, "label")
        if img is None:
            arr = np.asarray(value)
            if arr.ndim == 3 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
                raise BadSampleError(index, f"label must be an integer HxW map, got {arr.dtype} {arr.shape}")
            return arr
        img.load()
        if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "HSV"):
            raise BadSampleError(
                index, f"label map is a colour image (mode {img.mode}); a single-channel class-id map is required"
            )
        if img.mode == "F":
            raise BadSampleError(index, "label map is floating point (mode F)")
        arr = np.asarray(img)  # P -> palette indices, L -> uint8, I;16 -> uint16, I -> int32, 1 -> bool
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        return arr
    except BadSampleError:
        raise
    except Exception as exc:
        raise BadSampleError(index, f"label cannot be decoded ({type(exc).__name__}: {exc})") from exc


def validate_label(label: np.ndarray, num_classes: int, ignore_index: int, index) -> np.ndarray:
    """-> int64 copy; raises when a value is neither a class id nor the ignore value."""
    lab = label.astype(np.int64, copy=False)
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        values = np.unique(lab[bad])
        raise BadSampleError(
            index,
            f"label values {values[:10].tolist()} are outside [0, {num_classes}) and are not the ignore value "
            f"{ignore_index} ({int(bad.sum())} pixels); check --class_names / --ignore_index / --reduce_labels",
        )
    return lab


def reduce_label_values(label: np.ndarray, ignore_index: int) -> np.ndarray:
    """ADE-style: 0 ("other") -> ignore, k -> k-1 (ignore stays ignore)."""
    lab = label.astype(np.int64)
    ign = lab == ignore_index
    lab = lab - 1
    lab[(lab == -1) | ign] = ignore_index
    return lab


def resize_image(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 `(H, W, 3)` -> `(height, width, 3)` with PIL's bilinear filter, as detectron2's `ResizeTransform`
    (CAT-Seg's `ResizeShortestEdge`) resizes uint8 images.

    Not albumentations' `Resize` / `SmallestMaxSize`: they resize with OpenCV, whose bilinear filter does not
    antialias when it shrinks (PIL's widens its support with the scale), so a downscaled image differs from the
    reference by tens of grey levels; `tests/test_training_data.py` shows the difference."""
    if img.shape[0] == height and img.shape[1] == width:
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def resize_label_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Integer `(H, W)` -> `(height, width)`, nearest neighbour as detectron2 resizes uint8 label maps (PIL's
    NEAREST), which OpenCV's `INTER_NEAREST_EXACT` reproduces bit for bit, ties included (a source coordinate that
    falls exactly on a pixel border takes the upper-left pixel). OpenCV maps the row and column index ramps and the
    label is gathered with them, so any integer dtype keeps its values (16-bit or int64 ignore values too, on
    OpenCV versions without 64-bit resize)."""
    h, w = label.shape
    if h == height and w == width:
        return label
    rows = cv2.resize(np.arange(h, dtype=np.int32)[:, None], (1, height), interpolation=cv2.INTER_NEAREST_EXACT)
    cols = cv2.resize(np.arange(w, dtype=np.int32)[None, :], (width, 1), interpolation=cv2.INTER_NEAREST_EXACT)
    return label[rows.reshape(height, 1), cols.reshape(1, width)]


def short_side_size(h: int, w: int, short_side: int, max_long_side: int | None) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge arithmetic: scale the short side to `short_side`, cap the long side."""
    scale = short_side / min(h, w)
    if max_long_side and max(h, w) * scale > max_long_side:
        scale = max_long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


class ScaleSaturation(A.ImageOnlyTransform):
    """Multiply the HSV saturation of a uint8 RGB image by `alpha ~ uniform(*saturation_range)`, as SSD does.

    albumentations has no multiplicative HSV saturation: `HueSaturationValue` shifts S additively and
    `ColorJitter` blends with the grey image (torchvision's rule), so this one step of CAT-Seg's
    `ColorAugSSDTransform` is written out with OpenCV's HSV conversion (its own)."""

    def __init__(self, saturation_range: tuple[float, float] = (0.5, 1.5), p: float = 0.5):
        super().__init__(p=p)
        self.saturation_range = tuple(saturation_range)

    def get_params(self) -> dict:
        return {"alpha": self.py_random.uniform(*self.saturation_range)}

    def apply(self, img: np.ndarray, alpha: float = 1.0, **params) -> np.ndarray:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * alpha, 0, 255).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("saturation_range",)


def ssd_colour_distortion(
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: float = 18,
    prob: float = 0.5,
) -> A.Compose:
    """CAT-Seg's `ColorAugSSDTransform` (MaskFormer's, from SSD) as an albumentations pipeline on uint8 RGB.

    Brightness `+ uniform(-brightness_delta, brightness_delta)` (0-255 units), then in random order either contrast,
    saturation, hue or saturation, hue, contrast; contrast `x uniform(*contrast_range)`, saturation (HSV)
    `x uniform(*saturation_range)`, hue `+ uniform(-hue_delta, hue_delta)` in OpenCV's 0-180 hue units; each step
    with probability `prob`, values clipped to 0-255 after each. Differences from the reference, all within one
    grey level or one hue unit: albumentations rounds where the reference truncates to uint8, and draws the hue
    shift from a continuous uniform where the reference draws an integer."""

    def contrast():
        return A.RandomBrightnessContrast(
            brightness_limit=(0.0, 0.0), contrast_limit=(contrast_range[0] - 1.0, contrast_range[1] - 1.0), p=prob
        )

    def saturation_hue():
        return [
            ScaleSaturation(saturation_range, p=prob),
            A.HueSaturationValue(
                hue_shift_limit=(-hue_delta, hue_delta), sat_shift_limit=(0, 0), val_shift_limit=(0, 0), p=prob
            ),
        ]

    brightness = A.RandomBrightnessContrast(
        brightness_limit=(-brightness_delta / 255.0, brightness_delta / 255.0),
        contrast_limit=(0.0, 0.0),
        brightness_by_max=True,
        p=prob,
    )
    return A.Compose(
        [
            brightness,
            A.OneOf(
                [A.Sequential([contrast(), *saturation_hue()]), A.Sequential([*saturation_hue(), contrast()])], p=1.0
            ),
        ]
    )


def apply_seeded(pipeline: A.BaseCompose, rng: np.random.Generator, **targets) -> dict:
    """Run an albumentations pipeline on `targets` (`image=`, `mask=`) with its randomness drawn from `rng`.

    albumentations keeps its own generators; they are replaced, for every call, by one pair seeded from `rng` and
    shared by all steps (`set_random_state`). `Compose.set_random_seed` would give every step its own generator
    with the same seed, so that all the "apply with probability p" draws of one image would be the same number."""
    seed = int(rng.integers(2**32))
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return pipeline(**{k: np.ascontiguousarray(v) for k, v in targets.items()})


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, pipeline: A.Compose | None = None) -> np.ndarray:
    """Apply `pipeline` (default: `ssd_colour_distortion()`) to a uint8 RGB image, its randomness drawn from `rng`
    (`apply_seeded`)."""
    return apply_seeded(pipeline or ssd_colour_distortion(), rng, image=img)["image"]


def to_pixel_values(image_processor, img: np.ndarray) -> torch.Tensor:
    """uint8 `(H, W, 3)` -> float32 `(3, H, W)`, normalised by the model's image processor at its current size.
    `patch_size=1` lifts the processor's one-patch minimum: a crop of a small image is padded to the crop size
    afterwards."""
    return image_processor(images=img, do_resize=False, patch_size=1, return_tensors="pt")["pixel_values"][0]


@dataclass
class TrainTransform:
    """CAT-Seg training augmentation. `__call__(image uint8 (H, W, 3), label int (H, W), rng)` ->
    (pixel_values float32 (3, crop, crop), labels int64 (crop, crop)).

    Short-side resize (`resize_short_side`, long side capped at `max_long_side`; `resize_image` /
    `resize_label_nearest`), then albumentations' `Crop` at a random offset (a window of at most `crop_size` x
    `crop_size`; CAT-Seg's category-area constraint is off, a plain random crop), the photometric distortion
    (`ssd_colour_distortion`, seeded from `rng` by `apply_seeded`) and `HorizontalFlip` with probability
    `hflip_prob`, every draw from `rng`; normalisation by `image_processor` (a `DiSaImageProcessor`), then padding
    of a crop smaller than `crop_size` at the bottom and right with the mean colour (0 after normalisation) and
    `ignore_index`."""

    image_processor: Any
    crop_size: int = 384
    resize_short_side: int = 384
    max_long_side: int | None = 1333
    photometric: bool = True
    hflip_prob: float = 0.5
    ignore_index: int = 255

    def __post_init__(self):
        self.colour = ssd_colour_distortion() if self.photometric else None
        self.flip = A.HorizontalFlip(p=1.0)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        h, w = label.shape
        nh, nw = short_side_size(h, w, self.resize_short_side, self.max_long_side)
        image, label = resize_image(image, nh, nw), resize_label_nearest(label, nh, nw)
        # The crop offsets and the flip are drawn from `rng` here, in the order the recipe always drew them, so a
        # seed gives the same samples as before albumentations applied them (its `RandomCrop` / `HorizontalFlip(p)`
        # would draw from their own generators). detectron2's `RandomCrop("absolute")`: the crop never exceeds the
        # image; an image smaller than the crop is padded after the augmentation, below.
        ch, cw = min(self.crop_size, nh), min(self.crop_size, nw)
        top, left = int(rng.integers(0, nh - ch + 1)), int(rng.integers(0, nw - cw + 1))
        out = A.Crop(x_min=left, y_min=top, x_max=left + cw, y_max=top + ch)(image=image, mask=label)
        if self.colour is not None:
            out["image"] = photometric_distortion(out["image"], rng, self.colour)
        if rng.random() < self.hflip_prob:
            out = self.flip(image=out["image"], mask=out["mask"])
        pixel_values = to_pixel_values(self.image_processor, np.ascontiguousarray(out["image"]))
        labels = torch.from_numpy(np.ascontiguousarray(out["mask"], dtype=np.int64))
        ch, cw = labels.shape
        if ch < self.crop_size or cw < self.crop_size:  # pad: zeros = the mean colour after normalisation
            pad = (0, self.crop_size - cw, 0, self.crop_size - ch)
            pixel_values = torch.nn.functional.pad(pixel_values, pad, value=0.0)
            labels = torch.nn.functional.pad(labels, pad, value=self.ignore_index)
        return pixel_values, labels


@dataclass
class EvalTransform:
    """Fast whole-image validation: `image_processor` resizes the image and its label to `size` x `size` (bilinear /
    nearest) and normalises the image, so that batches stack. Metrics are therefore computed at that resolution
    (an approximation of the full-resolution protocol, which is fine for periodic validation)."""

    image_processor: Any
    size: int = 384

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None):
        out = self.image_processor(
            images=image, segmentation_maps=label, size={"height": self.size, "width": self.size}, return_tensors="pt"
        )
        return out["pixel_values"][0], out["labels"][0]


# ---------------------------------------------------------------------------------------------------------------
# 5. torch datasets
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SamplePreparer:
    """Turns one raw row into (pixel_values, labels): decode, checks, label reduction, transform."""

    image_column: str
    label_column: str
    num_classes: int
    ignore_index: int
    transform: Any
    reduce_labels: bool = False

    def __call__(self, row: dict, index, rng):
        for col in (self.image_column, self.label_column):
            if col not in row:
                raise DataError(f"column {col!r} missing from the data; row has {sorted(row)}")
        image = decode_image(row[self.image_column], index)
        label = decode_label(row[self.label_column], index)
        if image.shape[:2] != label.shape:
            raise BadSampleError(index, f"image is {image.shape[:2]} but its label map is {label.shape}")
        if self.reduce_labels:
            label = reduce_label_values(label, self.ignore_index)
        label = validate_label(label, self.num_classes, self.ignore_index, index)
        return self.transform(image, label, rng)


class SegmentationDataset(torch.utils.data.Dataset):
    """Map-style wrapper around a `datasets.Dataset`; the order is the DataLoader sampler's (accelerate's seedable
    sampler in training: a pure function of (seed, epoch), so a resumed run sees the same order).

    - The augmentation RNG of row i in epoch e is `np.random.default_rng([seed, e, i])`: independent of the
      process count, worker count, and of whatever ran before (`set_epoch` is called by accelerate's DataLoader).
    - Bad samples: `on_bad_sample="error"` raises; `"skip"` takes the next row (up to `max_consecutive_skips`),
      and the item carries `num_skipped` so the loop can count skips."""

    def __init__(
        self,
        hf_dataset,
        preparer: SamplePreparer,
        seed: int = 0,
        on_bad_sample: str = "error",
        max_consecutive_skips: int = 16,
    ):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.ds = hf_dataset
        self.preparer = preparer
        self.seed = int(seed)
        self.on_bad_sample = on_bad_sample
        self.max_consecutive_skips = max_consecutive_skips
        self.epoch = 0

    def __len__(self):
        return len(self.ds)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __getitem__(self, position: int):
        rng = np.random.default_rng([self.seed, self.epoch, int(position)])
        n = len(self.ds)
        skipped = 0
        while True:
            index = (int(position) + skipped) % n
            try:
                pixel_values, labels = self.preparer(self.ds[index], index, rng)
                return {"pixel_values": pixel_values, "labels": labels, "num_skipped": skipped}
            except BadSampleError:
                if self.on_bad_sample == "error":
                    raise
                skipped += 1
                if skipped >= min(self.max_consecutive_skips, n):
                    raise DataError(
                        f"{skipped} consecutive bad samples from position {position}: the dataset looks broken"
                    )


class StreamingSegmentationDataset(torch.utils.data.IterableDataset):
    """Iterable wrapper for `datasets.IterableDataset` (streaming). Shuffling uses the `datasets` buffer shuffle
    (seeded; `set_epoch` reseeds it); the augmentation RNG is keyed by (seed, epoch, position in the stream)."""

    def __init__(
        self,
        hf_dataset,
        preparer: SamplePreparer,
        seed: int = 0,
        on_bad_sample: str = "error",
        max_consecutive_skips: int = 16,
    ):
        self.ds = hf_dataset
        self.preparer = preparer
        self.seed = int(seed)
        self.on_bad_sample = on_bad_sample
        self.max_consecutive_skips = max_consecutive_skips
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)

    def __iter__(self):
        skipped = 0
        position = 0
        seen_any = False
        for index, row in enumerate(self.ds):
            seen_any = True
            rng = np.random.default_rng([self.seed, self.epoch, position])
            try:
                pixel_values, labels = self.preparer(row, f"stream[{index}]", rng)
            except BadSampleError:
                if self.on_bad_sample == "error":
                    raise
                skipped += 1
                if skipped >= self.max_consecutive_skips:
                    raise DataError(f"{skipped} consecutive bad samples in the stream: the dataset looks broken")
                continue
            yield {"pixel_values": pixel_values, "labels": labels, "num_skipped": skipped}
            skipped = 0
            position += 1
        if not seen_any:
            raise DataError("the streamed split is empty")


def collate_segmentation(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "labels": torch.stack([it["labels"] for it in items]),
        "num_skipped": torch.tensor([int(it.get("num_skipped", 0)) for it in items], dtype=torch.long),
    }


def check_bad_fraction(num_skipped: int, num_seen: int, max_fraction: float, min_count: int = 10) -> None:
    """Raise when skipped bad samples are more than `max_fraction` of the samples seen (after a few)."""
    if num_skipped > min_count and num_skipped > max_fraction * max(num_seen, 1):
        raise DataError(
            f"{num_skipped} bad samples skipped out of {num_seen + num_skipped} read "
            f"(> {max_fraction:.1%}): refusing to keep training on this data"
        )
