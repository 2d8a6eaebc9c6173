#!/usr/bin/env python
"""Cost curves: per-view latency and peak memory vs number of classes and vs image side, DiSa vs CAT-Seg mode.

Two curves per model preset (random weights, no download; precomputed text embeddings, so no text encoding is
timed):

- classes: one 384x384 view (the preset's `clip_resolution`) at T = 10, 50, 150, 256, 847 classes. Above
  `config.class_cap` (256) the model keeps the top-256 classes by maximum cost and gives the rest a fixed logit,
  so only the cost volume (CLIP features x T text embeddings) still grows with T.
- sides: an S x S image (S = 384, 512, 640) through `modeling_disa.model.inference.sliding_window_probs` with
  warp S, windows of the preset's view size and CAT-Seg's 2/3 stride (ViT-B/16: 384, stride 256), one view per
  model call (384: 1 crop + the global view; 512 and 640: 2x2 crops
  + the global view), 150 classes. Latency per image and per view (image latency / views).

Each configuration runs in a fresh subprocess: build the model, one warm-up view, then `--repeats` timed runs.
Peak memory on CPU is the growth of the process's peak resident set size (`resource.getrusage` ru_maxrss) over its
value after model construction and input allocation (before the warm-up view); on CUDA
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the memory allocated before the run (weights
and inputs). Results go to one JSON
(rows keyed by preset/curve/point; the script skips rows already there, so it resumes and can be re-run per model
with `--presets ... --force`), plus a Markdown table and a PNG plot next to it.

    python benchmarks/cost_curves.py --threads 1                 # CPU, both ViT-B presets (~20 min on 1 core)
    python benchmarks/cost_curves.py --device cuda                # any CUDA machine -> cost_curves_cuda.json
    python benchmarks/cost_curves.py --presets disa-vit-b-16 --force   # re-measure one model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_common import RESULTS, load_model, machine_info, peak_rss_mib, random_text_embeds, write_json  # noqa: E402

CLASSES = [10, 50, 150, 256, 847]
SIDES = [384, 512, 640]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["disa-vit-b-16", "catseg-vit-b-16"])
    p.add_argument("--classes", nargs="*", type=int, default=CLASSES, help="points of the classes curve (none: skip)")
    p.add_argument("--sides", nargs="*", type=int, default=SIDES, help="points of the image-side curve (none: skip)")
    p.add_argument("--side_classes", type=int, default=150, help="classes for the image-side curve")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU); default: torch's")
    p.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/cost_curves_<device>.json)")
    p.add_argument("--force", action="store_true", help="re-measure rows already in the JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one configuration, JSON spec
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(spec: dict) -> dict:
    """Run one configuration in this process; returns its row."""
    from modeling_disa.model.inference import sliding_window_geometry, sliding_window_probs, window_starts

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = load_model(spec["preset"], device)
    config = model.config
    embeds = random_text_embeds(config, spec["classes"], device)
    geometry = sliding_window_geometry(config.clip_resolution)  # ViT-B/16@384: windows of 384, stride 256
    window, stride = geometry["window_size"], geometry["stride"]
    g = torch.Generator().manual_seed(0)
    if spec["curve"] == "classes":
        side = config.clip_resolution
        pixels = torch.randn(1, 3, side, side, generator=g).to(device)
        views = 1

        def run():
            return model(pixel_values=pixels, text_embeds=embeds).logits
    else:
        side = spec["side"]
        pixels = torch.randn(1, 3, side, side, generator=g).to(device)
        views = len(window_starts(side, window, stride)) ** 2 + 1

        def run():
            return sliding_window_probs(
                model, pixels, embeds, warp_size=side, window_size=window, stride=stride, batch_size=1
            )

    warm_up = torch.randn(1, 3, window, window, generator=g).to(device)
    sync(device)
    # the baseline is taken after model construction and input allocation, before the warm-up: the warm-up view
    # reaches the same activation peak as a timed view and must count
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = peak_rss_mib()
    with torch.inference_mode():
        model(pixel_values=warm_up, text_embeds=embeds)  # warm-up: allocator, kernels
        sync(device)
        times = []
        for _ in range(spec["repeats"]):
            sync(device)
            start = time.perf_counter()
            out = run()
            sync(device)
            times.append(time.perf_counter() - start)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"non-finite output for {spec}")
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = peak_rss_mib() - base
    latency = statistics.median(times)
    return {
        **{k: spec[k] for k in ("preset", "curve", "classes")},
        "side": side,
        "views": views,
        "mode": "DiSa" if (config.use_sdm or config.use_hrm) else "CAT-Seg",
        "class_cap": config.class_cap,
        "latency_s": round(latency, 4),
        "latency_per_view_s": round(latency / views, 4),
        "times_s": [round(t, 4) for t in times],
        "peak_memory_mib": round(peak, 1),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }


def row_key(row: dict) -> str:
    point = row["classes"] if row["curve"] == "classes" else row["side"]
    return f"{row['preset']}/{row['curve']}/{point}"


def run_worker(spec: dict) -> dict:
    """Run `spec` in a fresh interpreter (own peak RSS, no allocator state shared with other rows)."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{row_key(spec)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(rows: list[dict]) -> dict:
    """Where the classes curve stops growing: latency and memory at the largest T relative to T = class_cap."""
    out = {}
    for preset in sorted({r["preset"] for r in rows}):
        curve = {r["classes"]: r for r in rows if r["preset"] == preset and r["curve"] == "classes"}
        cap = next(iter(curve.values()))["class_cap"] if curve else None
        above = [t for t in curve if cap and t > cap]
        if cap in curve and above:
            top, low = max(above), min(curve)

            def ratio(a, b, key):
                return round(curve[a][key] / curve[b][key], 3) if curve[b][key] > 0 else None

            out[preset] = {
                "class_cap": cap,
                f"latency_ratio_{top}_vs_{cap}": ratio(top, cap, "latency_s"),
                f"memory_ratio_{top}_vs_{cap}": ratio(top, cap, "peak_memory_mib"),
                f"latency_ratio_{cap}_vs_{low}": ratio(cap, low, "latency_s"),
            }
    modes = {r["mode"]: r["preset"] for r in rows}
    if {"DiSa", "CAT-Seg"} <= set(modes):
        ratios = {}
        for r in rows:
            if r["mode"] != "DiSa":
                continue
            other = next(
                (
                    o
                    for o in rows
                    if o["mode"] == "CAT-Seg"
                    and o["curve"] == r["curve"]
                    and o["classes"] == r["classes"]
                    and o["side"] == r["side"]
                ),
                None,
            )
            if other:
                ratios[f"{r['curve']}/{r['classes'] if r['curve'] == 'classes' else r['side']}"] = round(
                    r["latency_s"] / other["latency_s"], 3
                )
        out["latency_ratio_disa_vs_catseg"] = ratios
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| mode | curve | classes | image side | views | latency / view (s) | latency / image (s) | "
        "peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["mode"], r["curve"], r["classes"], r["side"])):
        lines.append(
            f"| {r['mode']} | {r['curve']} | {r['classes']} | {r['side']} | {r['views']} | "
            f"{r['latency_per_view_s']:.2f} | {r['latency_s']:.2f} | {r['peak_memory_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for mode, marker in (("DiSa", "o"), ("CAT-Seg", "s")):
        for col, (curve, x, xlabel) in enumerate(
            (
                ("classes", "classes", "classes T (one 384 view)"),
                ("sides", "side", "image side S (sliding window, 150 classes)"),
            )
        ):
            pts = sorted((r for r in rows if r["mode"] == mode and r["curve"] == curve), key=lambda r: r[x])
            if not pts:
                continue
            xs = [r[x] for r in pts]
            axes[0, col].plot(xs, [r["latency_per_view_s"] for r in pts], marker=marker, label=mode)
            axes[1, col].plot(xs, [r["peak_memory_mib"] for r in pts], marker=marker, label=mode)
            axes[1, col].set_xlabel(xlabel)
    cap = next((r["class_cap"] for r in rows), None)
    for row_axes, ylabel in ((axes[0], "latency per view (s)"), (axes[1], "peak memory above weights (MiB)")):
        row_axes[0].set_ylabel(ylabel)
        if cap:
            row_axes[0].axvline(cap, color="grey", ls=":", label=f"class_cap {cap}")
        for ax in row_axes:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv=None) -> None:
    a = parse(argv)
    if a.worker:
        print(json.dumps(measure(json.loads(a.worker))))
        return
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; run with --device cpu.")
    output = Path(a.output) if a.output else RESULTS / f"cost_curves_{device.type}.json"
    data = json.loads(output.read_text()) if output.exists() else {"rows": []}
    rows = {row_key(r): r for r in data["rows"]}
    command = "python benchmarks/cost_curves.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if "command" in data:  # files written before the list
        data["commands"] = [data.pop("command")]
    specs = [{"preset": p, "curve": "classes", "classes": t, "side": None} for p in a.presets for t in a.classes]
    specs += [
        {"preset": p, "curve": "sides", "classes": a.side_classes, "side": s} for p in a.presets for s in a.sides
    ]
    for spec in specs:
        key = row_key(spec)
        if key in rows and not a.force:
            print(f"{key}: kept from {output.name}", flush=True)
            continue
        spec.update(device=a.device, threads=a.threads, repeats=a.repeats)
        rows[key] = run_worker(spec)
        print(f"{key}: {rows[key]['latency_s']} s, {rows[key]['peak_memory_mib']} MiB", flush=True)
        data = {
            "what": __doc__.split("\n\n")[0],
            # every invocation that measured rows into this file, in order
            "commands": data.get("commands", []) + [command]
            if command not in data.get("commands", [])
            else data["commands"],
            "memory_method": (
                "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory "
                "allocated before the run"
                if device.type == "cuda"
                else "CPU: growth of peak RSS (resource.getrusage ru_maxrss) over its value after model "
                "construction and input allocation, one fresh subprocess per row"
            ),
            "timing": f"median of {a.repeats} timed run(s) after one warm-up view, one fresh subprocess per row",
            "threads": a.threads or torch.get_num_threads(),
            "machine": machine_info(device),
            "rows": sorted(rows.values(), key=lambda r: (r["preset"], r["curve"], r["classes"], r["side"])),
        }
        data["summary"] = summary(data["rows"])
        write_json(output, data)
    output.with_suffix(".md").write_text(markdown(data["rows"]))
    plot(
        data["rows"],
        output.with_suffix(".png"),
        f"Per-view cost of {', '.join(sorted({r['preset'] for r in data['rows']}))} "
        f"({data['machine']['device_name']}, {data['threads']} thread(s))",
    )
    print(json.dumps(data.get("summary", {}), indent=1))
    print("wrote", output)


if __name__ == "__main__":
    main()
