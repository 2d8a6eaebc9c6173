"""An offline open-vocabulary toy world: procedural scenes, a word-level CLIP tokenizer and a tiny CLIP pretrained
contrastively on the world's image-caption pairs.

It is a small, honest stand-in for the real workflow (web-pretrained CLIP + COCO-Stuff training + zero-shot
evaluation) that runs on a laptop CPU without any download:

- **Vocabulary**: 4 colours x (3 textures = "stuff", 3 shapes = "things") = 24 classes, e.g. ``"red stripes"``,
  ``"blue circle"``.
- **Compositional split**: 8 classes are *unseen* (never labelled during segmentation training); each is a new
  combination of words that do appear in seen classes (``"green triangle"`` is unseen, ``"green circle"`` and
  ``"red triangle"`` are seen), so zero-shot transfer through the text encoder is possible.
- **Scenes** (deterministic by seed): one or two textured stuff regions split by a random line, plus one or two solid
  shapes whose colour differs from the stuff under them; dense labels; a caption listing the concepts present.
- **Tiny CLIP**: a `transformers` `CLIPModel` (ViT 64 px / patch 8, 64-wide towers) trained with CLIP's own
  contrastive loss on freshly generated image-caption pairs of *all* concepts (as real CLIP saw the web), saved with
  its tokenizer as a normal CLIP checkpoint and cached by a hash of its settings, so that
  `DiSaForOpenVocabSegmentation.from_clip_pretrained(folder)` is the same call as with `openai/clip-vit-base-patch16`.

Everything is numpy / torch; no network.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
}
TEXTURES = ("stripes", "dots", "noise")  # stuff
SHAPES = ("circle", "square", "triangle")  # things
PROMPT_WORDS = ("a", "an", "photo", "of", "the", "in", "scene", "and", "with", "on", "picture", "image", "showing",
                "there", "is", "are", "some", "background", "shape")
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


# ------------------------------------------------------------------------------------------------ rendering
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


def render_scene(rng: np.random.Generator, class_ids: list[int], size: int = 64, max_things: int = 2,
                 single_stuff_prob: float = 0.3):
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


def caption_for(rng: np.random.Generator, present: list[int], stuff_caption_rate: float = 1.0) -> str | None:
    """Caption listing the concepts present, in random order, with a random template
    (e.g. "a photo of blue circle, red stripes and green dots").

    `stuff_caption_rate` < 1 makes the captions foreground-biased, as web alt-texts are: things are always named,
    each stuff region only with that probability. Returns None when nothing would be named (the caller redraws)."""
    if stuff_caption_rate < 1.0:  # no extra draws at 1.0, so the unbiased world stays bit-identical
        present = [c for c in present if VOCAB["kinds"][c] == "thing" or rng.random() < stuff_caption_rate]
        if not present:
            return None
    names = [CLASS_NAMES[c] for c in present]
    order = rng.permutation(len(names))
    names = [names[i] for i in order]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(listed)


# ------------------------------------------------------------------------------------------------ dataset
@dataclass
class WorldSettings:
    seed: int = DEFAULT_SEED
    image_size: int = 64
    num_train: int = 2000
    num_validation: int = 100
    num_test: int = 300

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"world": asdict(self), "version": WORLD_VERSION}, sort_keys=True).encode()).hexdigest()[:12]


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, {"train": 1, "validation": 2, "test": 3, "clip": 4, "dev": 5}[split]])


def generate_split(settings: WorldSettings, split: str, num: int | None = None) -> dict:
    """Raw arrays of a split. train/validation use seen classes only (labels = indices into `SEEN_NAMES`);
    test uses all 24 classes (labels = global ids into `CLASS_NAMES`); "dev" is a design-selection split like test
    (all classes) drawn from its own random stream, so choices made on it never look at test images."""
    rng = _split_rng(settings.seed, split)
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
        features = datasets.Features({
            "image": datasets.Image(), "label": datasets.Image(), "caption": datasets.Value("string"),
            "classes": datasets.Sequence(datasets.ClassLabel(names=list(names))),
        })
        out[split] = datasets.Dataset.from_dict({
            "image": [Image.fromarray(a) for a in raw["image"]],
            "label": [Image.fromarray(a) for a in raw["label"]],
            "caption": raw["caption"], "classes": raw["classes"],
        }, features=features)
    return datasets.DatasetDict(out)


# ------------------------------------------------------------------------------------------------ tokenizer
def world_words() -> list[str]:
    words = set(PROMPT_WORDS) | set(COLORS) | set(TEXTURES) | set(SHAPES)
    return sorted(words)


def build_tokenizer(model_max_length: int = 32):
    """A `CLIPTokenizer` whose vocabulary is the world's words: the characters, every word as one `word</w>` token
    and the BPE merges that build each word from its characters (so each known word is exactly one token;
    punctuation is a token of its own; unknown words fall back to characters)."""
    chars = sorted({ch for w in world_words() for ch in w} | set(",.!?'-"))
    order = sorted(world_words(), key=lambda w: (-len(w), w))  # long words first: their merges win
    for _ in range(len(order)):  # a word broken by another word's merges moves to the front, until none is
        tokenizer = _bpe_tokenizer(chars, order, model_max_length)
        bad = [w for w in order if len(tokenizer.tokenize(w)) != 1]
        if not bad:
            return tokenizer
        order = bad + [w for w in order if w not in bad]
    raise RuntimeError(f"could not build single-token merges for {bad}")


def _bpe_tokenizer(chars, words, model_max_length):
    from transformers import CLIPTokenizer

    tokens = list(chars) + [c + "</w>" for c in chars]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            tokens.append(pieces[0])
    merges = list(dict.fromkeys(merges))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


# ------------------------------------------------------------------------------------------------ tiny CLIP
@dataclass
class ClipSettings:
    seed: int = DEFAULT_SEED
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    vision_layers: int = 4
    text_layers: int = 3
    projection_dim: int = 64
    steps: int = 800
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    max_things: int = 2
    # Probability that a caption names a stuff region present in its image (things are always named): 1.0 is the
    # unbiased world, < 1 the foreground-biased one whose CLIP under-learns stuff, as web-pretrained CLIP does.
    stuff_caption_rate: float = 1.0
    extra: dict = field(default_factory=dict)

    def key(self) -> str:
        words = world_words()
        values = asdict(self)
        if values["stuff_caption_rate"] == 1.0:  # the unbiased world keeps the cache key it had before the setting
            del values["stuff_caption_rate"]
        blob = json.dumps({"clip": values, "words": words, "vocab": CLASS_NAMES, "version": WORLD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def clip_config(settings: ClipSettings, tokenizer):
    from transformers import CLIPConfig

    h = settings.hidden_size
    return CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=4 * h,
                         num_hidden_layers=settings.text_layers, num_attention_heads=4,
                         max_position_embeddings=tokenizer.model_max_length, projection_dim=settings.projection_dim,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=settings.vision_layers,
                           num_attention_heads=4, image_size=settings.image_size, patch_size=settings.patch_size,
                           projection_dim=settings.projection_dim),
        projection_dim=settings.projection_dim,
    )


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images: np.ndarray):
    """uint8 (B, H, W, 3) -> CLIP-normalised float tensor (B, 3, H, W)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255).permute(0, 3, 1, 2)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def pretraining_batch(rng: np.random.Generator, batch_size: int, image_size: int, max_things: int = 2,
                      stuff_caption_rate: float = 1.0):
    """Image-caption pairs of every concept (seen and unseen): a quarter single-stuff images, the rest scenes. A
    pair whose caption would name nothing (a stuff-only image whose stuff went unnamed) is redrawn."""
    all_ids = list(range(len(CLASS_NAMES)))
    images, captions = [], []
    while len(images) < batch_size:
        kind = rng.random()
        img, _, present = render_scene(rng, all_ids, image_size, max_things=0 if kind < 0.25 else max_things,
                                       single_stuff_prob=0.5)
        caption = caption_for(rng, present, stuff_caption_rate)
        if caption is not None:
            images.append(img)
            captions.append(caption)
    return np.stack(images), captions


