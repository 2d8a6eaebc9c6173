"""An offline open-vocabulary toy world: procedural scenes, a word-level CLIP tokenizer and a tiny CLIP pretrained
contrastively on the world's image-caption pairs.

It is a small, honest stand-in for the real workflow (web-pretrained CLIP + COCO-Stuff training + zero-shot
evaluation) that runs on a laptop CPU without any download. One module per concept:

- `scenes`: the 24-class vocabulary (4 colours x 3 textures "stuff" + 3 shapes "things") with its compositional
  seen / unseen split, scene rendering, captions, `WorldSettings`, the splits and the `datasets.DatasetDict`;
- `tokenizer`: a `CLIPTokenizer` whose vocabulary is the world's words;
- `clip_pretraining`: `ClipSettings`, the tiny `CLIPModel`'s config, contrastive pretraining batches and loop, and
  image-level zero-shot accuracy;
- `cache`: the dataset and the tiny CLIP cached by a hash of their settings, written atomically, so that
  `DiSaForOpenVocabSegmentation.from_clip_pretrained(folder)` is the same call as with `openai/clip-vit-base-patch16`;
- `baselines`: the untrained dense-CLIP baseline;
- `background_benchmark`: the PAS-20b analog (the thing names plus "background", which covers every stuff pixel);
- `job`: the default training job on the world (`training/train.py` without `--config`).

Everything is numpy / torch; no network. The names below are re-exported so that ``import toy_world as W`` gives the
whole world (``W.render_scene``, ``W.ClipSettings``, ...).
"""

from .background_benchmark import BACKGROUND_NAME, PAS20B_BACKGROUND_ID, PAS20B_NAMES, pas20b_scores, to_pas20b_ids
from .baselines import dense_clip_logits
from .cache import default_cache_root, ensure_toy_clip, ensure_world_dataset, write_atomically
from .clip_pretraining import (
    ClipSettings,
    clip_config,
    clip_features,
    clip_zero_shot_accuracy,
    normalize_images,
    pretrain_clip,
    pretraining_batch,
)
from .scenes import (
    CAPTION_TEMPLATES,
    CLASS_NAMES,
    COLORS,
    DEFAULT_SEED,
    PROMPT_WORDS,
    SEEN_IDS,
    SEEN_NAMES,
    SHAPES,
    STUFF_IDS,
    TEXTURES,
    THING_IDS,
    UNSEEN_IDS,
    VOCAB,
    WORLD_VERSION,
    WorldSettings,
    build_dataset,
    caption_for,
    class_vocabulary,
    generate_split,
    render_scene,
    split_rng,
)
from .tokenizer import build_tokenizer, world_words

__all__ = [
    "BACKGROUND_NAME",
    "PAS20B_BACKGROUND_ID",
    "PAS20B_NAMES",
    "CAPTION_TEMPLATES",
    "CLASS_NAMES",
    "COLORS",
    "DEFAULT_SEED",
    "PROMPT_WORDS",
    "SEEN_IDS",
    "SEEN_NAMES",
    "SHAPES",
    "STUFF_IDS",
    "TEXTURES",
    "THING_IDS",
    "UNSEEN_IDS",
    "VOCAB",
    "WORLD_VERSION",
    "ClipSettings",
    "WorldSettings",
    "build_dataset",
    "build_tokenizer",
    "caption_for",
    "class_vocabulary",
    "clip_config",
    "clip_features",
    "clip_zero_shot_accuracy",
    "default_cache_root",
    "dense_clip_logits",
    "ensure_toy_clip",
    "ensure_world_dataset",
    "generate_split",
    "normalize_images",
    "pas20b_scores",
    "pretrain_clip",
    "pretraining_batch",
    "render_scene",
    "split_rng",
    "to_pas20b_ids",
    "world_words",
    "write_atomically",
]
