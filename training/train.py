#!/usr/bin/env python
"""Train DiSa (CAT-Seg recipe) with `accelerate` on data loaded through `datasets`.

    accelerate launch training/train.py --config configuration/training/catseg_coco_stuff_vitb.yaml \
        --dataset_name <hub id | parquet/arrow folder | save_to_disk folder> --output_dir runs/vitb

Every recipe field (see `TrainingRecipe` below, or `--help`) can be set in the yaml given by `--config` and
overridden on the command line (`--field_name value`; booleans also bare, `--flag`, or `--no_flag` for those on by
default; mapping fields as a yaml/JSON string); precedence: dataclass default < yaml < command line. A value the
yaml sets cannot be emptied from the command line (argparse has no null), except a string, which `''` empties: set
it to null in a copy of the yaml.
Without `--config` the recipe is the offline toy world (`configuration/training/toy_world.yaml`).

The script reads top to bottom in the order it runs:
  1. recipe and argument parsing  (`TrainingRecipe`, `parse_args`: `transformers.HfArgumentParser`)
  2. model + processor            (`build_model_and_processor`)
  3. data                         (`build_datasets`, see `training/data.py`)
  4. validation                   (`evaluate`: whole-image, confusion matrix gathered across processes)
  5. `main`: accelerator, optimiser (`training/optimization.py`), schedule, resume, training loop, checkpoints
     (`training/checkpointing.py`), final `save_pretrained` (with push_to_hub, a complete Hub repository:
     `modeling_disa.hub.save_for_hub`), push (the saved folder's top level, uploaded as it is).

A recipe field left unset never replaces a value given elsewhere: `clip_finetune` / `ignore_index` keep the model
config's, `mixed_precision` the launcher's. A setting that cannot apply is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Literal

import torch
import yaml
from transformers import HfArgumentParser, SchedulerType

import checkpointing as C
import data as D
from cpu_threads import apply_cpu_threads
from optimization import optimizer_param_groups
from split_guard import SplitGuard

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configuration", "training", "toy_world.yaml")
MAPPING_FIELDS = ("model_config_overrides", "toy_world")
HUB_IGNORE_PATTERNS = ["*/*"]  # push_to_hub uploads the top level of output_dir (the saved repo, recipe, results)

# =====================================================================================================================
# 1. Recipe
# =====================================================================================================================


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainingRecipe:
    # ---- model
    model_name_or_path: str | None = _f(
        None,
        "A saved DiSa model (save_pretrained folder or Hub id) to start from: its config and weights. Excludes "
        "model_preset and clip_model_name_or_path (set them empty: --model_preset '').",
    )
    model_preset: str | None = _f(
        None,
        "DiSaConfig preset folder (relative to the repo root or absolute) of a new model; exactly one of "
        "model_preset / model_name_or_path.",
    )
    clip_model_name_or_path: str | None = _f(
        None,
        "Pretrained HF CLIP (Hub id or folder) for the preset's towers (their configs come from it); empty = random "
        "CLIP (tests only). Only with model_preset.",
    )
    processor_name_or_path: str | None = _f(
        None,
        "Where to load the DiSaProcessor from. Default: with clip_model_name_or_path, built from the model config "
        "(prompt templates, input size, patch size) and the CLIP's tokenizer (and image mean/std, when it has an "
        "image processor); otherwise the model folder's or the preset's.",
    )
    model_config_overrides: dict | str | None = _f(
        None,
        "DiSaConfig values that replace the preset's or the saved model's (yaml mapping; on the command line e.g. "
        "'{fusion: own}'); a name DiSaConfig does not have is an error.",
    )
    clip_finetune: Literal["qv", "none", "full"] | None = _f(
        None,
        "CLIP parameters to train: qv (CAT-Seg: Q/V projection weights), none, full. Default: the model config's "
        "clip_finetune.",
    )
    trainable_parameters: Literal["all", "disa"] = _f(
        "all",
        "all: every parameter the model trains (the head, and CLIP as clip_finetune says); disa: only the parameters "
        "DiSa adds to the CAT-Seg host (SDM, the background branch, HRM), the host and CLIP frozen: the upgrade path "
        "from CAT-Seg weights (configuration/training/upgrade_catseg_to_disa.yaml).",
    )
    # ---- data
    dataset_name: str | None = _f(None, "Hub dataset id, local parquet/arrow folder, or save_to_disk folder.")
    dataset_config_name: str | None = _f(None, "datasets config name.")
    train_split: str = _f("train", "Training split name.")
    validation_split: str | None = _f("validation", "Validation split name (empty: no validation).")
    validation_fraction: float = _f(0.0, "If the validation split is missing, carve this fraction out of train.")
    image_column: str = _f("image", "Image column.")
    label_column: str = _f("label", "Label-map column (single-channel class ids).")
    class_names: list[str] | None = _f(
        None, "Class names (list, or one JSON/text file); default: the dataset's ClassLabel feature."
    )
    class_names_feature: str | None = _f(None, "Column whose ClassLabel feature holds the class names.")
    ignore_index: int | None = _f(
        None,
        "Label value to ignore (255 for 8-bit label maps, 65535 for 16-bit). Default: the model config's "
        "ignore_index.",
    )
    reduce_labels: bool = _f(False, "ADE-style labels: 0 -> ignore, k -> k-1.")
    streaming: bool = _f(False, "Stream the data (datasets IterableDataset); needs max_train_steps.")
    shuffle_buffer_size: int = _f(1000, "Shuffle buffer for streaming.")
    max_train_samples: int | None = _f(None, "Truncate the training split (debugging).")
    max_eval_samples: int | None = _f(None, "Truncate the validation split.")
    on_bad_sample: Literal["error", "skip"] = _f(
        "error",
        "Bad sample (undecodable image, label out of range, size "
        "mismatch): 'error' stops with its index; 'skip' replaces "
        "it by the next sample and counts it.",
    )
    max_bad_sample_fraction: float = _f(0.01, "With on_bad_sample=skip: stop when more than this fraction is bad.")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes.")
    cache_dir: str | None = _f(None, "datasets cache folder.")
    # ---- augmentation (CAT-Seg)
    crop_size: int = _f(384, "Random crop size (square).")
    resize_short_side: int = _f(384, "Training short-side resize (ResizeShortestEdge).")
    max_long_side: int = _f(1333, "Cap of the long side after the short-side resize.")
    photometric_distortion: bool = _f(
        True, "SSD colour jitter (brightness +-32, contrast/saturation 0.5-1.5, hue +-18)."
    )
    hflip_prob: float = _f(0.5, "Horizontal flip probability.")
    eval_size: int = _f(384, "Validation: images and labels resized to eval_size x eval_size (whole-image, fast).")
    # ---- optimisation (CAT-Seg: AdamW 2e-4, CLIP x0.01, wd 1e-4 (0 on norms), cosine to 0, no warmup, clip 0.01)
    learning_rate: float = _f(2e-4, "Learning rate of the new (head) parameters.")
    clip_lr_multiplier: float = _f(0.01, "CLIP learning rate = learning_rate x this.")
    weight_decay: float = _f(1e-4, "AdamW weight decay.")
    weight_decay_norm: float = _f(0.0, "Weight decay of LayerNorm/GroupNorm/Embedding parameters.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    lr_scheduler_type: Literal[tuple(s.value for s in SchedulerType)] = _f(
        "cosine", "transformers.get_scheduler schedule."
    )
    num_warmup_steps: int = _f(0, "Warmup optimiser steps.")
    max_train_steps: int | None = _f(None, "Optimiser steps; exactly one of max_train_steps / num_train_epochs.")
    num_train_epochs: float | None = _f(None, "Epochs; exactly one of max_train_steps / num_train_epochs.")
    per_device_train_batch_size: int = _f(1, "Batch per process (CAT-Seg: 4 GPUs x 1 = 4).")
    per_device_eval_batch_size: int = _f(4, "Validation batch per process.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimiser step.")
    max_grad_norm: float = _f(0.01, "Full-model L2 gradient clipping (0 = off).")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _f(
        None,
        "accelerate autocast. Default: the launcher's (the accelerate config or `accelerate launch "
        "--mixed_precision`; 'no' without one); a value given here takes precedence, as in accelerate.",
    )
    allow_tf32: bool = _f(True, "Allow TF32 matmuls on CUDA (CAT-Seg: set_float32_matmul_precision('high')).")
    gradient_checkpointing: bool = _f(False, "Gradient checkpointing in CLIP and the aggregator.")
    ddp_find_unused_parameters: bool = _f(
        False,
        "DDP find_unused_parameters. Off (accelerate's default): every "
        "trainable parameter gets a gradient each step (unused ones are "
        "frozen). Set it when the vocabulary has class_cap or more classes "
        "(the class-padding tokens are then unused).",
    )
    seed: int = _f(42, "Seed of the model init, the shuffle and the augmentation.")
    # ---- checkpoints, validation, logging, output
    output_dir: str | None = _f(None, "Where checkpoints/, logs and the final model go.")
    overwrite_output_dir: bool = _f(False, "Allow an output_dir that holds another run (its checkpoints/ is removed).")
    checkpointing_steps: int = _f(5000, "save_state every N optimiser steps (0 = never).")
    checkpoints_total_limit: int = _f(3, "Keep the last K checkpoints (0 = keep all).")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint folder.")
    eval_steps: int = _f(5000, "Validate every N optimiser steps (0 = only at the end).")
    eval_before_training: bool = _f(False, "Also validate before the first step.")
    logging_steps: int = _f(
        20,
        "Log the training loss (and its segmentation / ITM terms, and with SDM the split statistics "
        "train/split/...) every N optimiser steps, averaged over those steps and the processes.",
    )
    split_guard_min_present_with_foreground: float = _f(
        0.5,
        "Models with SDM: warn when the share of present classes that get any foreground token (split statistic "
        "present_with_foreground, of a logging window or an evaluation) falls below this after the warm-up; 0 = "
        "no check. A model without SDM has no split: setting a guard value for it is an error.",
    )
    split_guard_min_foreground_precision: float = _f(
        0.45,
        "Models with SDM: warn when the share of foreground tokens on their own class (split statistic "
        "foreground_precision) falls below this after the warm-up; 0 = no check. On the test split of one toy world, "
        "the DiSa run that collapsed had 0.36, the two others 0.56 and 0.86.",
    )
    split_guard_warmup_fraction: float = _f(
        0.1, "Share of the training steps before the split guard checks (the split is still forming), in [0, 1)."
    )
    report_to: str = _f(
        "auto", "accelerate trackers: auto (tensorboard if installed), none, all, tensorboard, wandb..."
    )
    project_name: str = _f("disa", "Tracker project name.")
    push_to_hub: bool = _f(
        False,
        "Save output_dir as a complete Hub repository (weights, config with the pipeline, processor, code, model "
        "card) and upload its top level at the end, as saved (with recipe.yaml, all_results.json, log.jsonl; not "
        "checkpoints/ or logs/).",
    )
    hub_model_id: str | None = _f(None, "Hub repo id for push_to_hub.")
    hub_token: str | None = _f(None, "Hub token (default: the cached login).")
    # ---- offline toy world (dataset_name: toy-world; see training/toy_world/job.py)
    toy_world: dict | str | None = _f(
        None,
        "Toy-world settings (yaml mapping; on the command line a yaml/JSON "
        "string such as '{num_train: 64}', merged into the recipe's mapping): "
        "world size, seed, toy CLIP pretraining, comparison runs. Used when "
        "dataset_name is toy-world.",
    )

    def __post_init__(self):
        # mapping fields arrive as yaml/JSON strings from the command line (as TrainingArguments' dict fields do)
        for name in MAPPING_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                value = yaml.safe_load(value)
                if not isinstance(value, dict):
                    raise SystemExit(f"--{name} must be a yaml/JSON mapping, got {getattr(self, name)!r}")
                setattr(self, name, value)
        if isinstance(self.class_names, str):
            self.class_names = [self.class_names]
        check_recipe(self)


RECIPE_FIELDS = {f.name: f for f in dataclasses.fields(TrainingRecipe)}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        TrainingRecipe,
        description="Train DiSa with accelerate (CAT-Seg recipe). Every "
        "recipe field below can be set in the --config yaml and overridden here.",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="Recipe yaml (configuration/training/*.yaml; default: the offline toy world, toy_world.yaml).",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> TrainingRecipe:
    """Recipe from the `--config` yaml, then the command line. As TRL's `TrlParser` does, the yaml values become the
    parser's defaults, so `HfArgumentParser` applies the command line on top of them; a mapping field given on the
    command line is merged into the yaml's mapping."""
    parser = build_parser()
    config = parser.parse_known_args(argv)[0].config
    loaded = {}
    if config:
        with open(config, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
        unknown = sorted(set(loaded) - set(RECIPE_FIELDS))
        if unknown:
            raise SystemExit(f"{config}: unknown recipe field(s) {unknown}")
        parser.set_defaults(**loaded)
    recipe, _ = parser.parse_args_into_dataclasses(args=argv)
    for name in MAPPING_FIELDS:
        base, value = loaded.get(name), getattr(recipe, name)
        if isinstance(base, dict) and isinstance(value, dict) and value is not base:
            setattr(recipe, name, _merge(base, value))
    return recipe


def _choices(annotation) -> tuple | None:
    """The values of a `Literal[...]` field annotation (also inside `Literal[...] | None`)."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for member in typing.get_args(annotation):
        if typing.get_origin(member) is Literal:
            return typing.get_args(member)
    return None


# DiSaConfig values that `from_clip_pretrained` takes from the CLIP checkpoint (an override of them cannot apply)
CLIP_CHECKPOINT_CONFIG_KEYS = ("text_config", "vision_config", "projection_dim", "logit_scale_init_value")
# recipe fields that are also DiSaConfig values (unset: the model's)
MODEL_CONFIG_FIELDS = ("clip_finetune", "ignore_index")


def check_recipe(r: TrainingRecipe) -> None:
    """Checks argparse cannot make: yaml values bypass its `choices`, and some fields depend on each other."""
    problems = []
    for name, f in RECIPE_FIELDS.items():
        choices, value = _choices(f.type), getattr(r, name)
        # (HfArgumentParser resolves the annotations in place and drops the `| None`: a None default marks them)
        if choices and value not in choices and not (value is None and f.default is None):
            problems.append(f"{name} must be one of {list(choices)}, got {value!r}")
    if not r.output_dir:
        problems.append("--output_dir is required")
    if r.model_name_or_path and (r.model_preset or r.clip_model_name_or_path):
        problems.append(
            f"model_name_or_path ({r.model_name_or_path}) loads a saved model, its config and weights, so "
            f"model_preset ({r.model_preset}) and clip_model_name_or_path ({r.clip_model_name_or_path}) cannot "
            "apply: set them empty (--model_preset '' --clip_model_name_or_path '') or drop model_name_or_path"
        )
    if not r.model_name_or_path and not r.model_preset:
        problems.append("set model_preset (a new model) or model_name_or_path (a saved one)")
    if r.trainable_parameters == "disa" and r.clip_finetune not in (None, "none"):
        problems.append(
            f"clip_finetune {r.clip_finetune!r} cannot apply with trainable_parameters 'disa', which trains only the "
            "parameters DiSa adds (CLIP and the host stay frozen): drop clip_finetune or train all parameters"
        )
    overrides = r.model_config_overrides if isinstance(r.model_config_overrides, dict) else {}
    for name in MODEL_CONFIG_FIELDS:
        if getattr(r, name) is not None and name in overrides:
            problems.append(
                f"{name} is given twice, as a recipe field ({getattr(r, name)!r}) and in model_config_overrides "
                f"({overrides[name]!r}): keep one"
            )
    from_clip = sorted(set(overrides) & set(CLIP_CHECKPOINT_CONFIG_KEYS))
    if from_clip and r.clip_model_name_or_path:
        problems.append(
            f"model_config_overrides {from_clip} cannot apply: they come from the CLIP checkpoint "
            f"{r.clip_model_name_or_path}"
        )
    if r.max_train_steps is None and r.num_train_epochs is None:
        problems.append("set max_train_steps or num_train_epochs")
    if r.max_train_steps is not None and r.num_train_epochs is not None:
        problems.append(
            f"set only one of max_train_steps ({r.max_train_steps}) and num_train_epochs ({r.num_train_epochs}); "
            "to replace a yaml's max_train_steps by epochs, set it to null in a copy of the yaml"
        )
    if r.validation_fraction and (r.streaming or not r.validation_split):
        problems.append(
            "validation_fraction carves a validation split out of train: it needs a validation_split name and "
            "no streaming"
        )
    if r.streaming and r.max_train_steps is None:
        problems.append("streaming needs max_train_steps (the length of a stream is unknown)")
    for name in ("max_train_steps", "num_train_epochs"):
        if getattr(r, name) is not None and getattr(r, name) <= 0:
            problems.append(f"{name} must be > 0")
    for name in (
        "crop_size",
        "resize_short_side",
        "eval_size",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
    ):
        if getattr(r, name) <= 0:
            problems.append(f"{name} must be > 0")
    if r.push_to_hub and not r.hub_model_id:
        problems.append("push_to_hub needs hub_model_id")
    for name in ("split_guard_min_present_with_foreground", "split_guard_min_foreground_precision"):
        if not 0 <= getattr(r, name) <= 1:
            problems.append(f"{name} is a share: it must be in [0, 1] (0 turns the check off), got {getattr(r, name)}")
    if not 0 <= r.split_guard_warmup_fraction < 1:
        problems.append(
            f"split_guard_warmup_fraction must be in [0, 1) (a share of the training steps), got "
            f"{r.split_guard_warmup_fraction}; to turn the split guard off, set its thresholds to 0"
        )
    if problems:
        raise SystemExit("invalid recipe:\n  " + "\n  ".join(problems))


def recipe_record(r: TrainingRecipe) -> dict:
    """The recipe as written to recipe.yaml and the trackers: every field, the Hub token masked (the output folder
    is uploaded by push_to_hub)."""
    values = dataclasses.asdict(r)
    if values["hub_token"]:
        values["hub_token"] = "<HUB_TOKEN>"
    return values


def _repo_path(path: str | None) -> str | None:
    if path and not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
        return os.path.join(REPO_ROOT, path)
    return path


# =====================================================================================================================
# 2. Model and processor
# =====================================================================================================================


def model_config_values(r: TrainingRecipe) -> dict:
    """The DiSaConfig values the recipe sets: `model_config_overrides` plus the recipe fields that are config values
    (`clip_finetune`, `ignore_index`) when given. Everything else stays the preset's or the saved model's."""
    values = dict(r.model_config_overrides or {})
    values.update({name: getattr(r, name) for name in MODEL_CONFIG_FIELDS if getattr(r, name) is not None})
    return values


def load_model_config(source: str, values: dict):
    """`DiSaConfig.from_pretrained(source)` with `values` replacing its own; a name DiSaConfig does not have is an
    error (from_pretrained would drop it silently)."""
    from modeling_disa import DiSaConfig

    config, unused = DiSaConfig.from_pretrained(source, return_unused_kwargs=True, **values)
    if unused:
        raise SystemExit(
            f"model_config_overrides: DiSaConfig has no setting(s) {sorted(unused)} (check the spelling; the "
            f"settings are those of {os.path.join(str(source), 'config.json')})"
        )
    return config


def build_model(r: TrainingRecipe):
    """-> (model, source folder or Hub id of its config). CLIP fine-tuning follows the (overridden) config's
    `clip_finetune`, which the model applies when it is built or loaded."""
    from modeling_disa import DiSaForOpenVocabSegmentation

    values = model_config_values(r)
    if r.model_name_or_path:
        source = _repo_path(r.model_name_or_path)
        model = DiSaForOpenVocabSegmentation.from_pretrained(source, config=load_model_config(source, values))
    else:
        source = _repo_path(r.model_preset)
        config = load_model_config(source, values)
        if r.clip_model_name_or_path:
            model = DiSaForOpenVocabSegmentation.from_clip_pretrained(r.clip_model_name_or_path, config)
        else:
            model = DiSaForOpenVocabSegmentation(config)
    return model, source


def _find_file(name_or_path: str, filename: str) -> str | None:
    """Path of `filename` in a folder or (cached / downloadable) Hub repo, None when it has none."""
    from transformers.utils import cached_file

    return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)


def build_processor(r: TrainingRecipe, config, source: str):
    """The DiSaProcessor: `processor_name_or_path` when given; with a pretrained CLIP, built from the model config
    and the CLIP's tokenizer (the preset's own tokenizer, if any, belongs to its random towers); otherwise the one
    saved with the model or the preset."""
    from transformers import AutoTokenizer
    from transformers.utils import PROCESSOR_NAME

    from modeling_disa import DiSaProcessor

    if r.processor_name_or_path:
        return DiSaProcessor.from_pretrained(_repo_path(r.processor_name_or_path))
    if r.clip_model_name_or_path:
        # normalisation statistics are not part of the DiSa config: the CLIP checkpoint's image processor has them
        statistics = {}
        if preprocessor := _find_file(r.clip_model_name_or_path, "preprocessor_config.json"):
            with open(preprocessor, encoding="utf-8") as handle:
                saved = json.load(handle)
            statistics = {key: saved[key] for key in ("image_mean", "image_std") if key in saved}
        tokenizer = AutoTokenizer.from_pretrained(r.clip_model_name_or_path)
        return DiSaProcessor.from_model_config(config, tokenizer, **statistics)
    if _find_file(source, PROCESSOR_NAME):
        return DiSaProcessor.from_pretrained(source)
    raise SystemExit(
        f"no DiSaProcessor: {source} has no {PROCESSOR_NAME} and no clip_model_name_or_path gives a tokenizer. "
        "Set processor_name_or_path, or save one beside the model "
        "(`DiSaProcessor.from_model_config(config, tokenizer).save_pretrained(folder)`)."
    )


def build_model_and_processor(r: TrainingRecipe):
    model, source = build_model(r)
    if r.trainable_parameters == "disa":
        train_only_disa_parameters(model)
    if not model.config.use_sdm:
        given = {name: getattr(r, name) for name in SPLIT_GUARD_FIELDS if getattr(r, name) != _default(name)}
        if given:
            raise SystemExit(
                f"{given} cannot apply: the split guard watches SDM's foreground split, and this model has no SDM "
                "(use_sdm=False). Drop them, or set model_config_overrides {use_sdm: true}"
            )
    return model, build_processor(r, model.config, source)


SPLIT_GUARD_FIELDS = (
    "split_guard_min_present_with_foreground",
    "split_guard_min_foreground_precision",
    "split_guard_warmup_fraction",
)


def _default(name: str):
    return RECIPE_FIELDS[name].default


def train_only_disa_parameters(model) -> None:
    """Freeze everything but the parameters DiSa adds to the CAT-Seg host (`model.disa_parameter_names()`); those
    that the model keeps frozen because no output depends on them stay frozen."""
    names = set(model.disa_parameter_names())
    if not names:
        raise SystemExit(
            "trainable_parameters 'disa' trains only the parameters DiSa adds to the CAT-Seg host, and this model has "
            "none (use_sdm and use_hrm are off): set model_config_overrides {use_sdm: true} (and/or use_hrm), or "
            "train all parameters"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(param.requires_grad and name in names)


def tokenize_classes(processor, class_names: list[str]) -> dict:
    enc = processor(text=list(class_names), return_tensors="pt")
    # `prompt_templates` lets the model refuse prompts built with other templates than its config's
    return {k: enc.get(k) for k in ("input_ids", "attention_mask", "prompt_templates")}


# =====================================================================================================================
# 3. Data
# =====================================================================================================================


def build_datasets(r: TrainingRecipe, image_processor, ignore_index: int, train_dataset=None, eval_dataset=None):
    """-> (train torch dataset, eval torch dataset or None, class names). Images are normalised by the model's
    `image_processor`; `ignore_index` is the model config's (the loss ignores the same value). In-memory `datasets`
    objects may be passed instead of `dataset_name` (used by tests and notebooks)."""
    if train_dataset is not None and (r.dataset_name or r.validation_fraction):
        raise SystemExit(
            "in-memory datasets were passed, so the recipe's dataset_name / validation_fraction cannot apply: "
            "drop them or pass no datasets"
        )
    if train_dataset is None:
        if not r.dataset_name:
            raise SystemExit("--dataset_name is required")
        splits = D.load_raw_splits(
            _repo_path(r.dataset_name),
            r.dataset_config_name,
            r.train_split,
            r.validation_split or None,
            streaming=r.streaming,
            cache_dir=r.cache_dir,
            validation_fraction=r.validation_fraction,
            seed=r.seed,
        )
        train_dataset, eval_dataset = splits["train"], splits["validation"]
    columns = [r.image_column, r.label_column]
    D.check_columns(train_dataset, *columns, split_name="train")
    D.check_not_empty(train_dataset, "train")
    if eval_dataset is not None:
        D.check_columns(eval_dataset, *columns, split_name="validation")
        D.check_not_empty(eval_dataset, "validation")
    recipe_names = r.class_names
    if recipe_names and len(recipe_names) == 1 and _repo_path(recipe_names[0]) != recipe_names[0]:
        recipe_names = [_repo_path(recipe_names[0])]  # a class-name file given relative to the repo root
    class_names = D.resolve_class_names(
        recipe_names, D.class_names_from_features(train_dataset, r.label_column, r.class_names_feature)
    )
    if eval_dataset is not None and (
        eval_names := D.class_names_from_features(eval_dataset, r.label_column, r.class_names_feature)
    ):
        D.resolve_class_names(class_names, eval_names, source="validation split")
    if r.max_train_samples is not None:
        train_dataset = (
            train_dataset.take(r.max_train_samples)
            if r.streaming
            else train_dataset.select(range(min(r.max_train_samples, len(train_dataset))))
        )
    if eval_dataset is not None and r.max_eval_samples is not None:
        eval_dataset = (
            eval_dataset.take(r.max_eval_samples)
            if r.streaming
            else eval_dataset.select(range(min(r.max_eval_samples, len(eval_dataset))))
        )
    train_dataset = D.disable_image_decoding(train_dataset, columns)
    if eval_dataset is not None:
        eval_dataset = D.disable_image_decoding(eval_dataset, columns)

    num_classes = len(class_names)
    train_tf = D.TrainTransform(
        image_processor,
        crop_size=r.crop_size,
        resize_short_side=r.resize_short_side,
        max_long_side=r.max_long_side,
        photometric=r.photometric_distortion,
        hflip_prob=r.hflip_prob,
        ignore_index=ignore_index,
    )
    prep = D.SamplePreparer(r.image_column, r.label_column, num_classes, ignore_index, train_tf, r.reduce_labels)
    if r.streaming:
        stream = train_dataset.shuffle(seed=r.seed, buffer_size=r.shuffle_buffer_size)
        train = D.StreamingSegmentationDataset(stream, prep, seed=r.seed, on_bad_sample=r.on_bad_sample)
    else:
        train = D.SegmentationDataset(train_dataset, prep, seed=r.seed, on_bad_sample=r.on_bad_sample)
    evaluation = None
    if eval_dataset is not None:
        eval_prep = D.SamplePreparer(
            r.image_column,
            r.label_column,
            num_classes,
            ignore_index,
            D.EvalTransform(image_processor, r.eval_size),
            r.reduce_labels,
        )
        if r.streaming:
            evaluation = D.StreamingSegmentationDataset(eval_dataset, eval_prep, seed=r.seed, on_bad_sample="error")
        else:
            evaluation = D.SegmentationDataset(eval_dataset, eval_prep, seed=r.seed, on_bad_sample="error")
    return train, evaluation, class_names


# =====================================================================================================================
# 4. Validation
# =====================================================================================================================


def evaluate(model, loader, accelerator, text_inputs, num_classes: int, ignore_index: int) -> dict:
    """Whole-image validation in CAT-Seg's order: per-class sigmoid at the logits' resolution, probabilities
    upsampled (bilinear) to the label size, argmax; predictions and labels are gathered with `gather_for_metrics`
    (which drops the samples duplicated to even out the last batch), so every process holds the same confusion matrix
    and the result does not depend on the number of processes. The vocabulary is encoded once: the first batch's
    output `text_embeds` go to every later batch (through the wrapped model's forward, so DDP/FSDP see a normal
    call). With SDM, the split statistics of the whole split (`split/<name>`, `SplitStatistics`) come from the
    gathered presence logits and foreground masks, the same way."""
    from modeling_disa.evaluation.metrics import SegmentationConfusionMatrix
    from modeling_disa.evaluation.split_statistics import SplitStatistics

    model.eval()
    cm = SegmentationConfusionMatrix(num_classes, ignore_index=ignore_index, device="cpu")
    split = SplitStatistics(ignore_index) if accelerator.unwrap_model(model).config.use_sdm else None
    text = dict(text_inputs)
    with torch.no_grad():
        for batch in loader:
            out = model(pixel_values=batch["pixel_values"], output_saliency=split is not None, **text)
            text = {"text_embeds": out.text_embeds}
            probabilities = torch.nn.functional.interpolate(
                out.logits.float().sigmoid(), size=batch["labels"].shape[-2:], mode="bilinear", align_corners=False
            )
            preds = probabilities.argmax(1).to(torch.int32)
            gathered = [preds, batch["labels"].to(torch.int32)]
            if split is not None:
                # (bool tensors do not travel through every backend's all-gather)
                gathered += [out.itm_logits.float(), out.foreground_mask.to(torch.uint8)]
                gathered += [] if out.class_indices is None else [out.class_indices]
            gathered = accelerator.gather_for_metrics(tuple(gathered))
            preds, labels = gathered[0], gathered[1]
            cm.update(preds.cpu(), labels.cpu())
            if split is not None:
                class_indices = gathered[4] if len(gathered) > 4 else None
                split.update(gathered[2], gathered[3].bool(), labels, class_indices)
    model.train()
    res = cm.compute(rule="present_in_gt")  # detectron2 main / CAT-Seg: mean over classes present in the GT
    metrics = {
        "mIoU": float(res["mean_iou"]) * 100,
        "pixel_accuracy": float(res["pixel_accuracy"]) * 100,
        "mean_accuracy": float(res["mean_accuracy"]) * 100,
        "num_pixels": int(res["num_pixels"]),
        "per_class_iou": [None if x != x else float(x) * 100 for x in res["per_category_iou"].tolist()],
    }
    if split is not None:
        metrics.update({f"split/{name}": value for name, value in split.compute().items()})
    return metrics


# =====================================================================================================================
# 5. Main
# =====================================================================================================================


def _trackers(report_to: str):
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401

            return ["tensorboard"]
        except ImportError:
            return None
    return None if report_to in ("none", "") else report_to


TOY_WORLD = "toy-world"


def main(argv=None, train_dataset=None, eval_dataset=None) -> dict:
    r = parse_args(argv)
    threads = apply_cpu_threads()  # before any torch work: the toy world's CLIP pretraining computes too
    print(f"[train] torch CPU threads: {threads['torch_threads']} ({threads['reason']})", flush=True)
    if r.toy_world is not None and r.dataset_name != TOY_WORLD:
        raise SystemExit(
            f"toy_world settings apply only with dataset_name {TOY_WORLD}, got {r.dataset_name!r} (without --config "
            "the recipe is the toy world's: pass --config configuration/training/<recipe>.yaml for other data)"
        )
    if r.dataset_name == TOY_WORLD and train_dataset is None:
        from toy_world import job as toy_world_job

        return toy_world_job.run(r, train, cpu_threads=threads)
    return train(r, train_dataset, eval_dataset)


class _RunFiles:
    """What a run writes into output_dir, so that a run failing before its first optimiser step can remove it and a
    corrected rerun into the same folder is not refused as "another run". Only entries created by this run go."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.existed = os.path.isdir(output_dir)
        self.before = set(os.listdir(output_dir)) if self.existed else set()
        self.started = False  # set once a step completed (or a checkpoint was resumed): from then on files stay
        self.main_process = True

    def remove_unstarted(self) -> None:
        if self.started or not self.main_process or not os.path.isdir(self.output_dir):
            return
        for name in sorted(set(os.listdir(self.output_dir)) - self.before):
            path = os.path.join(self.output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
        if not self.existed and not os.listdir(self.output_dir):
            os.rmdir(self.output_dir)


def train(r: TrainingRecipe, train_dataset=None, eval_dataset=None) -> dict:
    """One training run of a parsed recipe (section 6); returns the final results dict.

    Everything that can be checked (recipe, output folder, model, processor, data, class names) is checked before
    anything is written; if the run still fails before its first optimiser step (a bad first batch, say), the files
    it wrote are removed again."""
    run = _RunFiles(r.output_dir)
    try:
        return _train(r, train_dataset, eval_dataset, run)
    except BaseException:
        run.remove_unstarted()
        raise


def _train(r: TrainingRecipe, train_dataset, eval_dataset, run: _RunFiles) -> dict:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.logging import get_logger
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    logger = get_logger("disa.train")
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    # ---- accelerator
    trackers = _trackers(r.report_to)
    accelerator = Accelerator(
        gradient_accumulation_steps=r.gradient_accumulation_steps,
        mixed_precision=r.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=r.output_dir, logging_dir=os.path.join(r.output_dir, "logs")),
        # the seedable sampler draws each epoch's order from (seed, epoch): a resumed run sees the same order
        dataloader_config=DataLoaderConfiguration(even_batches=True, use_seedable_sampler=True, data_seed=r.seed),
        step_scheduler_with_optimizer=False,  # the schedule counts optimiser steps; stepped in the loop
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=r.ddp_find_unused_parameters)],
    )
    if r.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run.main_process = accelerator.is_main_process
    # read-only checks first: nothing is written until the model, the data and the optimiser are set up
    C.check_output_dir(r.output_dir, r.resume_from_checkpoint, r.overwrite_output_dir)
    resume_path = C.resolve_resume(r.output_dir, r.resume_from_checkpoint)
    run.started = bool(resume_path)

    # ---- model, processor (same init on every process; DDP also broadcasts rank 0's weights)
    set_seed(r.seed)
    model, processor = build_model_and_processor(r)
    ignore_index = model.config.ignore_index  # the loss's: the labels and the metric use the same value
    if r.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- data
    with accelerator.main_process_first():
        train_set, eval_set, class_names = build_datasets(
            r, processor.image_processor, ignore_index, train_dataset, eval_dataset
        )
    text_inputs = {
        k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v
        for k, v in tokenize_classes(processor, class_names).items()
        if v is not None
    }
    model.check_prompt_templates(text_inputs.get("prompt_templates"))  # before any step; every forward checks too
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=r.per_device_train_batch_size,
        shuffle=not r.streaming,
        collate_fn=D.collate_segmentation,
        num_workers=r.dataloader_num_workers,
        drop_last=False,
    )
    eval_loader = None
    if eval_set is not None:
        eval_loader = torch.utils.data.DataLoader(
            eval_set,
            batch_size=r.per_device_eval_batch_size,
            shuffle=False,
            collate_fn=D.collate_segmentation,
            num_workers=r.dataloader_num_workers,
        )

    # ---- optimiser and schedule
    groups = optimizer_param_groups(model, r.learning_rate, r.clip_lr_multiplier, r.weight_decay, r.weight_decay_norm)
    optimizer = torch.optim.AdamW(groups, lr=r.learning_rate, betas=(r.adam_beta1, r.adam_beta2), eps=r.adam_epsilon)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if r.streaming:
        steps_per_epoch = None
        max_train_steps = r.max_train_steps
        num_epochs = sys.maxsize
    else:
        steps_per_epoch = math.ceil(len(train_loader) / r.gradient_accumulation_steps)
        max_train_steps = r.max_train_steps or math.ceil(r.num_train_epochs * steps_per_epoch)
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        r.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=r.num_warmup_steps,
        num_training_steps=max_train_steps,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)

    # ---- everything checked: now write the output folder
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        C.prepare_output_dir(r.output_dir, r.resume_from_checkpoint, r.overwrite_output_dir)
        if not resume_path:
            with open(os.path.join(r.output_dir, "recipe.yaml"), "w") as fh:
                yaml.safe_dump(recipe_record(r), fh, sort_keys=False)
            # a fresh run's log starts empty (an overwritten run's lines would otherwise stay in front of it)
            open(os.path.join(r.output_dir, "log.jsonl"), "w").close()
    accelerator.wait_for_everyone()
    hub_api = None
    if r.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import HfApi

        hub_api = HfApi(token=r.hub_token)
        hub_api.create_repo(r.hub_model_id, exist_ok=True)
    if trackers:
        accelerator.init_trackers(
            r.project_name,
            config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in recipe_record(r).items()},
        )
    total_batch = r.per_device_train_batch_size * accelerator.num_processes * r.gradient_accumulation_steps
    logger.info(
        f"classes={len(class_names)} train_samples={len(train_set) if not r.streaming else 'stream'} "
        f"processes={accelerator.num_processes} total_batch={total_batch} steps={max_train_steps}",
        main_process_only=True,
    )

    # ---- resume
    progress_state = C.TrainingProgress(
        num_processes=accelerator.num_processes,
        per_device_train_batch_size=r.per_device_train_batch_size,
        gradient_accumulation_steps=r.gradient_accumulation_steps,
    )
    C.register_progress(accelerator, progress_state)
    completed_steps, start_epoch, resume_batches = 0, 0, 0
    skipped_total, seen_total = 0, 0
    if resume_path:
        accelerator.load_state(resume_path)  # also restores progress_state
        st = progress_state
        if (st.num_processes, st.per_device_train_batch_size) != (
            accelerator.num_processes,
            r.per_device_train_batch_size,
        ):
            logger.warning("resuming with another process count / batch size: the data order will differ")
        completed_steps, start_epoch, resume_batches = st.completed_steps, st.epoch, st.batches_in_epoch
        if accelerator.is_main_process:  # totals over processes; restored on rank 0 only
            skipped_total, seen_total = st.skipped_samples, st.seen_samples
        progress_state.num_processes = accelerator.num_processes
        progress_state.per_device_train_batch_size = r.per_device_train_batch_size
        progress_state.gradient_accumulation_steps = r.gradient_accumulation_steps
        if steps_per_epoch is not None and resume_batches >= len(train_loader):
            start_epoch, resume_batches = start_epoch + 1, 0
        logger.info(
            f"resumed from {resume_path} at step {completed_steps} (epoch {start_epoch}, {resume_batches} batches in)",
            main_process_only=True,
        )

    # ---- SDM: the split statistics of every logging window, and the guard that warns when the split collapses
    from modeling_disa.evaluation.split_statistics import SplitStatistics

    use_sdm = bool(accelerator.unwrap_model(model).config.use_sdm)
    split_window = guard = None
    last_split = {}
    if use_sdm:
        split_window = SplitStatistics(ignore_index)
        guard = SplitGuard.from_recipe(
            r,
            max_train_steps,
            warnings=progress_state.split_guard_warnings,
            last_warning=progress_state.split_guard_last_warning,
        )
    else:
        logger.info(
            "the model has no SDM (use_sdm=False): no foreground split, so no split statistics and no split guard",
            main_process_only=True,
        )

    log_path = os.path.join(r.output_dir, "log.jsonl")

    def log(values: dict, step: int):
        if trackers:
            accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        if accelerator.is_main_process:
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")

    def run_eval(step: int) -> dict | None:
        if eval_loader is None:
            return None
        metrics = evaluate(model, eval_loader, accelerator, text_inputs, len(class_names), ignore_index)
        log({f"eval/{k}": v for k, v in metrics.items()}, step)
        logger.info(
            f"step {step}: eval mIoU {metrics['mIoU']:.2f} pixel acc {metrics['pixel_accuracy']:.2f}",
            main_process_only=True,
        )
        if guard is not None:
            split = {k.removeprefix("split/"): v for k, v in metrics.items() if k.startswith("split/")}
            check_split(split, step, "evaluation")
        return metrics

    def check_split(statistics: dict, step: int, source: str) -> None:
        for message in guard.check(statistics, step, source):
            logger.warning(message, main_process_only=True)
        progress_state.split_guard_warnings = guard.warnings  # saved with the next checkpoint
        progress_state.split_guard_last_warning = guard.last_warning

    # ---- training loop
    progress = tqdm(
        total=max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process, desc="train"
    )
    metrics = None
    if r.eval_before_training and completed_steps == 0:
        metrics = run_eval(0)
    model.train()
    # the window's sums of the loss and its terms (segmentation, ITM): one row each
    loss_sum = torch.zeros(3, device=accelerator.device)
    loss_count = 0
    step_start = time.perf_counter()
    for epoch in range(start_epoch, num_epochs):
        if completed_steps >= max_train_steps:
            break
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loader = train_loader
        batches_in_epoch = 0
        if epoch == start_epoch and resume_batches:
            loader = accelerator.skip_first_batches(train_loader, resume_batches)
            batches_in_epoch = resume_batches
        for batch in loader:
            with accelerator.accumulate(model):
                # output_saliency only returns what SDM computes anyway: loss and gradients are the same without it
                out = model(
                    pixel_values=batch["pixel_values"], labels=batch["labels"], output_saliency=use_sdm, **text_inputs
                )
                loss = out.loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and r.max_grad_norm > 0:  # full-model norm (frozen: no grad)
                    accelerator.clip_grad_norm_(model.parameters(), r.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batches_in_epoch += 1
            itm_loss = out.itm_loss.detach().float() if out.itm_loss is not None else torch.zeros_like(loss_sum[0])
            loss_sum += torch.stack([loss.detach().float(), out.segmentation_loss.detach().float(), itm_loss])
            loss_count += 1
            if split_window is not None:
                split_window.update(out.itm_logits, out.foreground_mask, batch["labels"], out.class_indices)
            skipped_total += int(batch["num_skipped"].sum())
            seen_total += int(batch["labels"].shape[0])
            if r.on_bad_sample == "skip":
                D.check_bad_fraction(skipped_total, seen_total, r.max_bad_sample_fraction)
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            completed_steps += 1
            run.started = True
            progress.update(1)
            if r.logging_steps and completed_steps % r.logging_steps == 0:
                mean_loss, segmentation, itm = accelerator.reduce(loss_sum / max(loss_count, 1), "mean").tolist()
                elapsed = time.perf_counter() - step_start
                lrs = {f"train/lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
                values = {"train/loss": mean_loss, "train/segmentation_loss": segmentation}
                if use_sdm:
                    values["train/itm_loss"] = itm
                if split_window is not None:
                    counts = split_window.to_tensor()
                    if accelerator.num_processes > 1:  # summed counts: the window's statistics over every process
                        counts = accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
                    last_split = SplitStatistics.from_tensor(counts, ignore_index).compute()
                    values.update({f"train/split/{name}": value for name, value in last_split.items()})
                    check_split(last_split, completed_steps, "training window")
                    split_window.reset()
                log(
                    {
                        **values,
                        **lrs,
                        "train/skipped_samples": skipped_total,
                        "train/epoch": epoch,
                        "train/sec_per_step": elapsed / r.logging_steps,
                    },
                    completed_steps,
                )
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                loss_sum.zero_()
                loss_count = 0
                step_start = time.perf_counter()
            if r.checkpointing_steps and completed_steps % r.checkpointing_steps == 0:
                counts = accelerator.reduce(
                    torch.tensor([skipped_total, seen_total], device=accelerator.device), "sum"
                ).tolist()
                progress_state.load_state_dict(
                    {
                        "completed_steps": completed_steps,
                        "epoch": epoch,
                        "batches_in_epoch": batches_in_epoch,
                        "skipped_samples": counts[0],
                        "seen_samples": counts[1],
                    }
                )
                C.save_checkpoint(accelerator, r.output_dir, completed_steps, r.checkpoints_total_limit)
            if r.eval_steps and completed_steps % r.eval_steps == 0 and completed_steps < max_train_steps:
                metrics = run_eval(completed_steps)
            C.fault("kill_after_step", completed_steps)
            if completed_steps >= max_train_steps:
                break
    progress.close()
    if skipped_total:
        logger.warning(
            f"{skipped_total} bad training samples were skipped (on_bad_sample=skip)", main_process_only=True
        )

    # ---- final validation, save, push
    metrics = run_eval(completed_steps) or metrics
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.set_default_vocabulary(class_names, processor.tokenizer)
    # gathered on every process (a collective under FSDP, where the unwrapped model only holds shards)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if r.push_to_hub:  # the complete Hub repository (config with the pipeline, code, model card), pushed below
            from modeling_disa.hub import save_for_hub

            save_for_hub(unwrapped, processor, r.output_dir, repo_id=r.hub_model_id, state_dict=state_dict)
        else:
            unwrapped.save_pretrained(r.output_dir, state_dict=state_dict)
            processor.save_pretrained(r.output_dir)
    skipped_all = int(accelerator.reduce(torch.tensor(skipped_total, device=accelerator.device), "sum"))
    results = {"completed_steps": completed_steps, "skipped_samples": skipped_all, "class_names": class_names}
    if metrics:
        results.update({f"eval_{k}": v for k, v in metrics.items()})
    if guard is not None:
        results.update({f"train_split/{name}": value for name, value in last_split.items()})  # the last window's
        results.update(guard.summary())
    if accelerator.is_main_process:
        with open(os.path.join(r.output_dir, "all_results.json"), "w") as fh:
            json.dump(results, fh, indent=1)
        if hub_api is not None:
            # the files just saved, as they are (not a second save from this process's possibly sharded model);
            # only the top level: checkpoints/, logs/ and any other subfolder stay local
            hub_api.upload_folder(
                folder_path=r.output_dir,
                repo_id=r.hub_model_id,
                repo_type="model",
                commit_message="End of training",
                ignore_patterns=HUB_IGNORE_PATTERNS,
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
