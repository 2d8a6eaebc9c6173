#!/usr/bin/env python
"""Evaluate a DiSa model on the open-vocabulary evaluation datasets (CAT-Seg protocol) -> JSON, Markdown and a
model-index.

    python training/run_evaluation.py --model org/disa-vit-b-16 \
        --datasets ade847 pc459 ade150 pc59 voc20 voc20b --data_dir /data/disa-benchmarks \
        --output results/disa-b.json --markdown results/disa-b.md --model_index results/model-index.yaml

Data source: ``--data_dir`` (a folder written by training/prepare_datasets.py) or ``--hub_dataset REPO`` (the same
layout on the Hub, one config per evaluation dataset). Inference: ``--mode sliding`` (published protocol: warp 640,
384 windows, stride 256, global view) or ``whole``; ``--dtype bf16`` runs the model under autocast. mIoU uses one
confusion matrix over the whole split, averaged over classes present in the ground truth
(``--miou_rule present_in_gt_or_pred`` for the other rule). Under ``accelerate launch`` each process takes every
n-th image and the matrices are summed.
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

from modeling_disa.evaluation.dataset_definitions import (
    EVALUATION_DATASETS,
    ClassListMismatchError,
    load_evaluation_dataset,
)
from modeling_disa.evaluation.metrics import RULES, SegmentationConfusionMatrix, results_table_row
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


def evaluate_dataset(model, processor, bench, ds, args, device, rank=0, world=1, reduce_fn=None, split=DEFAULT_SPLIT):
    # CAT-Seg's protocol prompts every class by its first synonym, even where classes share one (ADE-847 has three
    # "bag" classes): reproduce it rather than refuse the list as a user vocabulary would be refused
    names = bench.prompt_names
    tok = processor(text=names, allow_shared_prompts=True)
    with torch.no_grad():
        text_embeds = model.get_text_embeddings(tok["input_ids"].to(device), tok["attention_mask"].to(device))
    cm = SegmentationConfusionMatrix.from_dataset_definition(bench, device=device)
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
    cm.reduce(reduce_fn)
    res = cm.compute(rule=args.miou_rule)
    row = results_table_row(res, bench.scored_names)
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
    return "\n".join([head, sep, vals]) + "\n"


def model_index(model_name: str, rows: list[dict], dataset_repo: str | None) -> list[dict]:
    results = []
    for r in rows:
        results.append(
            {
                "task": {"type": "image-segmentation", "name": "Open-vocabulary semantic segmentation"},
                "dataset": {
                    "type": dataset_repo or r["dataset"],
                    "name": r["display_name"],
                    "config": r["dataset"],
                    "split": r["split"],
                },
                "metrics": [{"type": "mean_iou", "value": round(r["mIoU"], 2), "name": "mIoU"}],
            }
        )
    return [{"name": model_name, "results": results}]


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
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--miou_rule", choices=list(RULES), default="present_in_gt")
    p.add_argument("--max_images", type=int, default=None)
    p.add_argument("--output", type=Path, default=None, help="JSON results")
    p.add_argument("--markdown", type=Path, default=None, help="Markdown table")
    p.add_argument("--model_index", type=Path, default=None, help="write model-index results (JSON or .yaml)")
    args = p.parse_args(argv)

    benches = [load_evaluation_dataset(b) for b in args.datasets]  # unknown names fail here, before loading anything

    from modeling_disa import DiSaForOpenVocabSegmentation, DiSaProcessor

    rank, world, device = process_layout(args.device)
    reduce_fn = None
    if world > 1:
        from accelerate.utils import reduce as acc_reduce

        reduce_fn = lambda t: acc_reduce(t, reduction="sum")  # noqa: E731

    model = DiSaForOpenVocabSegmentation.from_pretrained(args.model).to(device).eval()
    processor = DiSaProcessor.from_pretrained(args.model)
    rows = []
    for bench in benches:
        ds = load_split(bench, args.data_dir, args.hub_dataset, args.split)
        row = evaluate_dataset(model, processor, bench, ds, args, device, rank, world, reduce_fn, split=args.split)
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
            "miou_rule": args.miou_rule,
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