def pretrain_clip(settings: ClipSettings, output_dir: str, progress: bool = True) -> dict:
    """Train the tiny CLIP with `CLIPModel(..., return_loss=True)` on freshly generated pairs and save it (model +
    tokenizer) to `output_dir`. Returns a summary (losses, zero-shot accuracy on single-stuff images, seconds)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import CLIPModel, get_scheduler

    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = _split_rng(settings.seed, "clip")
    tokenizer = build_tokenizer()
    model = CLIPModel(clip_config(settings, tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=settings.warmup_steps,
                              num_training_steps=settings.steps)
    losses = []
    bar = tqdm(range(settings.steps), desc="toy CLIP pretraining", disable=not progress)
    for step in bar:
        images, captions = pretraining_batch(rng, settings.batch_size, settings.image_size, settings.max_things,
                                             settings.stuff_caption_rate)
        text = tokenizer(captions, padding=True, return_tensors="pt")
        out = model(pixel_values=normalize_images(images), input_ids=text["input_ids"],
                    attention_mask=text["attention_mask"], return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(out.loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    summary = {"steps": settings.steps, "first_loss": float(np.mean(losses[:20])),
               "final_loss": float(np.mean(losses[-50:])), "seconds": round(time.perf_counter() - start, 1),
               "zero_shot_accuracy": clip_zero_shot_accuracy(model, tokenizer, settings)}
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "toy_clip_pretraining.json"), "w") as fh:
        json.dump({"settings": asdict(settings), **summary}, fh, indent=1)
    return summary


def _features(out):
    """`get_text_features` / `get_image_features` return a tensor (transformers 4) or an output whose
    `pooler_output` holds the projected features (transformers 5)."""
    return out if hasattr(out, "norm") else out.pooler_output


def clip_zero_shot_accuracy(model, tokenizer, settings: ClipSettings, num: int = 96) -> dict:
    """Image-level zero-shot classification with the prompt "a photo of {name}": single-stuff images (one stuff
    filling the image) among the 12 stuff names, and single-thing images (one thing on a stuff of another colour)
    among the 12 thing names; seen and unseen classes. The stuff / thing gap measures the world's foreground bias."""
    import torch

    rng = np.random.default_rng([settings.seed, 99])
    stuff_ids = [int(c) for c in rng.choice(STUFF_IDS, size=num)]
    stuff_images = [render_scene(rng, [c], settings.image_size, max_things=0)[0] for c in stuff_ids]
    thing_ids, thing_images = [], []
    thing_rng = np.random.default_rng([settings.seed, 98])  # its own stream: the stuff figures stay comparable
    for c in thing_rng.choice(THING_IDS, size=num):
        ground = [s for s in STUFF_IDS if VOCAB["colors"][s] != VOCAB["colors"][c]]
        img, _, present = render_scene(thing_rng, [int(thing_rng.choice(ground)), int(c)], settings.image_size,
                                       max_things=1, single_stuff_prob=1.0)
        if int(c) in present:
            thing_ids.append(int(c))
            thing_images.append(img)

    def accuracy(ids, images, pool):
        with torch.no_grad():
            text = tokenizer([f"a photo of {CLASS_NAMES[c]}" for c in pool], padding=True, return_tensors="pt")
            t = torch.nn.functional.normalize(_features(model.get_text_features(**text)), dim=-1)
            pixels = normalize_images(np.stack(images))
            v = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
            pred = (v @ t.T).argmax(-1).numpy()
        correct = np.array([pool[p] == c for p, c in zip(pred, ids)])
        seen = np.array([VOCAB["seen"][c] for c in ids])
        return float(correct.mean()), float(correct[seen].mean()), float(correct[~seen].mean())

    out = {}
    for kind, ids, images, pool in (("stuff", stuff_ids, stuff_images, STUFF_IDS),
                                    ("things", thing_ids, thing_images, THING_IDS)):
        out[f"{kind}_all"], out[f"{kind}_seen"], out[f"{kind}_unseen"] = accuracy(ids, images, pool)
    return out


