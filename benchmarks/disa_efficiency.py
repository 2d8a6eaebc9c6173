#!/usr/bin/env python
"""DiSa vs CAT-Seg mode: parameters, GFLOPs per view and inference latency (random weights, no download).

- Parameters of every preset in both modes (built on the meta device).
- GFLOPs of one forward per view (ViT-B at 384, ViT-L at 336) at 150 and 847 classes, counted with
  torch.utils.flop_counter.FlopCounterMode under eager attention in every attention layer (CLIP's towers and the
  Swin windows, so their attention matmuls are counted: the CPU SDPA kernel is invisible to the counter), with
  precomputed text embeddings (the text encoder is not part of a view's cost). 847 classes are capped to 256.
- Latency ratio DiSa / CAT-Seg on the ViT-B preset, 150 classes, precomputed text embeddings, batch 1, the two
  models run interleaved in one process (median of the per-round ratios), on the chosen device.

Writes benchmarks/results/disa_efficiency_<device>.json.
Usage: python benchmarks/disa_efficiency.py [--device cpu|cuda] [--rounds 5] [--skip_flops] [--skip_latency]
       [--dtype float32|bfloat16] [--threads N]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation  # noqa: E402

PRESETS = REPO / "configuration" / "models"
GEOMETRY = {"vit-b-16": 384, "vit-l-14-336": 336}


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name()
    return info


def build(name: str, device="cpu", attn="sdpa", dtype=torch.float32) -> DiSaForOpenVocabSegmentation:
    config = DiSaConfig.from_pretrained(PRESETS / name)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = DiSaForOpenVocabSegmentation(config)
    return model.to(dtype).eval()


def count_parameters() -> dict:
    rows = {}
    for preset in sorted(p.name for p in PRESETS.iterdir() if (p / "config.json").exists()):
        config = DiSaConfig.from_pretrained(PRESETS / preset)
        for mode, switches in (
            ("catseg", dict(use_sdm=False, use_hrm=False)),
            ("disa", dict(use_sdm=True, use_hrm=True)),
        ):
            for key, value in switches.items():
                setattr(config, key, value)
            with torch.device("meta"):
                model = DiSaForOpenVocabSegmentation(config)
            rows[f"{preset}/{mode}"] = {
                "total": sum(p.numel() for p in model.parameters()),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
    return rows


def text_embeds(model, classes: int, device, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(classes, 1, model.config.projection_dim, generator=generator)
    return torch.nn.functional.normalize(embeds, dim=-1).to(device, dtype)


def count_flops(device: str) -> dict:
    rows = {"attention": "eager"}
    for geometry, size in GEOMETRY.items():
        for mode in ("catseg", "disa"):
            model = build(f"{mode}-{geometry}", device, attn="eager")
            attention = {
                m.config._attn_implementation
                for m in model.modules()
                if hasattr(m, "config") and "Attention" in type(m).__name__
            }
            if attention != {"eager"}:
                raise RuntimeError(f"attention layers not eager ({attention}): their matmuls would not be counted")
            pixels = torch.randn(1, 3, size, size, device=device)
            for classes in (150, 847):
                counter = FlopCounterMode(display=False)
                with torch.no_grad(), counter:
                    model(pixel_values=pixels, text_embeds=text_embeds(model, classes, device, torch.float32))
                rows[f"{geometry}/{mode}/{classes}"] = round(counter.get_total_flops() / 1e9, 2)
                print(f"GFLOPs {geometry} {mode} T={classes}: {rows[f'{geometry}/{mode}/{classes}']}", flush=True)
            del model
        for classes in (150, 847):
            rows[f"{geometry}/ratio/{classes}"] = round(
                rows[f"{geometry}/disa/{classes}"] / rows[f"{geometry}/catseg/{classes}"], 4
            )
    return rows


def measure_latency(device: str, rounds: int, dtype) -> dict:
    models = {mode: build(f"{mode}-vit-b-16", device, dtype=dtype) for mode in ("catseg", "disa")}
    pixels = torch.randn(1, 3, 384, 384, device=device, dtype=dtype)
    embeds = text_embeds(models["catseg"], 150, device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = {mode: [] for mode in models}
    cpu_times = {mode: [] for mode in models}
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            for model in models.values():
                model(pixel_values=pixels, text_embeds=embeds)
        for _ in range(rounds):
            for mode, model in models.items():
                sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                model(pixel_values=pixels, text_embeds=embeds)
                sync()
                times[mode].append(time.perf_counter() - start)
                cpu_times[mode].append(time.process_time() - cpu_start)
    median = {mode: statistics.median(values) for mode, values in times.items()}
    # each round runs both models back to back, so the per-round ratio cancels slow drifts of the machine's load
    paired = [d / c for d, c in zip(times["disa"], times["catseg"])]
    return {
        "seconds": {mode: [round(t, 4) for t in values] for mode, values in times.items()},
        "median_seconds": {mode: round(t, 4) for mode, t in median.items()},
        "per_round_ratio": [round(r, 4) for r in paired],
        "ratio_disa_over_catseg": round(statistics.median(paired), 4),
        # CPU time of this process: less sensitive than wall time to other processes sharing the cores
        "cpu_seconds": {mode: [round(t, 4) for t in values] for mode, values in cpu_times.items()},
        "cpu_time_ratio_disa_over_catseg": round(
            statistics.median([d / c for d, c in zip(cpu_times["disa"], cpu_times["catseg"])]), 4
        ),
        "dtype": str(dtype).removeprefix("torch."),
        "classes": 150,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip_flops", action="store_true", help="keep the GFLOPs of an earlier result file")
    parser.add_argument("--skip_latency", action="store_true", help="keep the latency of an earlier result file")
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) (1 interferes less with other jobs); recorded in machine",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    results = {"command": " ".join(sys.argv), "machine": machine(args.device), "parameters": count_parameters()}
    print(json.dumps(results["parameters"], indent=1), flush=True)
    output = Path(args.output or REPO / "benchmarks" / "results" / f"disa_efficiency_{args.device.split(':')[0]}.json")
    earlier = json.loads(output.read_text()) if output.exists() else {}
    if not args.skip_flops:
        results["gflops_per_view"] = count_flops(args.device)
    else:
        results["gflops_per_view"] = earlier.get("gflops_per_view")
    if not args.skip_latency:
        results["latency_vit_b_16"] = measure_latency(args.device, args.rounds, dtype)
    else:
        results["latency_vit_b_16"] = earlier.get("latency_vit_b_16")
        results["latency_from"] = earlier.get(
            "latency_from", {"command": earlier.get("command"), "machine": earlier.get("machine")}
        )
    print(json.dumps(results["latency_vit_b_16"], indent=1))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
