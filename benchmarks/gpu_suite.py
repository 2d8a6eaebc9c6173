#!/usr/bin/env python
"""GPU benchmark suite: one command, any CUDA machine, one JSON with the device name and versions.

    python benchmarks/gpu_suite.py --device cuda             # -> benchmarks/results/gpu_suite_<device>.json
    python benchmarks/gpu_suite.py --smoke                   # CPU, disa-tiny preset, few iterations (CI)

Sections (each one try/except'd: a failure is recorded with its error and the other sections still run):

- `view_latency`: per-view latency (1 view per call) and views/s (`--view_batch` views per call) of ViT-B/16@384
  and ViT-L/14@336 DiSa (random weights, precomputed text embeddings) at 150 and 847 classes, fp32, bf16 autocast
  and bf16 weights (`from_pretrained(dtype=torch.bfloat16)` / `pipeline(dtype=...)`; refused with the reason on a
  CPU without bfloat16 instructions, `modeling_disa.check_inference_dtype`), eager and `torch.compile` (compile
  time, graph breaks and guard failures recorded; a compile error is recorded for that row, not raised); each row's
  `speedup_vs_fp32_eager` is the fp32 eager row's per-view latency at the same preset and class count over its own.
- `sliding_window`: images/s of `modeling_disa.model.inference.predict_segmentation` (CAT-Seg's sliding window +
  global view, all views of an image in one call) on a 640x854 image, 150 classes.
- `train_step`: DiSa ViT-B/16 training step at 384, 171 classes, batch 4, bf16 autocast, activation checkpointing
  off and on (`benchmarks/train_step.py`): step time, `torch.cuda.max_memory_allocated`, MFU = model FLOPs per step
  (FlopCounterMode, counted once; recomputation under checkpointing is not model FLOPs) / step time / the device's
  dense bf16 peak (`bench_common.BF16_PEAK_FLOPS`; unknown device: null with a note). Target on the record: the
  batch-4 step fits in 24 GiB (CAT-Seg trained 1 image per 24 GB GPU).
- `miou`: `SegmentationConfusionMatrix` accumulation on the device, 847 classes, 512x512 maps: maps/s, checked
  equal to a CPU `torch.bincount` reference.

`--smoke` runs every section on CPU with the disa-tiny preset (its class cap is 16, so 8 and 24 classes stand
for "below" and "above the cap"), a 160x214 image for the sliding window, 1 iteration, and one `torch.compile`
row with dynamo's `eager` backend (tracing, graph breaks and guards without inductor's C++ code generation, which
takes minutes on CPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_common import RESULTS, load_config, load_model, machine_info, random_text_embeds, write_json  # noqa: E402

from modeling_disa import check_inference_dtype  # noqa: E402

FULL = {
    "presets": ["disa-vit-b-16", "disa-vit-l-14-336"],
    "classes": [150, 847],
    "train_preset": "disa-vit-b-16",
    "train_classes": 171,
    "train_batch": 4,
    "sliding_classes": 150,
    "image_hw": [640, 854],
    "iterations": 20,
    "warmup": 3,
    "view_batch": 8,
    "train_steps": 10,
    "train_warmup": 3,
    "miou_maps": 100,
    "compile_backend": "inductor",
    "compile_rows": "all",
}
SMOKE = {
    "presets": ["disa-tiny"],
    "classes": [8, 24],
    "train_preset": "disa-tiny",
    "train_classes": 8,
    "train_batch": 1,
    "sliding_classes": 8,
    "image_hw": [160, 214],
    "iterations": 1,
    "warmup": 0,
    "view_batch": 1,
    "train_steps": 1,
    "train_warmup": 1,
    "miou_maps": 4,
    "compile_backend": "eager",
    "compile_rows": "first",
    "compile_note": "smoke: one compiled row (first class count, fp32) with dynamo's eager backend and view_batch 1 "
    "(no second shape, no recompile): each compilation takes ~10 s of CPU even for disa-tiny",
}
SECTIONS = ["view_latency", "sliding_window", "train_step", "miou"]
TRAIN_MEMORY_TARGET_GIB = 24
MIOU_CLASSES, MIOU_SIDE, MIOU_IGNORE = 847, 512, 65535
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtypes
VIEW_PRECISIONS = [*DTYPES, "bf16_weights"]  # view_latency also runs the model with bfloat16 weights


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="CPU, disa-tiny, few iterations (CI)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile rows of view_latency")
    p.add_argument("--compile_backend", default=None, help="torch.compile backend (default inductor; smoke aot_eager)")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/gpu_suite_<device>.json)")
    return p.parse_args(argv)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median(self, fn, iterations: int, warmup: int):
        """(median seconds of `iterations` calls after `warmup` ones, the last call's output)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iterations):
            self.sync()
            start = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out


def _autocast(device, dtype):
    autocast_dtype = DTYPES.get(dtype)  # None for fp32 and for bf16 weights
    return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)


def _compile(model, backend):
    """torch.compile the model; returns (callable, compile notes collector)."""
    import torch._dynamo
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.guard_failures.clear()
    return torch.compile(model, backend=backend)


