#!/usr/bin/env python
"""DiSa vs its own CAT-Seg mode in the offline toy world, on an unbiased and two foreground-biased worlds, plus the
upgrade path from CAT-Seg weights.

    python training/toy_world_comparison.py                 # full sweep (CPU, about 2.5 hours on 2 cores)
    python training/toy_world_comparison.py --smoke         # tiny world, few steps: checks the pipeline and schema

For every world x model x training seed it trains the default toy-world recipe (`configuration/training/
toy_world.yaml`, the same training path as `accelerate launch training/train.py`) with the model's preset and
`DiSaConfig` overrides, then scores the final model on two held-out splits with all 24 classes (seen and unseen):

- `dev` (its own random stream, never the test images): where designs are chosen;
- `test` (the toy world's test split): what is reported.

Worlds (`WORLDS`) differ in the captions the toy CLIP is pretrained on and in their seed (scenes, dataset, CLIP):
`unbiased` names every concept of an image; `foreground_biased` (seed 0) and `foreground_biased_ws1` (seed 1) always
name the things but each stuff region only with probability `stuff_caption_rate` (0.25, 0.4), as web alt-texts name
the objects and rarely the wall or the floor (and, with `--background_caption_rate`, say the things are "on a
background" where a stuff region goes unnamed).

The upgrade path (`UPGRADES`): from each trained `catseg` row, `catseg+continue` trains the CAT-Seg-mode model
`--upgrade_steps` more steps and `disa-upgrade` switches DiSa's parts on and trains only them for as many steps.

`goals` in the output checks the paper's claims per world (DiSa against CAT-Seg mode: PAS-20b analog and boundary IoU
+1, less foreground bias, no harm to mIoU, a worst seed no worse; the upgrade path against continued CAT-Seg).

Per row and split: mIoU over all / seen / unseen / stuff / things classes; the PAS-20b analog (`pas20b`: the 12 thing
names plus "background", which covers every stuff pixel; `pas20b_fold`: CAT-Seg's PAS-20b rule on the 24-class
prediction, every stuff name counting as background; see `toy_world/background_benchmark.py`); and for models with
SDM its presence AUROC and where its foreground tokens land (`saliency_localization`,
`modeling_disa.evaluation.saliency`).

Each finished row is written at once (atomically) under `--work_dir`; a rerun skips finished rows, so a half-finished
sweep resumes. Output: `--output` JSON `{"machine", "steps", "rows": [...], "summary": [...]}`, a Markdown table and a
PNG bar chart beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from modeling_disa import PAPER_SDM_SETTINGS  # noqa: E402

# world name -> the toy world's seed (scenes, dataset, CLIP), how often a caption names a stuff region and how often a
# caption that leaves one unnamed says the things are "on a background". `foreground_biased_ws1` (other scenes, a
# milder bias) is where DiSa's training collapse was first seen; `foreground_biased_bg` is the default world whose
# CLIP knows the word "background", so the PAS-20b analog's prompted "background" class means something to it.
WORLDS = {
    "unbiased": {"seed": 0, "stuff_caption_rate": 1.0, "background_caption_rate": 0.0},
    "foreground_biased": {"seed": 0, "stuff_caption_rate": 0.25, "background_caption_rate": 0.0},
    "foreground_biased_ws1": {"seed": 1, "stuff_caption_rate": 0.4, "background_caption_rate": 0.0},
    "foreground_biased_bg": {"seed": 0, "stuff_caption_rate": 0.25, "background_caption_rate": 1.0},
}
COLUMNS = ("all", "seen", "unseen", "stuff", "things", "unseen_stuff")
SCORE_KEYS = {
    "all": "mIoU",
    "seen": "seen",
    "unseen": "unseen",
    "stuff": "stuff",
    "things": "things",
    "unseen_stuff": "unseen_stuff",
}
# Columns added after the first committed sweep (rows without them stay valid): column -> path in a row. Summarised,
# tabled and charted wherever the rows of a (world, model) all have them.
EXTRA_COLUMNS = {
    "pas20b": ("pas20b",),
    "pas20b_bg": ("pas20b_background",),
    "pas20b_fold": ("pas20b_fold",),
    "boundary_iou": ("boundary_iou",),
    "stuff_as_thing": ("stuff_predicted_as_thing",),
    "thing_as_stuff": ("thing_predicted_as_stuff",),
    "fg_on_class": ("saliency_localization", "foreground_precision"),
    "fg_recall": ("saliency_localization", "foreground_recall"),
    "fg_any": ("saliency_localization", "present_with_foreground"),
}
SHARE_COLUMNS = ("fg_on_class", "fg_recall", "fg_any")  # shares in [0, 1], not mIoU %
CHART_EXTRAS = ("pas20b", "pas20b_fold")


def column_value(item: dict, column: str):
    """A row's (or a dev dict's) value of a column; `KeyError` when the row has none."""
    if column in SCORE_KEYS:
        return item[column]
    value = item
    for key in EXTRA_COLUMNS[column]:
        value = value[key]
    return value


def _has(item: dict, column: str) -> bool:
    try:
        column_value(item, column)
    except KeyError:
        return False
    return True


CATSEG_PRESET = "configuration/models/catseg-toy"
DISA_PRESET = "configuration/models/disa-toy"
# The models this script trains. Rows of models that are no longer here (the first SDM design "disa-first-wave" and
# the ablation steps from it to the shipped design, "fw+detach", "cost-saliency+own+presence+shared+copy", ...) were
# measured with DiSaConfig switches that have since been retired; they stay in benchmarks/results/toy_world_*.json
# (each row records its overrides) and their tables are still rendered from there.
MODELS = {
    "catseg": (CATSEG_PRESET, {}),
    "disa": (DISA_PRESET, {}),  # the shipped DiSa defaults
    "disa-sdm-only": (DISA_PRESET, {"use_hrm": False}),  # the paper's ablation axes, one module at a time
    "disa-hrm-only": (DISA_PRESET, {"use_sdm": False}),
    # the literal reading of the paper's SDM (ITM cross-attention over CLIP tokens + Grad-CAM, k = 96 / 576 for every
    # class, weighted fusion), with 4 heads at the toy CLIP's width 64 as the first design had
    "disa-paper": (DISA_PRESET, {**PAPER_SDM_SETTINGS, "sdm_num_heads": 4}),
}
# The upgrade path (CAT-Seg weights -> DiSa): rows that start from this world's and seed's trained `catseg` row and
# train `--upgrade_steps` more steps. `catseg+continue` trains the CAT-Seg-mode model on, as its own recipe does
# (CLIP's q/v and the head); `disa-upgrade` switches SDM and HRM on (the background branch starts as a copy of the
# host, HRM as the identity, so it starts as the CAT-Seg model) and trains only what DiSa adds
# (`configuration/training/upgrade_catseg_to_disa.yaml`); `disa-upgrade-all` switches them on and trains everything
# `catseg+continue` trains as well. model -> (base model, DiSaConfig overrides, trainable parameters).
UPGRADES = {
    "catseg+continue": ("catseg", {}, "all"),
    "disa-upgrade": ("catseg", {"use_sdm": True, "use_hrm": True}, "disa"),
    "disa-upgrade-all": ("catseg", {"use_sdm": True, "use_hrm": True}, "all"),
}
DEFAULT_MODELS = ("catseg", "disa", "catseg+continue", "disa-upgrade")


def machine_info() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu",
        "threads_per_run": 1,
    }


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as fh:
        json.dump(value, fh, indent=1)
    os.replace(tmp, path)


def world_spec(args, world: str) -> dict:
    """The world's seed and caption rates: its own (`WORLDS`), or `--world_seed` (every world),
    `--stuff_caption_rate` and `--background_caption_rate` (the foreground-biased worlds) where given."""
    spec = dict(WORLDS[world])
    if args.world_seed is not None:
        spec["seed"] = args.world_seed
    if spec["stuff_caption_rate"] < 1.0:  # the unbiased world names every region: no rate of it can change
        for name in ("stuff_caption_rate", "background_caption_rate"):
            if getattr(args, name) is not None:
                spec[name] = getattr(args, name)
    return spec


def toy_world_settings(args, world: str) -> dict:
    values = {**world_spec(args, world), "compare_catseg": False}
    if args.cache_dir:
        values["cache_dir"] = args.cache_dir
    if args.smoke:
        values.update(num_train=32, num_validation=8, num_test=16, clip={"steps": 4, "batch_size": 16})
    return values


def recipe_for(args, world: str, model: str, seed: int, output_dir: str):
    import train as T
    from toy_world import job as toy_world_job

    if model in UPGRADES:
        base, overrides, trainable = UPGRADES[model]
        argv = [
            "--model_name_or_path",
            base_run_dir(args, world, base, seed),
            "--model_preset",
            "",
            "--trainable_parameters",
            trainable,
            "--max_train_steps",
            str(args.upgrade_steps),
        ]
    else:
        preset, overrides = MODELS[model]
        argv = ["--model_preset", preset, "--max_train_steps", str(args.steps)]
    argv += [
        "--seed",
        str(seed),
        "--output_dir",
        output_dir,
        "--overwrite_output_dir",
        "true",
        "--report_to",
        "none",
        "--logging_steps",
        "100",
        "--toy_world",
        json.dumps(toy_world_settings(args, world)),
    ]
    if overrides:
        argv += ["--model_config_overrides", json.dumps(overrides)]
    if args.smoke:
        argv += ["--per_device_train_batch_size", "2"]
    recipe = T.parse_args(argv)
    prepared, _, info = toy_world_job.prepare(recipe)
    return prepared, info


def _auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula; None without both classes."""
    pos, neg = scores[targets], scores[~targets]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def score_split(
    model, images: np.ndarray, labels: np.ndarray, text: dict, batch_size: int = 32, pas20b_text: dict | None = None
) -> dict:
    """mIoU columns, the PAS-20b analog (`pas20b_fold` always; `pas20b` when `pas20b_text`, the tokenized
    `PAS20B_NAMES`, is given) plus, for a model with SDM, its presence AUROC and how its foreground tokens are spent
    (`saliency_localization`: `modeling_disa.evaluation.saliency.SaliencyLocalization` on the 24-class run)."""
    import torch

    import toy_world as W
    from modeling_disa.evaluation.saliency import SaliencyLocalization
    from toy_world import normalize_images
    from toy_world.job import subset_scores

    def upsampled_argmax(logits):
        logits = torch.nn.functional.interpolate(
            logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        return logits.argmax(1).numpy()

    preds, analog_preds, presence_logits, fg_counts = [], [], [], []
    localization = SaliencyLocalization(ignore_index=255)
    with torch.no_grad():
        text_embeds = model.get_text_embeddings(**text)
        analog_embeds = model.get_text_embeddings(**pas20b_text) if pas20b_text is not None else None
        for i in range(0, len(images), batch_size):
            pixel_values = normalize_images(images[i : i + batch_size])
            out = model(pixel_values=pixel_values, text_embeds=text_embeds, output_saliency=model.config.use_sdm)
            preds.append(upsampled_argmax(out.logits))
            if out.itm_logits is not None:
                presence_logits.append(out.itm_logits.float().numpy())
                fg_counts.append(out.foreground_mask.flatten(2).sum(-1).numpy())
                localization.update(out.foreground_mask, labels[i : i + batch_size])
            if analog_embeds is not None:
                analog_preds.append(
                    upsampled_argmax(model(pixel_values=pixel_values, text_embeds=analog_embeds).logits)
                )
    pred = np.concatenate(preds)
    scores = subset_scores(pred, labels)
    row = {column: scores[key] for column, key in SCORE_KEYS.items()}
    row.update(boundary_and_bias(pred, labels))
    row["pas20b_scores"] = {"folded": W.pas20b_scores(W.to_pas20b_ids(pred), labels)}
    row["pas20b_fold"] = row["pas20b_scores"]["folded"]["mIoU"]
    if analog_preds:
        row["pas20b_scores"]["prompted"] = W.pas20b_scores(np.concatenate(analog_preds), labels)
        row["pas20b"] = row["pas20b_scores"]["prompted"]["mIoU"]
        row["pas20b_background"] = row["pas20b_scores"]["prompted"]["background"]
    if presence_logits:
        logits = np.concatenate(presence_logits)
        fg = np.concatenate(fg_counts).astype(np.float64)
        present = np.stack([np.isin(np.arange(len(W.CLASS_NAMES)), np.unique(lab)) for lab in labels])
        unseen_stuff = [i for i in W.UNSEEN_IDS if i in W.STUFF_IDS]
        row["presence_auroc"] = {
            "seen": _auroc(logits[:, W.SEEN_IDS].ravel(), present[:, W.SEEN_IDS].ravel()),
            "unseen": _auroc(logits[:, W.UNSEEN_IDS].ravel(), present[:, W.UNSEEN_IDS].ravel()),
            "unseen_stuff": _auroc(logits[:, unseen_stuff].ravel(), present[:, unseen_stuff].ravel()),
        }
        total = fg.sum()
        row["foreground_tokens_on_absent_classes"] = float(fg[~present].sum() / total) if total else 0.0
        row["mean_foreground_k_present"] = float(fg[present].mean())
        row["saliency_localization"] = localization.compute()
    return row


def boundary_and_bias(pred: np.ndarray, labels: np.ndarray) -> dict:
    """Boundary IoU over the 24 classes and the foreground-bias rates (things = the non-stuff classes), in %, of
    predictions `(N, H, W)` against labels `(N, H, W)`."""
    import toy_world as W
    from modeling_disa.evaluation.boundary import BoundaryIoU
    from modeling_disa.evaluation.metrics import SegmentationConfusionMatrix, foreground_bias_rates

    num_classes = len(W.CLASS_NAMES)
    boundary = BoundaryIoU(num_classes, ignore_index=255)
    confusion = SegmentationConfusionMatrix(num_classes, ignore_index=255)
    for p, t in zip(pred, labels):
        boundary.update(p, t)
        confusion.update(p, t)
    rates = foreground_bias_rates(confusion.confusion, ~np.isin(np.arange(num_classes), W.STUFF_IDS))
    return {
        "boundary_iou": 100.0 * float(boundary.compute()["mean_boundary_iou"]),
        "stuff_predicted_as_thing": 100.0 * float(rates["stuff_predicted_as_thing"]),
        "thing_predicted_as_stuff": 100.0 * float(rates["thing_predicted_as_stuff"]),
    }


def run_row(args, world: str, model_name: str, seed: int) -> dict:
    """Train one (world, model, seed) and score it on dev and test."""
    import datasets
    import torch

    import toy_world as W
    import train as T
    from modeling_disa import DiSaForOpenVocabSegmentation, DiSaProcessor

    torch.set_num_threads(1)
    output_dir = base_run_dir(args, world, model_name, seed)
    start = time.perf_counter()
    recipe, info = recipe_for(args, world, model_name, seed, output_dir)
    T.train(recipe)
    train_seconds = time.perf_counter() - start

    model = DiSaForOpenVocabSegmentation.from_pretrained(output_dir).eval()
    processor = DiSaProcessor.from_pretrained(output_dir)
    tokens = processor(text=list(W.CLASS_NAMES), return_tensors="pt")
    text = {"input_ids": tokens["input_ids"], "attention_mask": tokens.get("attention_mask")}
    tokens = processor(text=list(W.PAS20B_NAMES), return_tensors="pt")
    pas20b_text = {"input_ids": tokens["input_ids"], "attention_mask": tokens.get("attention_mask")}
    test = datasets.load_from_disk(info["world_dir"])["test"]
    test_images = np.stack([np.asarray(im.convert("RGB")) for im in test["image"]])
    test_labels = np.stack([np.asarray(lab) for lab in test["label"]]).astype(np.int64)
    world_settings = W.WorldSettings(**info["world_settings"])
    dev = W.generate_split(world_settings, "dev", num=args.num_dev)
    row = {
        "world": world,
        "model": model_name,
        "seed": seed,
        "stuff_caption_rate": info["clip_settings"]["stuff_caption_rate"],
        "background_caption_rate": info["clip_settings"]["background_caption_rate"],
        "world_seed": world_spec(args, world)["seed"],
        "overrides": UPGRADES[model_name][1] if model_name in UPGRADES else MODELS[model_name][1],
        **(
            {
                "upgrade_from": UPGRADES[model_name][0],
                "upgrade_steps": args.upgrade_steps,
                "trainable_parameters": UPGRADES[model_name][2],
            }
            if model_name in UPGRADES
            else {}
        ),
        **score_split(model, test_images, test_labels, text, pas20b_text=pas20b_text),
        "dev": score_split(
            model, np.stack(dev["image"]), np.stack(dev["label"]).astype(np.int64), text, pas20b_text=pas20b_text
        ),
        "train_seconds": round(train_seconds, 1),
        "clip_zero_shot_accuracy": info["clip_pretraining"]["zero_shot_accuracy"],
    }
    return row


def world_baselines(args, world: str) -> dict:
    """What the world's CLIP knows before any head is trained: its zero-shot stuff / thing accuracy and the
    dense-CLIP baseline (argmax of the cosine cost volume of its dense features) on the test split, with the 24
    classes and on the PAS-20b analog (thing names + "background"; and the 24-class prediction folded)."""
    import datasets
    import torch
    from transformers import AutoTokenizer, CLIPModel

    import toy_world as W
    from modeling_disa.model.configuration_disa import DEFAULT_PROMPT_TEMPLATE
    from toy_world.job import _predict, subset_scores

    _, info = recipe_for(args, world, "catseg", 0, os.path.join(args.work_dir, "prepare"))
    clip = CLIPModel.from_pretrained(info["clip_dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(info["clip_dir"])
    text = tokenizer([DEFAULT_PROMPT_TEMPLATE.format(n) for n in W.CLASS_NAMES], padding=True, return_tensors="pt")
    test = datasets.load_from_disk(info["world_dir"])["test"]
    images = np.stack([np.asarray(im.convert("RGB")) for im in test["image"]])
    labels = np.stack([np.asarray(lab) for lab in test["label"]]).astype(np.int64)
    size = labels.shape[-1]
    pred = _predict(
        lambda pv: W.dense_clip_logits(clip, pv, text["input_ids"], text["attention_mask"], size), images, 32, size
    )
    analog_text = tokenizer(
        [DEFAULT_PROMPT_TEMPLATE.format(n) for n in W.PAS20B_NAMES], padding=True, return_tensors="pt"
    )
    analog_pred = _predict(
        lambda pv: W.dense_clip_logits(clip, pv, analog_text["input_ids"], analog_text["attention_mask"], size),
        images,
        32,
        size,
    )
    with torch.no_grad():
        scores = subset_scores(pred, labels)
    prompted = W.pas20b_scores(analog_pred, labels)
    dense = {column: scores[key] for column, key in SCORE_KEYS.items()}
    dense.update(
        pas20b=prompted["mIoU"],
        pas20b_background=prompted["background"],
        pas20b_fold=W.pas20b_scores(W.to_pas20b_ids(pred), labels)["mIoU"],
    )
    return {
        "stuff_caption_rate": info["clip_settings"]["stuff_caption_rate"],
        "background_caption_rate": info["clip_settings"]["background_caption_rate"],
        "clip_zero_shot_accuracy": info["clip_pretraining"]["zero_shot_accuracy"],
        "dense_clip": dense,
        "dense_clip_pas20b_per_class_iou": prompted["per_class_iou"],
    }


def summarise(rows: list[dict], split: str = "test") -> list[dict]:
    """Mean and sd over seeds per (world, model)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["world"], row["model"]), []).append(row if split == "test" else row["dev"])
    out = []
    for (world, model), items in groups.items():
        entry = {"world": world, "model": model, "split": split, "seeds": len(items)}
        extras = [c for c in EXTRA_COLUMNS if all(_has(item, c) for item in items)]
        for column in (*COLUMNS, *extras):
            values = np.array([column_value(item, column) for item in items], dtype=np.float64)  # None -> nan
            if np.isnan(values).all():
                entry[column] = {"mean": float("nan"), "sd": float("nan"), "min": float("nan")}
                continue
            entry[column] = {
                "mean": float(np.nanmean(values)),
                "sd": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": float(np.nanmin(values)),
            }
        out.append(entry)
    return out


def _table_columns(entries) -> list[str]:
    """COLUMNS, then the extra columns that some entry has."""
    return [*COLUMNS, *(c for c in EXTRA_COLUMNS if any(c in e for e in entries))]


COLUMN_LEGEND = {
    "pas20b": 'PAS-20b analog, mIoU over the things and "background" (prompted)',
    "pas20b_bg": "its background IoU",
    "pas20b_fold": "CAT-Seg's PAS-20b rule on the 24-class prediction (any stuff name counts as background)",
    "boundary_iou": "Boundary IoU (Cheng et al. 2021, d = 2 % of the image diagonal), mean over classes present",
    "stuff_as_thing": "foreground bias: % of stuff pixels predicted as a thing class",
    "thing_as_stuff": "% of thing pixels predicted as a stuff class",
    "fg_on_class": "share of SDM's foreground tokens that lie on their own class",
    "fg_recall": "share of each present class's tokens that its foreground covers",
    "fg_any": "share of present classes with any foreground token",
}


def _legend(columns) -> list[str]:
    extras = [c for c in columns if c in COLUMN_LEGEND]
    return ["", *(f"- {c}: {COLUMN_LEGEND[c]}" for c in extras)] if extras else []


def _cell(entry: dict, column: str) -> str:
    if column not in entry:
        return "-"
    digits = 2 if column in SHARE_COLUMNS else 1
    return f"{entry[column]['mean']:.{digits}f} +- {entry[column]['sd']:.{digits}f}"


# (name, model, reference, column, margin, use): `model`'s mean must beat `reference`'s by `margin` (a negative margin
# allows a loss); `use` "min" compares the worst seeds; `lower` columns must go down. Worlds without both models skip.
GOALS = (
    ("PAS-20b analog +1", "disa", "catseg", "pas20b", 1.0, "mean"),
    ("PAS-20b folded +1", "disa", "catseg", "pas20b_fold", 1.0, "mean"),
    ("boundary IoU +1", "disa", "catseg", "boundary_iou", 1.0, "mean"),
    ("less foreground bias", "disa", "catseg", "stuff_as_thing", 0.0, "lower"),
    ("no harm: all-class mIoU >= -0.5", "disa", "catseg", "all", -0.5, "mean"),
    ("stability: worst seed >= -1", "disa", "catseg", "all", -1.0, "min"),
    ("stretch: all-class mIoU +2", "disa", "catseg", "all", 2.0, "mean"),
    ("upgrade: PAS-20b analog >= continued CAT-Seg", "disa-upgrade", "catseg+continue", "pas20b", 0.0, "mean"),
    ("upgrade: PAS-20b folded >= continued CAT-Seg", "disa-upgrade", "catseg+continue", "pas20b_fold", 0.0, "mean"),
    ("upgrade: PAS-20b analog >= continued CAT-Seg", "disa-upgrade-all", "catseg+continue", "pas20b", 0.0, "mean"),
    (
        "upgrade: PAS-20b folded >= continued CAT-Seg",
        "disa-upgrade-all",
        "catseg+continue",
        "pas20b_fold",
        0.0,
        "mean",
    ),
    ("upgrade: all-class mIoU >= continued CAT-Seg", "disa-upgrade", "catseg+continue", "all", 0.0, "mean"),
    ("upgrade: all-class mIoU >= continued CAT-Seg", "disa-upgrade-all", "catseg+continue", "all", 0.0, "mean"),
)


def goal_checks(summary: list[dict]) -> list[dict]:
    """Each goal of `GOALS` per world, on the test split: the two values, their difference and whether it holds."""
    entries = {(e["world"], e["model"]): e for e in summary if e["split"] == "test"}
    checks = []
    for world in dict.fromkeys(e["world"] for e in summary):
        for name, model, reference, column, margin, use in GOALS:
            ours, theirs = entries.get((world, model)), entries.get((world, reference))
            if ours is None or theirs is None or column not in ours or column not in theirs:
                continue
            stat = "min" if use == "min" else "mean"
            value, base = ours[column][stat], theirs[column][stat]
            delta = value - base
            met = delta < margin if use == "lower" else delta >= margin
            checks.append(
                {
                    "world": world,
                    "goal": name,
                    "model": model,
                    "reference": reference,
                    "column": column,
                    "statistic": stat,
                    "value": value,
                    "reference_value": base,
                    "difference": delta,
                    "met": bool(met),
                }
            )
    return checks


def goals_table(checks: list[dict]) -> str:
    lines = ["| world | goal | model | reference | difference | met |", "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(
            f"| {c['world']} | {c['goal']} | {c['model']} {c['value']:.2f} | {c['reference']} "
            f"{c['reference_value']:.2f} | {c['difference']:+.2f} | {'yes' if c['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def markdown_table(summary: list[dict], steps: int) -> str:
    columns = _table_columns(summary)
    lines = [
        f"Toy world, {steps} training steps, mean +- sd over training seeds (mIoU %, test split unless noted)",
        "",
        "| world | split | model | seeds | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for entry in summary:
        cells = [_cell(entry, c) for c in columns]
        lines.append(
            f"| {entry['world']} | {entry['split']} | {entry['model']} | {entry['seeds']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines + _legend(columns)) + "\n"


README_START = "<!-- toy_world_comparison.json: start (generated by training/toy_world_comparison.py) -->"
README_END = "<!-- toy_world_comparison.json: end -->"


def headline_table(
    summary: list[dict],
    steps: int,
    baselines: dict | None = None,
    models=(*DEFAULT_MODELS, "disa-paper", "disa-first-wave"),
    goals: list[dict] | None = None,
    worlds: dict | None = None,
) -> str:
    """The README / model-card table: test split, the shipped models, mean +- sd over seeds, and per world the
    dense-CLIP baseline (no head) and the CLIP's zero-shot stuff / thing accuracy (with `worlds`, the world seeds);
    with `goals` (`goal_checks`), the goals table under it."""
    names = {
        "catseg": "CAT-Seg mode",
        "disa": "DiSa (shipped defaults)",
        "disa-first-wave": "DiSa, first design",
        "catseg+continue": "CAT-Seg mode, trained on (upgrade baseline)",
        "disa-upgrade": "DiSa upgraded from CAT-Seg mode (DiSa's parts trained)",
        "disa-upgrade-all": "DiSa upgraded from CAT-Seg mode (all trained)",
        "disa-paper": "DiSa, paper's SDM",
    }
    columns = _table_columns([e for e in summary if e["split"] == "test" and e["model"] in models])
    lines = [f"| world | model | seeds | {' | '.join(columns)} |", "|---" * (len(columns) + 3) + "|"]
    for world in dict.fromkeys(e["world"] for e in summary):
        for entry in summary:
            if entry["split"] != "test" or entry["world"] != world or entry["model"] not in models:
                continue
            cells = [_cell(entry, c) for c in columns]
            lines.append(
                f"| {world.replace('_', '-')} | {names[entry['model']]} | {entry['seeds']} | "
                + " | ".join(cells)
                + " |"
            )
        if baselines and world in baselines:
            dense = baselines[world]["dense_clip"]
            lines.append(
                f"| {world.replace('_', '-')} | dense CLIP, no head | - | "
                + " | ".join(f"{column_value(dense, c):.1f}" if _has(dense, c) else "-" for c in columns)
                + " |"
            )
    lines += _legend(columns)
    if baselines:
        lines.append("")
        for world, base in baselines.items():
            acc = base["clip_zero_shot_accuracy"]
            background = base.get("background_caption_rate", 0.0)
            said = f'; "on a background" where one goes unnamed, with probability {background:g}' if background else ""
            seed = f"world seed {worlds[world]['seed']}, " if worlds and world in worlds else ""
            lines.append(
                f"- {world.replace('_', '-')} world ({seed}captions name a stuff region with probability "
                f"{base['stuff_caption_rate']:g}{said}): toy CLIP zero-shot accuracy {100 * acc['stuff_all']:.0f} % "
                f"on stuff, {100 * acc['things_all']:.0f} % on things."
            )
    if goals:
        lines += ["", "Goals (test split, mean over seeds unless the goal names the worst seed):", ""]
        lines.append(goals_table(goals).rstrip("\n"))
    return f"Test mIoU %, {steps} training steps, mean +- sd over training seeds:\n\n" + "\n".join(lines) + "\n"


def update_document(path: str, table: str) -> None:
    """Replace the generated block of a document (README, model card) with `table`."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{path} has no generated comparison block ({README_START!r} ... {README_END!r}).")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(head + README_START + "\n" + table + README_END + tail)


def bar_chart(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [e for e in summary if e["split"] == "test"]
    columns = [*COLUMNS, *(c for c in CHART_EXTRAS if any(c in e for e in summary))]
    worlds = list(dict.fromkeys(e["world"] for e in summary))
    models = list(dict.fromkeys(e["model"] for e in summary))
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 3.6), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, world in zip(axes[0], worlds):
        for i, model in enumerate(models):
            entry = next((e for e in summary if e["world"] == world and e["model"] == model), None)
            if entry is None:
                continue
            x = np.arange(len(columns)) + (i - (len(models) - 1) / 2) * width
            missing = {"mean": np.nan, "sd": np.nan}
            ax.bar(
                x,
                [entry.get(c, missing)["mean"] for c in columns],
                width,
                yerr=[entry.get(c, missing)["sd"] for c in columns],
                label=model,
                capsize=2,
            )
        ax.set_xticks(np.arange(len(columns)), columns, fontsize=8)
        ax.set_title(world)
        ax.set_ylabel("test mIoU %")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted({*MODELS, *UPGRADES}))
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's, 800)")
    parser.add_argument(
        "--upgrade_steps",
        type=int,
        default=None,
        help=f"steps of the upgrade-path rows {sorted(UPGRADES)} on top of their base row (default: steps / 4)",
    )
    parser.add_argument("--world_seed", type=int, default=None, help="every world's seed (default: each world's own)")
    parser.add_argument(
        "--stuff_caption_rate",
        type=float,
        default=None,
        help="the foreground-biased worlds' stuff caption rate (default: each world's own)",
    )
    parser.add_argument(
        "--background_caption_rate",
        type=float,
        default=None,
        help='the foreground-biased worlds: share of the captions leaving a stuff region unnamed that say "on a '
        "background\" (the toy CLIP learns the word the PAS-20b analog prompts); default: each world's own",
    )
    parser.add_argument("--num_dev", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2, help="rows trained at once (one CPU thread each)")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="rows run on CPU (the toy world is tiny)")
    parser.add_argument("--cache_dir", default=None, help="toy-world cache (default ~/.cache/disa/toy_world)")
    parser.add_argument("--work_dir", default=os.path.join(REPO_ROOT, "runs", "toy-world-comparison"))
    parser.add_argument(
        "--output", default=os.path.join(REPO_ROOT, "benchmarks", "results", "toy_world_comparison.json")
    )
    parser.add_argument("--smoke", action="store_true", help="tiny world, 3 steps, for CI")
    parser.add_argument(
        "--update_docs",
        action="store_true",
        help="rewrite the generated comparison table in README.md and model_card.md",
    )
    parser.add_argument(
        "--collect_only",
        action="store_true",
        help="train nothing: summarise the rows already finished under --work_dir",
    )
    parser.add_argument(
        "--baselines_only",
        action="store_true",
        help="train nothing: write each world's toy-CLIP baselines (zero-shot accuracy, dense CLIP on the 24 classes "
        "and on the PAS-20b analog) to --output",
    )
    parser.add_argument("--row", nargs=3, metavar=("WORLD", "MODEL", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.smoke else 800
    if args.upgrade_steps is None:
        args.upgrade_steps = max(1, args.steps // 4)
    if args.smoke:
        args.num_dev = min(args.num_dev, 16)
    specs = {world: tuple(world_spec(args, world).values()) for world in args.worlds}
    if len(set(specs.values())) < len(specs):
        parser.error(f"--world_seed / --stuff_caption_rate make worlds the same: {specs}; pick one of them")
    missing = sorted({UPGRADES[m][0] for m in args.models if m in UPGRADES} - set(args.models))
    if missing and not args.row:
        parser.error(f"upgrade-path rows start from the trained {missing} rows: add {missing} to --models")

    if args.row:  # one row, in a worker process
        world, model, seed = args.row
        row = run_row(args, world, model, int(seed))
        _write_json(row_path(args, world, model, int(seed)), row)
        return 0

    os.makedirs(args.work_dir, exist_ok=True)
    if args.baselines_only:
        return write_baselines(args, argv)
    if args.collect_only:
        return write_results(args, argv)
    # the worlds (dataset + toy CLIP) once, before any worker needs them
    for world in args.worlds:
        recipe_for(args, world, "catseg", args.seeds[0], os.path.join(args.work_dir, "prepare"))
    # seed-major order: a sweep stopped half-way still has complete seeds for every model
    todo = [
        (w, m, s)
        for s in args.seeds
        for w in args.worlds
        for m in args.models
        if not os.path.isfile(row_path(args, w, m, s))
    ]
    todo.sort(key=lambda item: (item[2], item[1] in UPGRADES))  # an upgrade row after its base row
    print(f"[comparison] {len(todo)} rows to train ({args.steps} steps each), {args.jobs} at a time", flush=True)
    if args.jobs <= 1:
        for w, m, s in todo:
            _write_json(row_path(args, w, m, s), run_row(args, w, m, s))
    else:
        run_workers(args, argv if argv is not None else sys.argv[1:], todo)

    return write_results(args, argv)


def write_results(args, argv) -> int:
    paths = [row_path(args, w, m, s) for w in args.worlds for m in args.models for s in args.seeds]
    rows = [json.load(open(p)) for p in paths if os.path.isfile(p)]
    if not rows:
        raise SystemExit(f"no finished rows under {args.work_dir}")
    summary = summarise(rows, "test") + summarise(rows, "dev")
    baselines = {world: world_baselines(args, world) for world in dict.fromkeys(r["world"] for r in rows)}
    result = {
        "machine": machine_info(),
        "steps": args.steps,
        "upgrade_steps": args.upgrade_steps,
        "worlds": {world: world_spec(args, world) for world in baselines},
        "baselines": baselines,
        "smoke": args.smoke,
        "rows": rows,
        "summary": summary,
        "goals": goal_checks(summary),
        "command": "python training/toy_world_comparison.py " + " ".join(argv or sys.argv[1:]),
    }
    _write_json(args.output, result)
    table = markdown_table(summary, args.steps)
    if result["goals"]:
        table += "\nGoals (test split; the upgrade rows train " + f"{args.upgrade_steps} steps):\n\n"
        table += goals_table(result["goals"])
    base = os.path.splitext(args.output)[0]
    with open(base + ".md", "w") as fh:
        fh.write(table)
    bar_chart(summary, base + ".png")
    print(table)
    if args.update_docs:
        for doc in ("README.md", "model_card.md"):
            update_document(
                os.path.join(REPO_ROOT, doc),
                headline_table(summary, args.steps, baselines, goals=result["goals"], worlds=result["worlds"]),
            )
    return 0


def write_baselines(args, argv) -> int:
    """What each world's toy CLIP does before any head is trained, without training a row."""
    baselines = {world: world_baselines(args, world) for world in args.worlds}
    _write_json(
        args.output,
        {
            "machine": machine_info(),
            "worlds": {world: world_spec(args, world) for world in args.worlds},
            "smoke": args.smoke,
            "baselines": baselines,
            "command": "python training/toy_world_comparison.py " + " ".join(argv or sys.argv[1:]),
        },
    )
    for world, base in baselines.items():
        dense = base["dense_clip"]
        print(
            f"[baselines] {world}: dense CLIP all {dense['all']:.1f}, stuff {dense['stuff']:.1f}, things "
            f"{dense['things']:.1f}; PAS-20b analog {dense['pas20b']:.1f} (background IoU "
            f"{dense['pas20b_background']:.1f}), folded {dense['pas20b_fold']:.1f}"
        )
    return 0


def row_path(args, world: str, model: str, seed: int) -> str:
    spec = world_spec(args, world)
    tag = f"ws{spec['seed']}-r{spec['stuff_caption_rate']}-s{args.steps}"
    if spec["background_caption_rate"]:  # a different toy CLIP: its rows must not resume the others
        tag += f"-bg{spec['background_caption_rate']}"
    tag += "-smoke" if args.smoke else ""
    return os.path.join(args.work_dir, "rows", tag, f"{_run_name(args, world, model, seed)}.json")


def base_run_dir(args, world: str, model: str, seed: int) -> str:
    """The folder a row's trained model is saved in (an upgrade-path row starts from its base row's)."""
    return os.path.join(args.work_dir, "runs", _run_name(args, world, model, seed))


def _run_name(args, world: str, model: str, seed: int) -> str:
    steps = f"-u{args.upgrade_steps}" if model in UPGRADES else ""  # rows of other upgrade lengths stay apart
    return f"{world}-{model}{steps}-{seed}"


def _base_finished(args, world: str, model: str, seed: int) -> bool:
    return model not in UPGRADES or os.path.isfile(row_path(args, world, UPGRADES[model][0], seed))


def run_workers(args, argv: list[str], todo: list) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    running: list = []
    queue = list(todo)
    failed = []
    while queue or running:
        if queue and not running and not any(_base_finished(args, *item) for item in queue):
            raise SystemExit(f"rows {queue} wait for base rows that failed or were not scheduled")
        while len(running) < args.jobs:
            ready = [item for item in queue if _base_finished(args, *item)]
            if not ready:
                break
            w, m, s = ready[0]
            queue.remove(ready[0])
            log = open(os.path.join(args.work_dir, f"{w}-{m}-{s}.log"), "w")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--row", w, m, str(s)]
            running.append(((w, m, s), subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in list(running):
            key, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log.name})"
                print(f"[comparison] {key}: {status}", flush=True)
                if proc.returncode != 0:
                    failed.append(key)
    if failed:
        raise SystemExit(f"{len(failed)} rows failed: {failed}")


if __name__ == "__main__":
    sys.exit(main())
