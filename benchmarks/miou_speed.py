#!/usr/bin/env python
"""mIoU accumulation speed: DiSa's confusion-matrix accumulator vs evaluate's mean_iou formula (3 histograms per map).

847 classes, 100 label maps of 512x512 (uint16 ground truth with an ignore band of 65535, int64 predictions).
Two data regimes: "uniform" (every pixel an independent random class: worst case for the accumulator) and
"blocks" (8x8 blocks of one class, 20% of predictions wrong: closer to real maps). Identical numbers are checked.
Writes benchmarks/results/miou_speed.json. Usage: python benchmarks/miou_speed.py [--threads N] [--repeats R]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import machine_info

from modeling_disa.evaluation.metrics import SegmentationConfusionMatrix  # noqa: E402

K, N, S, IGNORE = 847, 100, 512, 65535


def mean_iou_formula(preds, gts):
    """evaluate's mean_iou per-map formula: mask ignore, 3 np.histogram calls, totals, then IoU (written here)."""
    ti = np.zeros(K)
    tp = np.zeros(K)
    tl = np.zeros(K)
    for p, g in zip(preds, gts):
        p = np.array(p)
        g = np.array(g)
        m = g != IGNORE
        p, g = p[m], g[m]
        ti += np.histogram(p[p == g], bins=K, range=(0, K - 1))[0]
        tp += np.histogram(p, bins=K, range=(0, K - 1))[0]
        tl += np.histogram(g, bins=K, range=(0, K - 1))[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = ti / (tp + tl - ti)
    return np.nanmean(iou), iou


def ours(preds, gts, batch):
    cm = SegmentationConfusionMatrix(K, IGNORE)
    for i in range(0, N, batch):
        cm.update(preds[i : i + batch] if batch > 1 else preds[i], gts[i : i + batch] if batch > 1 else gts[i])
    return cm


def data(kind, rng):
    if kind == "uniform":
        gt = rng.integers(0, K, (N, S, S)).astype(np.uint16)
        pr = rng.integers(0, K, (N, S, S)).astype(np.int64)
    else:
        cls = rng.integers(0, K, (N, 8, 8))
        gt = np.kron(cls, np.ones((S // 8, S // 8), dtype=np.int64)).astype(np.uint16)
        pr = gt.astype(np.int64)
        wrong = rng.random(pr.shape) < 0.2
        pr[wrong] = rng.integers(0, K, int(wrong.sum()))
    gt[:, :32] = IGNORE
    return pr, gt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (NumPy baseline is single-threaded)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="maps per update() call")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "miou_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    results = {}
    for kind in ("uniform", "blocks"):
        pr, gt = data(kind, rng)
        t_ref, t_ours = [], []
        for _ in range(args.repeats):  # interleaved, min of repeats (the machine may be shared)
            t = time.perf_counter()
            ref_miou, ref_iou = mean_iou_formula(pr, gt)
            t_ref.append(time.perf_counter() - t)
            t = time.perf_counter()
            cm = ours(pr, gt, args.batch)
            t_ours.append(time.perf_counter() - t)
        r = cm.compute(rule="present_in_gt_or_pred")
        identical = bool(
            np.array_equal(np.isnan(r["per_category_iou"]), np.isnan(ref_iou))
            and np.allclose(r["per_category_iou"], ref_iou, equal_nan=True, rtol=0, atol=1e-15)
            and abs(r["mean_iou"] - ref_miou) < 1e-15
        )
        results[kind] = {
            "formula_s": min(t_ref),
            "ours_s": min(t_ours),
            "speedup": min(t_ref) / min(t_ours),
            "formula_ms_per_map": 1e3 * min(t_ref) / N,
            "ours_ms_per_map": 1e3 * min(t_ours) / N,
            "identical": identical,
            "mean_iou": float(r["mean_iou"]),
        }
        print(kind, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results[kind].items()})
    out = {
        "benchmark": "miou_accumulation_speed",
        "num_classes": K,
        "num_maps": N,
        "map_size": [S, S],
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "torch_threads": args.threads,
        "maps_per_update": args.batch,
        "repeats": args.repeats,
        "results": results,
        "machine": {**machine_info("cpu"), "numpy": np.__version__},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