def _compile_notes() -> dict:
    import torch._dynamo.utils as dynamo_utils

    failures = [str(reason) for reasons in dynamo_utils.guard_failures.values() for reason in reasons]
    return {
        "graph_breaks": sum(dynamo_utils.counters["graph_break"].values()),
        "graph_break_reasons": sorted(dynamo_utils.counters["graph_break"])[:10],
        "unique_graphs": dynamo_utils.counters["stats"]["unique_graphs"],
        "guard_failures": len(failures),
        "guard_failure_reasons": failures[:10],
    }


def view_latency(cfg, device, timer, args) -> list[dict]:
    rows = []
    backend = args.compile_backend or cfg["compile_backend"]
    for preset in cfg["presets"]:
        model = load_model(preset, device).eval()
        side = model.config.clip_resolution
        one = torch.randn(1, 3, side, side, device=device)
        batch = torch.randn(cfg["view_batch"], 3, side, side, device=device)
        try:
            check_inference_dtype(torch.bfloat16, device)
            bf16_model, refusal = copy.deepcopy(model).to(torch.bfloat16), None
        except ValueError as error:
            bf16_model, refusal = None, str(error)
        for classes in cfg["classes"]:
            embeds = random_text_embeds(model.config, classes, device)
            point = []
            for dtype in VIEW_PRECISIONS:
                if dtype == "bf16_weights" and refusal:
                    row = {"preset": preset, "view_side": side, "classes": classes, "dtype": dtype, "compile": False}
                    point.append({**row, "refused": refusal})
                    continue
                weights = bf16_model if dtype == "bf16_weights" else model
                cast = torch.bfloat16 if dtype == "bf16_weights" else torch.float32
                first = classes == cfg["classes"][0] and dtype == "fp32"
                compile_here = not args.no_compile and (cfg["compile_rows"] == "all" or first)
                for compiled in [False, True] if compile_here else [False]:
                    row = {
                        "preset": preset,
                        "view_side": side,
                        "classes": classes,
                        "dtype": dtype,
                        "compile": compiled,
                        "compile_backend": backend if compiled else None,
                    }
                    try:
                        fn = _compile(weights, backend) if compiled else weights

                        def call(x):
                            with torch.inference_mode(), _autocast(device, dtype):
                                return fn(pixel_values=x.to(cast), text_embeds=embeds).logits

                        if compiled:
                            timer.sync()
                            start = time.perf_counter()
                            call(one)
                            timer.sync()
                            row["compile_s"] = time.perf_counter() - start
                        per_view, out = timer.median(lambda: call(one), cfg["iterations"], cfg["warmup"])
                        per_batch, _ = timer.median(lambda: call(batch), cfg["iterations"], cfg["warmup"])
                        if not torch.isfinite(out.float()).all():
                            raise RuntimeError("non-finite logits")
                        row.update(
                            latency_per_view_s=per_view,
                            view_batch=cfg["view_batch"],
                            views_per_s=cfg["view_batch"] / per_batch,
                        )
                        if compiled:
                            row.update(_compile_notes())
                    except Exception as exc:  # noqa: BLE001 - one row's failure (a compile error) is recorded
                        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                    point.append(row)
            rows += with_speedups(point)
        del model, bf16_model
    return rows


def with_speedups(point: list[dict]) -> list[dict]:
    """The rows of one (preset, classes) point, each with its speed-up over the point's fp32 eager row."""
    base = next((r for r in point if r["dtype"] == "fp32" and not r.get("compile")), None)
    for row in point:
        if base is not None and "latency_per_view_s" in base and "latency_per_view_s" in row:
            row["speedup_vs_fp32_eager"] = base["latency_per_view_s"] / row["latency_per_view_s"]
    return point


def sliding_window(cfg, device, timer, args) -> list[dict]:
    from modeling_disa.model.inference import predict_segmentation, sliding_window_geometry, window_starts

    rows = []
    for preset in cfg["presets"]:
        model = load_model(preset, device).eval()
        geometry = sliding_window_geometry(model.config.clip_resolution)
        embeds = random_text_embeds(model.config, cfg["sliding_classes"], device)
        image_hw = tuple(cfg["image_hw"])
        image = torch.randn(1, 3, *image_hw, device=device)
        views = len(window_starts(geometry["warp_size"], geometry["window_size"], geometry["stride"])) ** 2 + 1
        for dtype in DTYPES:

            def call(model=model):  # bound now: the loop deletes `model` before the next preset
                return predict_segmentation(
                    model,
                    image,
                    embeds,
                    mode="sliding",
                    short_side=min(image_hw),
                    batch_size=views,
                    autocast_dtype=DTYPES[dtype],
                    **geometry,
                )

            seconds, labels = timer.median(call, cfg["iterations"], cfg["warmup"])
            if tuple(labels.shape) != (1, *image_hw):
                raise RuntimeError("predict_segmentation returned a map of the wrong size")
            rows.append(
                {
                    "preset": preset,
                    "image_hw": list(image_hw),
                    "classes": cfg["sliding_classes"],
                    "dtype": dtype,
                    **geometry,
                    "views_per_image": views,
                    "seconds_per_image": seconds,
                    "images_per_s": 1 / seconds,
                }
            )
        del model
    return rows


