#!/usr/bin/env python
"""Evaluate a DiSa model on the open-vocabulary evaluation datasets (CAT-Seg protocol) -> JSON, Markdown and a
model-index.

    python training/run_evaluation.py --model org/disa-vit-b-16 \
        --datasets ade847 pc459 ade150 pc59 voc20 voc20b --data_dir /data/disa-benchmarks \
        --output results/disa-b.json --markdown results/disa-b.md --model_index results/model-index.yaml

Data source: ``--data_dir`` (a folder written by training/prepare_datasets.py) or ``--hub_dataset REPO`` (the same
layout on the Hub, one config per evaluation dataset). Inference: ``--mode sliding`` (published protocol: warp 640,
384 windows, stride 256, global view) or ``whole``; ``--dtype bf16`` runs the model under autocast
(on a CPU only where it has bfloat16 instructions: AVX512_BF16 / AMX; otherwise refused); ``--torch_compile`` (with
``--torch_compile_backend`` / ``--torch_compile_mode``, which turn it on too) runs it through ``torch.compile``.
mIoU uses one confusion matrix over the whole split, averaged over classes present in the ground truth
(``--miou_rule present_in_gt_or_pred`` for the other rule). Under ``accelerate launch`` each process takes every
n-th image and the matrices are summed.

Optional measures: ``--boundary_iou`` adds Boundary IoU (IoU of the class boundary regions, 2 % of the image diagonal
wide by default, ``--boundary_dilation_ratio``), averaged with the same rule; ``--thing_classes split.json`` adds the
foreground-bias rates (share of stuff / background pixels predicted as a thing class, and the reverse) for every
dataset the file names: ``{"voc20b": ["aeroplane", ...]}``, thing classes by their scored names, every other scored
class counting as stuff. The dataset definitions carry no thing / stuff split, so it is always the user's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import EvalResult
from huggingface_hub.repocard_data import eval_results_to_model_index

from modeling_disa import check_inference_dtype, compile_for_inference, compile_settings
from modeling_disa.evaluation.boundary import DEFAULT_DILATION_RATIO, BoundaryIoU
from modeling_disa.evaluation.dataset_definitions import (
    EVALUATION_DATASETS,
    ClassListMismatchError,
    load_evaluation_dataset,
)
from modeling_disa.evaluation.metrics import (
    RULES,
    SegmentationConfusionMatrix,
    foreground_bias_rates,
    results_table_row,
)
from modeling_disa.model.inference import predict_segmentation

DEFAULT_SPLIT = "validation"  # every evaluation dataset is scored on its validation split (COCO-Stuff's val2017)


def load_split(bench, data_dir: Path | None, hub_dataset: str | None, split: str):
    import datasets

    if data_dir is not None:
        folder = Path(data_dir) / "data" / bench.hub_config
        meta_file = folder / "metadata.json"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{meta_file} not found: prepare it with training/prepare_datasets.py {bench.name}."
            )
        meta = json.loads(meta_file.read_text())
        files = sorted(str(p) for p in folder.glob(f"{split}-*.parquet"))
        if not files:
            raise FileNotFoundError(f"No {split} parquet files in {folder}.")
        ds = datasets.load_dataset("parquet", data_files={split: files}, split=split)
    else:
        ds = datasets.load_dataset(hub_dataset, bench.hub_config, split=split)
        meta = None
    if meta is not None:
        bench.check_class_names(meta["class_names"], what=f"dataset {bench.hub_config} class list")
        if int(meta["ignore_index"]) != bench.ignore_index:
            raise ClassListMismatchError(
                f"dataset ignore value {meta['ignore_index']} != evaluation dataset {bench.ignore_index}"
            )
    return ds


def to_pixel_values(image_processor, image, device) -> torch.Tensor:
    """One image at its own size -> `(1, 3, H, W)`, normalised by the model's `DiSaImageProcessor` (the resizing of the
    protocol happens in `predict_segmentation`)."""
    return image_processor(images=image, do_resize=False, return_tensors="pt")["pixel_values"].to(device)


def load_thing_split(path: Path, benches) -> dict[str, np.ndarray]:
    """``{dataset: [thing class names]}`` JSON -> ``{definition name: is_thing (K,) bool}`` for the evaluated
    datasets; refuses datasets that are not evaluated and names that are not scored classes of theirs."""
    spec = json.loads(Path(path).read_text())
    if not isinstance(spec, dict) or not spec:
        raise ValueError(
            f"{path}: expected a JSON object {{dataset: [thing class names]}}, got {type(spec).__name__}."
        )
    by_name = {b.name: b for b in benches}
    masks = {}
    for key, things in spec.items():
        bench = by_name.get(load_evaluation_dataset(key).name)
        if bench is None:
            raise ValueError(f"{path} names dataset {key!r}, which is not evaluated (--datasets {' '.join(by_name)}).")
        if bench.name in masks:
            raise ValueError(f"{path} gives {bench.name} two thing splits (keys naming the same dataset).")
        names = list(bench.scored_names)
        if not isinstance(things, list) or not things:
            raise ValueError(f"{path}: {key!r} needs a non-empty list of thing class names.")
        unknown = [t for t in things if t not in names]
        if unknown:
            raise ValueError(f"{path}: {unknown[:5]} are not scored classes of {bench.name} (e.g. {names[:3]}).")
        masks[bench.name] = np.isin(names, things)
    return masks


def extra_measures(boundary: BoundaryIoU | None, cm, is_thing, bench, rule: str) -> dict:
    """Boundary IoU and foreground-bias rates (percent) for a result row, where asked for."""
    row = {}
    if boundary is not None:
        res = boundary.compute(rule=rule)
        row["boundary_IoU"] = 100.0 * res["mean_boundary_iou"]
        row["boundary_dilation_ratio"] = res["dilation_ratio"]
        row["per_class_boundary_iou"] = {
            n: (None if np.isnan(v) else 100.0 * float(v))
            for n, v in zip(bench.scored_names, res["per_category_boundary_iou"])
        }
    if is_thing is not None:
        rates = foreground_bias_rates(cm.confusion, is_thing)
        for key in ("stuff_predicted_as_thing", "thing_predicted_as_stuff"):
            row[key] = None if np.isnan(rates[key]) else 100.0 * rates[key]
        row["thing_classes"] = [n for n, t in zip(bench.scored_names, is_thing) if t]
    return row


def evaluate_dataset(
    model, processor, bench, ds, args, device, rank=0, world=1, reduce_fn=None, is_thing=None, split=DEFAULT_SPLIT
) -> dict:
    # CAT-Seg's protocol prompts every class by its first synonym (the processor applies
    # CAT-Seg's rule to the official names), even where classes share one (ADE-847 has three "bag" classes): reproduce
    # it rather than refuse the list as a user vocabulary would be refused
    tok = processor(text=list(bench.class_names), allow_shared_prompts=True)
    with torch.no_grad():
        text_embeds = model.get_text_embeddings(
            tok["input_ids"].to(device), tok["attention_mask"].to(device), prompt_templates=tok["prompt_templates"]
        )
    cm = SegmentationConfusionMatrix.from_dataset_definition(bench, device=device)
    boundary = None
    if args.boundary_iou:
        ratio = args.boundary_dilation_ratio or DEFAULT_DILATION_RATIO
        boundary = BoundaryIoU.from_dataset_definition(bench, ratio, device=device)
    n = len(ds) if args.max_images is None else min(len(ds), args.max_images)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    start = time.perf_counter()
    for i in range(rank, n, world):
        ex = ds[i]
        label = torch.from_numpy(np.array(ex["label"]).astype(np.int64)).to(device)
        pix = to_pixel_values(processor.image_processor, ex["image"], device)
        seg = predict_segmentation(
            model,
            pix,
            text_embeds,
            mode=args.mode,
            short_side=args.short_side or None,
            output_size=tuple(label.shape),
            warp_size=args.warp_size,
            window_size=args.window_size,
            stride=args.stride,
            batch_size=args.views_per_batch,
            autocast_dtype=dtype,
        )
        cm.update(seg[0], label)
        if boundary is not None:
            boundary.update(seg[0], label)
    cm.reduce(reduce_fn)
    if boundary is not None:
        boundary.reduce(reduce_fn)
    res = cm.compute(rule=args.miou_rule)
    row = results_table_row(res, bench.scored_names)
    row.update(extra_measures(boundary, cm, is_thing, bench, args.miou_rule))
    row.update(
        {
            "dataset": bench.name,
            "split": split,
            "display_name": bench.display_name,
            "short_name": bench.short_name,
            "num_images": n,
            "num_classes": bench.num_classes,
            "miou_rule": args.miou_rule,
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    return row


def markdown_table(model_name: str, rows: list[dict]) -> str:
    head = "| model | " + " | ".join(r["short_name"] for r in rows) + " |"
    sep = "|---|" + "---|" * len(rows)
    vals = f"| {model_name} | " + " | ".join(f"{r['mIoU']:.1f}" for r in rows) + " |"
    lines = [head, sep, vals]
    for key, label in EXTRA_MEASURE_ROWS:
        if any(r.get(key) is not None for r in rows):
            lines.append(
                f"| {model_name} {label} | "
                + " | ".join("-" if r.get(key) is None else f"{r[key]:.1f}" for r in rows)
                + " |"
            )
    return "\n".join(lines) + "\n"


EXTRA_MEASURE_ROWS = (
    ("boundary_IoU", "boundary IoU"),
    ("stuff_predicted_as_thing", "stuff -> thing %"),
    ("thing_predicted_as_stuff", "thing -> stuff %"),
)


def model_index(model_name: str, rows: list[dict], dataset_repo: str | None) -> list[dict]:
    """The `model-index` of a model card (the Hub's evaluation results): one result per dataset, its mIoU rounded to
    2 decimals; `dataset.type` is the Hub dataset repo when the data came from one, else the dataset's name, and
    `dataset.config` the dataset's name (its config in that repo). Built with `huggingface_hub`'s `EvalResult`, in
    the form `ModelCard` writes into a card's metadata."""
    results = [
        EvalResult(
            task_type="image-segmentation",
            task_name="Open-vocabulary semantic segmentation",
            dataset_type=dataset_repo or r["dataset"],
            dataset_name=r["display_name"],
            dataset_config=r["dataset"],
            dataset_split=r["split"],
            metric_type="mean_iou",
            metric_name="mIoU",
            metric_value=round(r["mIoU"], 2),
        )
        for r in rows
    ]
    return eval_results_to_model_index(model_name, results)


def process_layout(device: str | None) -> tuple[int, int, torch.device]:
    """-> (rank, number of processes, device). Under `accelerate launch` / `torchrun` each process takes every n-th
    image. A distributed launch that cannot be set up is an error: going on as one process would make every rank
    score every image and write the outputs."""
    try:
        from accelerate import PartialState
    except ImportError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit(
                f"launched as {os.environ['WORLD_SIZE']} processes (WORLD_SIZE), but accelerate, which splits the "
                "images between them, is not installed: pip install accelerate, or run a single process."
            ) from None
        return 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        state = PartialState()
    except Exception as error:
        launch = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        raise RuntimeError(
            f"could not set up the distributed evaluation ({type(error).__name__}: {error}); launch environment "
            f"{launch}. Launch with `accelerate launch` or `torchrun`, or run one process with `python` (no "
            "WORLD_SIZE / RANK set)."
        ) from error
    return state.process_index, state.num_processes, torch.device(device) if device else state.device


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder or Hub id")
    p.add_argument("--datasets", nargs="+", default=list(EVALUATION_DATASETS))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data_dir", type=Path, help="folder written by training/prepare_datasets.py")
    src.add_argument("--hub_dataset", help="Hub dataset repo with one config per evaluation dataset")
    p.add_argument("--split", default=DEFAULT_SPLIT, help="split of every dataset to score")
    p.add_argument("--mode", choices=["sliding", "whole"], default="sliding")
    p.add_argument("--short_side", type=int, default=640, help="0 disables the test-mapper resize")
    p.add_argument("--warp_size", type=int, default=640)
    p.add_argument("--window_size", type=int, default=384)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--views_per_batch", type=int, default=None, help="model batch size in views (default: all 5)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype of the model")
    p.add_argument("--torch_compile", action="store_true", help="run the model through torch.compile")
    p.add_argument("--torch_compile_backend", default=None, help="torch.compile backend (default inductor)")
    p.add_argument("--torch_compile_mode", default=None, help="torch.compile mode")
    p.add_argument("--device", default=None)
    p.add_argument("--miou_rule", choices=list(RULES), default="present_in_gt")
    p.add_argument("--max_images", type=int, default=None)
    p.add_argument("--boundary_iou", action="store_true", help="also report Boundary IoU (Cheng et al., CVPR 2021)")
    p.add_argument(
        "--boundary_dilation_ratio",
        type=float,
        default=None,
        help=f"Boundary IoU width as a fraction of the image diagonal (default {DEFAULT_DILATION_RATIO})",
    )
    p.add_argument(
        "--thing_classes",
        type=Path,
        default=None,
        help="JSON {dataset: [thing class names]}: adds the foreground-bias rates for those datasets",
    )
    p.add_argument("--output", type=Path, default=None, help="JSON results")
    p.add_argument("--markdown", type=Path, default=None, help="Markdown table")
    p.add_argument("--model_index", type=Path, default=None, help="write model-index results (JSON or .yaml)")
    args = p.parse_args(argv)

    benches = [load_evaluation_dataset(b) for b in args.datasets]  # unknown names fail here, before loading anything
    if args.boundary_dilation_ratio is not None and not args.boundary_iou:
        p.error("--boundary_dilation_ratio is set but --boundary_iou is not: add --boundary_iou.")
    if args.boundary_dilation_ratio is not None and not args.boundary_dilation_ratio > 0:
        p.error(f"--boundary_dilation_ratio must be positive, got {args.boundary_dilation_ratio}.")
    thing_masks = load_thing_split(args.thing_classes, benches) if args.thing_classes else {}

    from modeling_disa import DiSaForOpenVocabSegmentation, DiSaProcessor

    rank, world, device = process_layout(args.device)
    try:
        check_inference_dtype(args.dtype, device)
    except ValueError as error:
        p.error(f"--dtype {args.dtype}: {error}")
    reduce_fn = None
    if world > 1:
        from accelerate.utils import reduce as acc_reduce

        reduce_fn = lambda t: acc_reduce(t, reduction="sum")  # noqa: E731

    model = DiSaForOpenVocabSegmentation.from_pretrained(args.model).to(device).eval()
    model = compile_for_inference(model, args.torch_compile, args.torch_compile_backend, args.torch_compile_mode)
    processor = DiSaProcessor.from_pretrained(args.model)
    rows = []
    for bench in benches:
        ds = load_split(bench, args.data_dir, args.hub_dataset, args.split)
        row = evaluate_dataset(
            model,
            processor,
            bench,
            ds,
            args,
            device,
            rank,
            world,
            reduce_fn,
            thing_masks.get(bench.name),
            split=args.split,
        )
        rows.append(row)
        if rank == 0:
            print(f"{bench.display_name}: mIoU {row['mIoU']:.2f} ({row['num_images']} images, {row['seconds']} s)")
    out = {
        "model": args.model,
        "protocol": {
            "split": args.split,
            "mode": args.mode,
            "short_side": args.short_side,
            "warp_size": args.warp_size,
            "window_size": args.window_size,
            "stride": args.stride,
            "dtype": args.dtype,
            "torch_compile": compile_settings(args.torch_compile, args.torch_compile_backend, args.torch_compile_mode),
            "miou_rule": args.miou_rule,
            "boundary_dilation_ratio": (args.boundary_dilation_ratio or DEFAULT_DILATION_RATIO)
            if args.boundary_iou
            else None,
            "thing_classes": str(args.thing_classes) if args.thing_classes else None,
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(device),
            "world_size": world,
        },
        "results": {r["dataset"]: r for r in rows},
    }
    if rank == 0:
        table = markdown_table(Path(args.model).name if os.path.isdir(args.model) else args.model, rows)
        print(table)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(out, indent=1) + "\n")
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(table)
        if args.model_index:
            mi = model_index(Path(args.model).name, rows, args.hub_dataset)
            args.model_index.parent.mkdir(parents=True, exist_ok=True)
            if args.model_index.suffix in (".yaml", ".yml"):
                import yaml

                args.model_index.write_text(yaml.safe_dump({"model-index": mi}, sort_keys=False))
            else:
                args.model_index.write_text(json.dumps({"model-index": mi}, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