def _write_atomically(final: str, write) -> None:
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(final):  # another process finished first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_cache_root() -> str:
    return os.environ.get("DISA_TOY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "disa", "toy_world"))


def ensure_toy_clip(settings: ClipSettings, cache_root: str | None = None, progress: bool = True) -> str:
    """Folder of the tiny CLIP for these settings: loaded from the cache, or pretrained and written atomically."""
    final = os.path.join(cache_root or default_cache_root(), f"clip-{settings.key()}")
    if not os.path.isfile(os.path.join(final, "toy_clip_pretraining.json")):
        _write_atomically(final, lambda tmp: pretrain_clip(settings, tmp, progress))
    return final


def ensure_world_dataset(settings: WorldSettings, cache_root: str | None = None) -> str:
    """Folder of the world's `save_to_disk` DatasetDict for these settings (generated and written atomically)."""
    final = os.path.join(cache_root or default_cache_root(), f"world-{settings.key()}")
    if not os.path.isfile(os.path.join(final, "world.json")):
        def write(tmp):
            build_dataset(settings).save_to_disk(tmp)
            with open(os.path.join(tmp, "world.json"), "w") as fh:
                json.dump({"settings": asdict(settings), "class_names": CLASS_NAMES, "seen_names": SEEN_NAMES,
                           "unseen_names": [CLASS_NAMES[i] for i in UNSEEN_IDS],
                           "stuff_names": [CLASS_NAMES[i] for i in STUFF_IDS],
                           "thing_names": [CLASS_NAMES[i] for i in THING_IDS]}, fh, indent=1)
        _write_atomically(final, write)
    return final


def dense_clip_logits(clip_model, pixel_values, input_ids, attention_mask, clip_resolution: int):
    """Untrained dense-CLIP baseline: cosine cost volume between CAT-Seg's dense CLIP patch embeddings and the
    class prompt embeddings, no trained head. -> (batch, T, grid, grid)."""
    import torch

    from modeling_disa.model import cosine_cost_volume, dense_clip_features

    with torch.no_grad():
        features = dense_clip_features(clip_model, pixel_values, clip_resolution, [], "cls")
        text = _features(clip_model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        text = text.view(-1, 1, text.shape[-1]).unsqueeze(0).expand(pixel_values.shape[0], -1, -1, -1)
        return cosine_cost_volume(features.image_embeds, text).mean(1)


__all__ = [
    "CLASS_NAMES", "SEEN_NAMES", "SEEN_IDS", "UNSEEN_IDS", "STUFF_IDS", "THING_IDS", "VOCAB", "ClipSettings",
    "WorldSettings", "build_dataset", "build_tokenizer", "caption_for", "class_vocabulary", "dense_clip_logits",
    "ensure_toy_clip", "ensure_world_dataset", "generate_split", "pretrain_clip", "render_scene",
]
