"""The toy world's scenes: vocabulary, textures and shapes, rendering, captions, and the dataset splits.

- **Vocabulary**: 4 colours x (3 textures = "stuff", 3 shapes = "things") = 24 classes, e.g. ``"red stripes"``,
  ``"blue circle"``.
- **Compositional split**: 8 classes are *unseen* (never labelled during segmentation training); each is a new
  combination of words that do appear in seen classes (``"green triangle"`` is unseen, ``"green circle"`` and
  ``"red triangle"`` are seen), so zero-shot transfer through the text encoder is possible.
- **Scenes** (deterministic by seed): one or two textured stuff regions split by a random line, plus one or two solid
  shapes whose colour differs from the stuff under them; dense labels; a caption listing the concepts present.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
}
TEXTURES = ("stripes", "dots", "noise")  # stuff
SHAPES = ("circle", "square", "triangle")  # things
PROMPT_WORDS = (
    "a",
    "an",
    "photo",
    "of",
    "the",
    "in",
    "scene",
    "and",
    "with",
    "on",
    "picture",
    "image",
    "showing",
    "there",
    "is",
    "are",
    "some",
    "background",
    "shape",
)
CAPTION_TEMPLATES = ("a photo of {}", "{}", "a picture showing {}", "an image of {}", "there is {}")
DEFAULT_SEED = 0
WORLD_VERSION = 2  # bump when the rendering changes: it is part of the cache keys


def _color_names():
    return list(COLORS)


def class_vocabulary() -> dict:
    """The 24 classes of the world: names, kind (stuff/thing), colour and texture/shape words, seen/unseen.

    Unseen classes form a Latin-square pattern: colour i misses texture i % 3 and shape (i + 1) % 3, so every colour,
    texture and shape word still occurs in at least two seen classes."""
    names, kinds, colors, parts, seen = [], [], [], [], []
    for kind, items, shift in (("stuff", TEXTURES, 0), ("thing", SHAPES, 1)):
        for ci, color in enumerate(_color_names()):
            for pi, part in enumerate(items):
                names.append(f"{color} {part}")
                kinds.append(kind)
                colors.append(color)
                parts.append(part)
                seen.append(pi != (ci + shift) % len(items))
    return {"names": names, "kinds": kinds, "colors": colors, "parts": parts, "seen": seen}


VOCAB = class_vocabulary()
CLASS_NAMES = VOCAB["names"]
STUFF_IDS = [i for i, k in enumerate(VOCAB["kinds"]) if k == "stuff"]
THING_IDS = [i for i, k in enumerate(VOCAB["kinds"]) if k == "thing"]
SEEN_IDS = [i for i, s in enumerate(VOCAB["seen"]) if s]
UNSEEN_IDS = [i for i, s in enumerate(VOCAB["seen"]) if not s]
SEEN_NAMES = [CLASS_NAMES[i] for i in SEEN_IDS]


def _texture(rng: np.random.Generator, texture: str, size: int) -> np.ndarray:
    """(size, size) float mask in [0, 1]: 1 = full colour, 0 = the dark shade."""
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "stripes":
        period = int(rng.integers(5, 8))
        phase = int(rng.integers(0, period))
        coord = yy if rng.random() < 0.5 else xx
        return (((coord + phase) % period) < period / 2).astype(np.float32)
    if texture == "dots":
        period = int(rng.integers(6, 9))
        oy, ox = rng.integers(0, period, size=2)
        dy = (yy + oy) % period - period / 2
        dx = (xx + ox) % period - period / 2
        return (dy * dy + dx * dx <= (period / 3.2) ** 2).astype(np.float32)
    # noise: random 2x2 blocks
    cells = rng.random((size // 2 + 1, size // 2 + 1)).astype(np.float32)
    return np.kron(cells, np.ones((2, 2), np.float32))[:size, :size]


def _shape_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = float(rng.uniform(0.17, 0.28) * size)
    cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        h = r * 0.9
        return (np.abs(yy - cy) <= h) & (np.abs(xx - cx) <= h)
    # upward triangle inscribed in the circle of radius r
    top, bottom = cy - r, cy + 0.6 * r
    half = (yy - top) / (bottom - top) * r * 1.1
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)


def render_scene(
    rng: np.random.Generator, class_ids: list[int], size: int = 64, max_things: int = 2, single_stuff_prob: float = 0.3
):
    """One scene drawn from the classes in `class_ids` (global ids). -> (uint8 (size, size, 3) image,
    uint8 (size, size) label map of global ids, list of global ids present, in drawing order)."""
    stuff_pool = [c for c in class_ids if VOCAB["kinds"][c] == "stuff"]
    thing_pool = [c for c in class_ids if VOCAB["kinds"][c] == "thing"]
    n_stuff = 1 if rng.random() < single_stuff_prob or len(stuff_pool) < 2 else 2
    stuff = [int(c) for c in rng.choice(stuff_pool, size=n_stuff, replace=False)]
    label = np.full((size, size), stuff[0], np.uint8)
    if n_stuff == 2:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        angle = rng.uniform(0, np.pi)
        py, px = rng.uniform(0.3 * size, 0.7 * size, size=2)
        side = (yy - py) * np.cos(angle) - (xx - px) * np.sin(angle) > 0
        label[side] = stuff[1]
    image = np.zeros((size, size, 3), np.float32)
    for c in stuff:
        color = np.asarray(COLORS[VOCAB["colors"][c]], np.float32)
        dark = color * 0.3 + 15
        m = _texture(rng, VOCAB["parts"][c], size)[..., None]
        region = (label == c)[..., None]
        image = np.where(region, dark + m * (color - dark), image)
    stuff_colors = {VOCAB["colors"][c] for c in stuff}
    candidates = [c for c in thing_pool if VOCAB["colors"][c] not in stuff_colors]
    present = list(stuff)
    n_things = int(rng.integers(1, max_things + 1)) if candidates and max_things > 0 else 0
    for _ in range(n_things):
        c = int(rng.choice(candidates))
        mask = _shape_mask(rng, VOCAB["parts"][c], size)
        image[mask] = np.asarray(COLORS[VOCAB["colors"][c]], np.float32)
        label[mask] = c
        present.append(c)
    image = image + rng.normal(0, 6, image.shape)
    present = [c for c in dict.fromkeys(present) if (label == c).any()]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label, present


def caption_for(
    rng: np.random.Generator,
    present: list[int],
    stuff_caption_rate: float = 1.0,
    background_caption_rate: float = 0.0,
) -> str | None:
    """Caption listing the concepts present, in random order, with a random template
    (e.g. "a photo of blue circle, red stripes and green dots").

    `stuff_caption_rate` < 1 makes the captions foreground-biased, as web alt-texts are: things are always named,
    each stuff region only with that probability. `background_caption_rate` > 0: a caption that leaves a stuff region
    unnamed says, with that probability, that the named concepts are "on a background" ("a photo of blue circle on a
    background"; "a photo of a background" when nothing else is named), as web captions do; this is how the toy CLIP
    learns the word "background" for the PAS-20b analog (`background_benchmark`). Returns None when nothing would be
    named (the caller redraws)."""
    if stuff_caption_rate < 1.0:  # no extra draws at 1.0, so the unbiased world stays bit-identical
        named = [c for c in present if VOCAB["kinds"][c] == "thing" or rng.random() < stuff_caption_rate]
        # no extra draw at rate 0 or when every stuff region was named: the existing worlds stay bit-identical
        background = (
            background_caption_rate > 0 and len(named) < len(present) and rng.random() < background_caption_rate
        )
        present = named
        if not present:
            if not background:
                return None
            return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format("a background")
    else:
        background = False
    names = [CLASS_NAMES[c] for c in present]
    order = rng.permutation(len(names))
    names = [names[i] for i in order]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    if background:
        listed += " on a background"
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(listed)


@dataclass
class WorldSettings:
    seed: int = DEFAULT_SEED
    image_size: int = 64
    num_train: int = 2000
    num_validation: int = 100
    num_test: int = 300

    def key(self) -> str:
        blob = json.dumps({"world": asdict(self), "version": WORLD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def split_rng(seed: int, split: str) -> np.random.Generator:
    """The random stream of one split (or of CLIP pretraining): independent of the others, fixed by the seed."""
    return np.random.default_rng([seed, {"train": 1, "validation": 2, "test": 3, "clip": 4, "dev": 5}[split]])


def generate_split(settings: WorldSettings, split: str, num: int | None = None) -> dict:
    """Raw arrays of a split. train/validation use seen classes only (labels = indices into `SEEN_NAMES`);
    test uses all 24 classes (labels = global ids into `CLASS_NAMES`); "dev" is a design-selection split like test
    (all classes) drawn from its own random stream, so choices made on it never look at test images."""
    rng = split_rng(settings.seed, split)
    num = num if num is not None else getattr(settings, f"num_{split}")
    pool = SEEN_IDS if split in ("train", "validation") else list(range(len(CLASS_NAMES)))
    remap = np.full(256, 255, np.uint8)
    if split in ("train", "validation"):
        remap[SEEN_IDS] = np.arange(len(SEEN_IDS), dtype=np.uint8)
    else:
        remap[: len(CLASS_NAMES)] = np.arange(len(CLASS_NAMES), dtype=np.uint8)
    images, labels, captions, classes = [], [], [], []
    for _ in range(num):
        img, lab, present = render_scene(rng, pool, settings.image_size)
        images.append(img)
        labels.append(remap[lab])
        captions.append(caption_for(rng, present))
        classes.append([int(remap[c]) for c in present])
    return {"image": images, "label": labels, "caption": captions, "classes": classes}


def build_dataset(settings: WorldSettings):
    """`datasets.DatasetDict` with train / validation (seen vocabulary) and test (full vocabulary). Columns:
    image (Image), label (Image, mode L, class ids), caption (string), classes (Sequence(ClassLabel)) whose
    ClassLabel holds the split's class names."""
    import datasets
    from PIL import Image

    out = {}
    for split in ("train", "validation", "test"):
        raw = generate_split(settings, split)
        names = SEEN_NAMES if split != "test" else CLASS_NAMES
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.Image(),
                "caption": datasets.Value("string"),
                "classes": datasets.Sequence(datasets.ClassLabel(names=list(names))),
            }
        )
        out[split] = datasets.Dataset.from_dict(
            {
                "image": [Image.fromarray(a) for a in raw["image"]],
                "label": [Image.fromarray(a) for a in raw["label"]],
                "caption": raw["caption"],
                "classes": raw["classes"],
            },
            features=features,
        )
    return datasets.DatasetDict(out)