def train_step(cfg, device, timer, args) -> list[dict]:
    from train_step import measure_train_step

    rows = []
    flops = None
    model_cfg = load_config(cfg["train_preset"])
    for checkpointing in (False, True):
        result = measure_train_step(
            cfg["train_preset"],
            resolution=model_cfg.clip_resolution,
            batch_size=cfg["train_batch"],
            num_classes=cfg["train_classes"],
            dtype="bf16",
            device=device,
            steps=cfg["train_steps"],
            warmup=cfg["train_warmup"],
            gradient_checkpointing=checkpointing,
            count_flops=flops is None,
        )
        if flops is None:
            flops = result["flops_per_step"]
            peak_tflops, note = result["peak_tflops"], result["mfu_note"]
        step_s = result["step_time_s_median"]
        peak_gib = result["peak_memory_gib"] if device.type == "cuda" else result["peak_rss_mib"] / 1024
        row = {
            k: result[k]
            for k in (
                "preset",
                "mode",
                "resolution",
                "batch_size",
                "num_classes",
                "dtype",
                "gradient_checkpointing",
                "steps_timed",
                "trainable_params",
                "total_params",
                "memory_method",
            )
        }
        row.update(
            step_time_s=step_s,
            peak_memory_gib=peak_gib,
            flops_per_step=flops,
            achieved_tflops=flops / step_s / 1e12,
            peak_tflops=peak_tflops,
            mfu=flops / step_s / (peak_tflops * 1e12) if peak_tflops else None,
            mfu_note=note,
            final_loss=result["final_loss"],
        )
        if device.type == "cuda":
            row[f"fits_{TRAIN_MEMORY_TARGET_GIB}_gib"] = peak_gib <= TRAIN_MEMORY_TARGET_GIB
        rows.append(row)
    return rows


def miou(cfg, device, timer, args) -> dict:
    from modeling_disa.evaluation.metrics import SegmentationConfusionMatrix

    n = cfg["miou_maps"]
    g = torch.Generator().manual_seed(0)
    # 8x8 blocks of one class, 20% of the predictions wrong, an ignore band: close to real maps
    blocks = torch.randint(0, MIOU_CLASSES, (n, 8, 8), generator=g)
    target = blocks.repeat_interleave(MIOU_SIDE // 8, 1).repeat_interleave(MIOU_SIDE // 8, 2)
    pred = torch.where(
        torch.rand(target.shape, generator=g) < 0.2, torch.randint(0, MIOU_CLASSES, target.shape, generator=g), target
    )
    target[:, :32] = MIOU_IGNORE
    pred_d, target_d = pred.to(device), target.to(device)

    def run():
        cm = SegmentationConfusionMatrix(MIOU_CLASSES, MIOU_IGNORE, device=device)
        for i in range(n):
            cm.update(pred_d[i], target_d[i])
        return cm

    seconds, cm = timer.median(run, cfg["iterations"], cfg["warmup"])
    valid = target != MIOU_IGNORE
    reference = torch.bincount(target[valid] * MIOU_CLASSES + pred[valid], minlength=MIOU_CLASSES**2)
    matches = torch.equal(cm.confusion.cpu().long().flatten(), reference)
    miou_value = float(cm.compute()["mean_iou"])
    if not matches:
        raise RuntimeError("the device confusion matrix differs from the CPU bincount reference")
    return {
        "classes": MIOU_CLASSES,
        "maps": n,
        "map_side": MIOU_SIDE,
        "seconds": seconds,
        "maps_per_s": n / seconds,
        "matches_cpu_reference": matches,
        "mean_iou": miou_value,
    }


def main(argv=None) -> dict:
    args = parse(argv)
    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device: run on a GPU machine, or --smoke on CPU.")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    machine = machine_info(device)
    tag = "smoke_cpu" if args.smoke else machine["device_name"].replace(" ", "_")
    output = args.output or RESULTS / f"gpu_suite_{tag}.json"
    timer = Timer(device)
    started = time.perf_counter()
    report = {
        "what": __doc__.split("\n\n")[0],
        "command": "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "smoke": args.smoke,
        "device": str(device),
        "device_name": machine["device_name"],
        "machine": machine,
        "settings": cfg,
        "sections": {},
    }
    functions = {
        "view_latency": view_latency,
        "sliding_window": sliding_window,
        "train_step": train_step,
        "miou": miou,
    }
    for name in args.sections:
        section_start = time.perf_counter()
        try:
            entry = {"ok": True, "results": functions[name](cfg, device, timer, args)}
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others
            entry = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}"[:2000],
                "traceback": traceback.format_exc()[-4000:],
            }
        entry["seconds"] = time.perf_counter() - section_start
        report["sections"][name] = entry
        print(f"{name}: {'ok' if entry['ok'] else entry['error']} ({entry['seconds']:.1f} s)", flush=True)
        write_json(output, report)  # after every section: a later crash keeps what was measured
    report["elapsed_s"] = time.perf_counter() - started
    write_json(output, report)
    print("wrote", output)
    return report


if __name__ == "__main__":
    main()
