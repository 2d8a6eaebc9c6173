#!/usr/bin/env python
"""Cost curves: latency, peak memory and FLOPs vs number of classes and vs image size, DiSa / CAT-Seg mode as
interleaved pairs.

One DiSa model and one CAT-Seg-mode model (random weights, no download; precomputed text embeddings, so no text
encoding is timed) are measured at every point of two curves:

- classes: one view at the preset's `clip_resolution` (ViT-B/16: 384) at T = 10, 50, 150, 256, 847 classes. Above
  `config.class_cap` (256) the model keeps the top-256 classes by maximum cost and gives the rest a fixed logit, so
  only the cost volume of all T classes (CLIP features x T text embeddings) and the top-k still grow with T.
- sides: an image of H x W pixels (`S` for a square, `HxW` otherwise) through
  `modeling_disa.model.inference.sliding_window_probs`, warped to its short side (the protocol's 640 for its
  640 x 854 image), windows of the preset's view size with CAT-Seg's 2/3 stride (ViT-B/16: 384, stride 256), one
  view per model call, `--side_classes` (150) classes: 384 -> 1 crop + the global view, 512, 640 and 640 x 854 ->
  2 x 2 crops + the global view.

Every point is an interleaved pair: `--repeats` rounds (at least 3 for a result that passes the sanity checks), each
round one run of each model, each run in a fresh interpreter (own peak RSS, no allocator or cache state shared),
the order alternating between rounds. A run builds its model, warms up (one view), then times one pass of the
point (wall clock and the process's CPU time). Per model and point the JSON keeps every time, the median and the
spread; the headline is the per-point ratio DiSa / CAT-Seg, the median over rounds of the ratio within a round (two
runs timed back to back see about the same machine load, so the ratio survives a busy machine that the absolute
times do not). Per point also: FLOPs of one pass (`torch.utils.flop_counter.FlopCounterMode`, counted once per model
and point, in the first round's warm-up, which then is the whole pass: independent of the machine's load) and peak
memory. Peak memory on CPU is the growth of the process's peak resident set size (`resource.getrusage` ru_maxrss)
over its value after model construction and input allocation (before the warm-up); on CUDA
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the memory allocated before the run.

Sanity checks (in the JSON's `sanity`, printed, `--strict` exits 1 on a flag): fewer than 3 rounds; a time or
FLOP count that does not grow with the classes up to the class cap or with the views; a time that grows above the
cap by more than `ABOVE_CAP_GROWTH`; a point whose seconds per GFLOP is off its model's median by more than
`SECONDS_PER_GFLOP_TOLERANCE`x (a point measured while the machine was much busier); a point whose spread
(max - min) / median exceeds `MAX_SPREAD`.

Results: one JSON (points keyed by curve and point; points already there are kept, so a run resumes; `--force`
re-measures the points given), a Markdown table and a PNG plot next to it.

    python benchmarks/cost_curves.py --threads 2    # CPU, the ViT-B pair, the whole grid: 9 points x 3 rounds x 2
                                                    # runs; about 50 min on an idle 2-core CPU (1.5 h at --threads 1)
    python benchmarks/cost_curves.py --quick        # the tiny pair, a small grid (a few minutes: 36 short runs)
    python benchmarks/cost_curves.py --device cuda              # any CUDA machine -> cost_curves_cuda.json
    python benchmarks/cost_curves.py --classes 847 --sides --force   # re-measure one point
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_common import RESULTS, load_config, machine_info, peak_rss_mib, random_text_embeds, write_json  # noqa: E402

SCHEMA = 2
CLASSES = [10, 50, 150, 256, 847]
SIDES = ["384", "512", "640", "640x854"]
PAIR = {"disa": "disa-vit-b-16", "catseg": "catseg-vit-b-16"}
# `--quick`: the tiny preset (CAT-Seg mode, class cap 16, 128-pixel views) and the same with SDM and HRM switched on;
# a grid with points below, at and above the cap and the three window layouts (1 and 2 x 2 crops, non-square)
QUICK = {
    "disa": "disa-tiny",
    "disa_set": ["use_sdm=true", "use_hrm=true"],
    "catseg": "disa-tiny",
    "catseg_set": [],
    "classes": [8, 16, 24],
    "sides": ["128", "160", "160x213"],
    "side_classes": 8,
}
MODELS = ("disa", "catseg")
MODE = {"disa": "DiSa", "catseg": "CAT-Seg"}
MIN_REPEATS = 3
# sanity-check tolerances
MAX_SPREAD = 0.25  # (max - min) / median of one model's times at one point
ABOVE_CAP_GROWTH = 1.25  # time at T > class_cap over time at T = class_cap (only the cost volume still grows)
SECONDS_PER_GFLOP_TOLERANCE = 1.5  # a point's s/GFLOP against its model's median over the points
SAME_VIEWS_SLACK = 0.9  # more pixels, same views: the time may not drop below this share of the smaller image's
GOAL_RATIO = 1.05  # DiSa / CAT-Seg, latency and peak memory


def parse_side(text: str) -> tuple[int, int]:
    """`"640"` -> (640, 640); `"640x854"` -> (640, 854)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a side is S or HxW in pixels (384, 640x854), got {text!r}")
    height, width = int(parts[0]), int(parts[-1])
    return height, width


def parse_setting(text: str) -> tuple[str, object]:
    """`key=value` with a JSON value (`use_sdm=true`, `class_cap=16`); a bare word is a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"a config setting is key=value (use_sdm=true), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="the tiny pair and a small grid (a smoke run of a few minutes)"
    )
    p.add_argument("--disa", default=None, help=f"DiSa preset (default {PAIR['disa']})")
    p.add_argument("--catseg", default=None, help=f"CAT-Seg-mode preset (default {PAIR['catseg']})")
    p.add_argument("--disa_set", nargs="*", default=None, help="config settings key=value applied to --disa")
    p.add_argument("--catseg_set", nargs="*", default=None, help="config settings key=value applied to --catseg")
    p.add_argument(
        "--classes", nargs="*", type=int, default=None, help=f"classes-curve points ({CLASSES}; none: skip)"
    )
    p.add_argument("--sides", nargs="*", default=None, help=f"image sizes S or HxW ({SIDES}; none: skip)")
    p.add_argument("--side_classes", type=int, default=None, help="classes for the image-size curve (150)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (CPU); default: torch's")
    p.add_argument("--repeats", type=int, default=MIN_REPEATS, help="rounds per point (one run of each model)")
    p.add_argument(
        "--output",
        default=None,
        help="JSON path (default benchmarks/results/cost_curves_<device>.json; with --quick in the temporary folder)",
    )
    p.add_argument("--force", action="store_true", help="re-measure points already in the JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a sanity check flags a point")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one run, JSON spec
    a = p.parse_args(argv)
    if a.worker:
        return a
    defaults = (
        QUICK
        if a.quick
        else {
            "disa": PAIR["disa"],
            "disa_set": [],
            "catseg": PAIR["catseg"],
            "catseg_set": [],
            "classes": CLASSES,
            "sides": SIDES,
            "side_classes": 150,
        }
    )
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1 (and {MIN_REPEATS} for a result that passes the sanity checks)")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be at least 1")
    if any(t < 1 for t in a.classes) or a.side_classes < 1:
        p.error("class counts must be positive")
    try:
        a.sides = [parse_side(s) for s in a.sides]
        a.disa_set = dict(parse_setting(s) for s in a.disa_set)
        a.catseg_set = dict(parse_setting(s) for s in a.catseg_set)
    except argparse.ArgumentTypeError as error:
        p.error(str(error))
    return a


def build_config(preset: str, settings: dict):
    """The preset's config with `settings` applied; unknown keys are refused, values are validated by the model."""
    config = load_config(preset)
    for key, value in settings.items():
        if not hasattr(config, key):
            raise ValueError(f"{preset} has no config setting {key!r}; see its config.json for the names.")
        setattr(config, key, value)
    return config


def mode_of(config) -> str:
    return "DiSa" if (config.use_sdm or config.use_hrm) else "CAT-Seg"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def point_geometry(config, spec: dict) -> dict:
    """Image size, warp size and number of views of a point (model calls per pass)."""
    from modeling_disa.model.inference import sliding_window_geometry, window_starts

    geometry = sliding_window_geometry(config.clip_resolution)  # ViT-B/16@384: windows of 384, stride 256
    window, stride = geometry["window_size"], geometry["stride"]
    if spec["curve"] == "classes":
        return {"height": window, "width": window, "warp": None, "window": window, "stride": stride, "views": 1}
    height, width = spec["height"], spec["width"]
    warp = min(height, width)
    views = len(window_starts(warp, window, stride)) ** 2 + 1
    return {"height": height, "width": width, "warp": warp, "window": window, "stride": stride, "views": views}


def measure(spec: dict) -> dict:
    """One run of one model at one point, in this process."""
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_disa import DiSaForOpenVocabSegmentation
    from modeling_disa.model.inference import sliding_window_probs

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    config = build_config(spec["preset"], spec["settings"])
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(config).to(device).eval()
    embeds = random_text_embeds(config, spec["classes"], device)
    geo = point_geometry(config, spec)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, geo["height"], geo["width"], generator=g).to(device)
    if spec["curve"] == "classes":

        def run():
            return model(pixel_values=pixels, text_embeds=embeds).logits
    else:

        def run():
            return sliding_window_probs(
                model,
                pixels,
                embeds,
                warp_size=geo["warp"],
                window_size=geo["window"],
                stride=geo["stride"],
                batch_size=1,
            )

    warm_up = torch.randn(1, 3, geo["window"], geo["window"], generator=g).to(device)
    sync(device)
    # the baseline is taken after model construction and input allocation, before the warm-up: the warm-up reaches
    # the same activation peak as the timed pass and must count
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = peak_rss_mib()
    load_before = os.getloadavg()[0]
    flops = None
    with torch.inference_mode():
        if spec["count_flops"]:
            # the whole pass, counted (the counter adds Python work per operator: not the timed pass)
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            flops = counter.get_total_flops()
        else:
            model(pixel_values=warm_up, text_embeds=embeds)  # allocator, kernels
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = run()
        sync(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if not torch.isfinite(out).all():
            raise RuntimeError(f"non-finite output for {spec}")
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = peak_rss_mib() - base
    return {
        "time_s": round(seconds, 4),
        "cpu_time_s": round(cpu_seconds, 4),
        "peak_memory_mib": round(peak, 1),
        "gflops": None if flops is None else flops / 1e9,
        "height": geo["height"],
        "width": geo["width"],
        "views": geo["views"],
        "warp": geo["warp"],
        "mode": mode_of(config),
        "class_cap": config.class_cap,
        "threads": torch.get_num_threads(),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
    }


def point_key(curve: str, classes: int, height: int | None = None, width: int | None = None) -> str:
    if curve == "classes":
        return f"classes/{classes}"
    return f"sides/{height}" if height == width else f"sides/{height}x{width}"


def run_worker(spec: dict) -> dict:
    """`measure(spec)` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['preset']} at {spec['key']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> float | None:
    """(max - min) / median."""
    median = statistics.median(values)
    return round((max(values) - min(values)) / median, 4) if median > 0 else None


def model_stats(runs: list[dict]) -> dict:
    """One model's runs at one point (in round order) -> times, medians, spreads, memory and FLOPs."""
    times = [r["time_s"] for r in runs]
    cpu = [r["cpu_time_s"] for r in runs]
    memory = [r["peak_memory_mib"] for r in runs]
    views = runs[0]["views"]
    median = statistics.median(times)
    return {
        "times_s": times,
        "cpu_times_s": cpu,
        "median_s": round(median, 4),
        "min_s": min(times),
        "max_s": max(times),
        "spread": spread(times),
        "median_per_view_s": round(median / views, 4),
        "cpu_median_s": round(statistics.median(cpu), 4),
        "peak_memory_mib": memory,
        "peak_memory_median_mib": round(statistics.median(memory), 1),
        "gflops": next((r["gflops"] for r in runs if r["gflops"] is not None), None),
        "load_1min": [r["load_1min_after"] for r in runs],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def pair_point(base: dict, runs: dict[str, list[dict]], orders: list[list[str]]) -> dict:
    """A point from both models' runs (same number, same rounds): stats per model and the DiSa / CAT-Seg ratios."""
    disa, catseg = model_stats(runs["disa"]), model_stats(runs["catseg"])
    pair_ratios = [ratio(d, c) for d, c in zip(disa["times_s"], catseg["times_s"])]
    cpu_ratios = [ratio(d, c) for d, c in zip(disa["cpu_times_s"], catseg["cpu_times_s"])]
    first = runs["catseg"][0]
    return {
        **base,
        "views": first["views"],
        "warp": first["warp"],
        "class_cap": first["class_cap"],
        "threads": first["threads"],
        "rounds": len(pair_ratios),
        "orders": orders,
        "disa": disa,
        "catseg": catseg,
        "pair_ratios": pair_ratios,
        "ratio": round(statistics.median(pair_ratios), 4),
        "ratio_min": min(pair_ratios),
        "ratio_max": max(pair_ratios),
        "cpu_ratio": round(statistics.median(cpu_ratios), 4),
        "memory_ratio": ratio(disa["peak_memory_median_mib"], catseg["peak_memory_median_mib"]),
        "flop_ratio": ratio(disa["gflops"], catseg["gflops"]),
    }


def sanity(points: list[dict]) -> dict:
    """Flags for points that cannot be right (see the module docstring); `passed` when there are none."""
    flags = []
    for p in points:
        if p["rounds"] < MIN_REPEATS:
            flags.append(f"{p['key']}: {p['rounds']} round(s), fewer than {MIN_REPEATS}")
        for model in MODELS:
            if p[model]["spread"] is not None and p[model]["spread"] > MAX_SPREAD:
                flags.append(
                    f"{p['key']} {MODE[model]}: spread (max - min) / median {p[model]['spread']:.2f} > {MAX_SPREAD}"
                )
    classes = sorted((p for p in points if p["curve"] == "classes"), key=lambda p: p["classes"])
    sides = sorted((p for p in points if p["curve"] == "sides"), key=lambda p: (p["views"], p["height"] * p["width"]))
    for model in MODELS:

        def value(p, key):
            return p[model][key]

        for low, high in zip(classes, classes[1:]):
            cap = high["class_cap"]
            if cap <= 0 or high["classes"] <= cap:
                for key, what in (("median_s", "time"), ("gflops", "FLOPs")):
                    if value(low, key) is not None and value(high, key) <= value(low, key):
                        flags.append(
                            f"{high['key']} {MODE[model]}: {what} {value(high, key)} does not grow from "
                            f"{low['key']} ({value(low, key)}) although the classes do (up to the cap {cap})"
                        )
        at_cap = next((p for p in classes if p["classes"] == p["class_cap"]), None)
        for p in classes:
            if at_cap is not None and p["classes"] > p["class_cap"] > 0:
                growth = value(p, "median_s") / value(at_cap, "median_s")
                if growth > ABOVE_CAP_GROWTH:
                    flags.append(
                        f"{p['key']} {MODE[model]}: time {growth:.2f}x that at the class cap {at_cap['key']} "
                        f"(> {ABOVE_CAP_GROWTH}); above the cap only the cost volume grows"
                    )
        for low, high in zip(sides, sides[1:]):
            more_views = high["views"] > low["views"]
            if (more_views and value(high, "median_s") <= value(low, "median_s")) or (
                value(high, "median_s") < SAME_VIEWS_SLACK * value(low, "median_s")
            ):
                flags.append(
                    f"{high['key']} {MODE[model]}: time {value(high, 'median_s')} s below {low['key']}'s "
                    f"{value(low, 'median_s')} s although it has "
                    + ("more views" if more_views else "as many views and more pixels")
                )
            if more_views and value(low, "gflops") is not None and value(high, "gflops") <= value(low, "gflops"):
                flags.append(f"{high['key']} {MODE[model]}: FLOPs do not grow with the views from {low['key']}")
        rates = {p["key"]: value(p, "median_s") / value(p, "gflops") for p in points if value(p, "gflops")}
        if len(rates) >= 3:
            typical = statistics.median(rates.values())
            for key, rate in rates.items():
                off = rate / typical
                if not 1 / SECONDS_PER_GFLOP_TOLERANCE <= off <= SECONDS_PER_GFLOP_TOLERANCE:
                    flags.append(
                        f"{key} {MODE[model]}: {rate * 1e3:.2f} ms per GFLOP, {off:.2f}x the model's median over the "
                        f"points (tolerance {SECONDS_PER_GFLOP_TOLERANCE}x): measured under another load?"
                    )
    return {"passed": not flags, "flags": flags}


def summary(points: list[dict]) -> dict:
    """The per-point ratios DiSa / CAT-Seg and whether every point meets `GOAL_RATIO`."""
    out = {key: {p["key"]: p[key] for p in points} for key in ("ratio", "cpu_ratio", "memory_ratio", "flop_ratio")}
    for key in ("ratio", "memory_ratio"):
        values = [v for v in out[key].values() if v is not None]
        out[f"max_{key}"] = max(values) if values else None
    out["goal"] = GOAL_RATIO
    out["goal_met"] = {
        "latency": out["max_ratio"] is not None and out["max_ratio"] <= GOAL_RATIO,
        "memory": out["max_memory_ratio"] is not None and out["max_memory_ratio"] <= GOAL_RATIO,
    }
    return out


def point_label(p: dict) -> str:
    if p["curve"] == "classes":
        return f"T={p['classes']}"
    return f"{p['height']}x{p['width']}"


def markdown(data: dict) -> str:
    lines = [
        f"DiSa ({data['pair']['disa']['preset']}) / CAT-Seg mode ({data['pair']['catseg']['preset']}), "
        f"{data['threads']} thread(s), {data['machine']['device_name']}; times: median [min, max] of the rounds; "
        "ratio: median [min, max] of the per-round ratios DiSa / CAT-Seg.",
        "",
        "| curve | classes | image | views | DiSa (s) | CAT-Seg (s) | ratio | CPU-time ratio | GFLOPs DiSa / "
        "CAT-Seg | peak memory DiSa / CAT-Seg (MiB) | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    for p in data["points"]:
        d, c = p["disa"], p["catseg"]
        lines.append(
            f"| {p['curve']} | {p['classes']} | {p['height']}x{p['width']} | {p['views']} | "
            f"{d['median_s']:.2f} [{d['min_s']:.2f}, {d['max_s']:.2f}] | "
            f"{c['median_s']:.2f} [{c['min_s']:.2f}, {c['max_s']:.2f}] | "
            f"{p['ratio']:.3f} [{p['ratio_min']:.3f}, {p['ratio_max']:.3f}] | {p['cpu_ratio']:.3f} | "
            f"{fmt(d['gflops'], '.4g')} / {fmt(c['gflops'], '.4g')} ({fmt(p['flop_ratio'], '.3f')}) | "
            f"{d['peak_memory_median_mib']:.0f} / {c['peak_memory_median_mib']:.0f} | "
            f"{fmt(p['memory_ratio'], '.3f')} |"
        )
    s = data["sanity"]
    verdict = "passed" if s["passed"] else f"{len(s['flags'])} flag(s)"
    lines += ["", f"Sanity checks: {verdict}"]
    lines += [f"- {flag}" for flag in s["flags"]]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, curve in enumerate(("classes", "sides")):
        pts = [p for p in data["points"] if p["curve"] == curve]
        if not pts:
            continue
        xs = range(len(pts))
        labels = [point_label(p) + ("" if curve == "classes" else f"\n{p['views']} views") for p in pts]
        for offset, (model, marker) in zip((-0.1, 0.1), (("disa", "o"), ("catseg", "s"))):
            med = [p[model]["median_s"] for p in pts]
            err = [
                [m - p[model]["min_s"] for m, p in zip(med, pts)],
                [p[model]["max_s"] - m for m, p in zip(med, pts)],
            ]
            axes[0, col].errorbar([x + offset for x in xs], med, yerr=err, marker=marker, capsize=3, label=MODE[model])
        ratios = [p["ratio"] for p in pts]
        rerr = [[r - p["ratio_min"] for r, p in zip(ratios, pts)], [p["ratio_max"] - r for r, p in zip(ratios, pts)]]
        axes[1, col].errorbar(xs, ratios, yerr=rerr, marker="o", capsize=3, label="latency (median pair ratio)")
        axes[1, col].plot(xs, [p["memory_ratio"] for p in pts], marker="^", label="peak memory")
        if all(p["flop_ratio"] is not None for p in pts):
            axes[1, col].plot(xs, [p["flop_ratio"] for p in pts], marker="x", ls="--", label="FLOPs")
        axes[1, col].axhline(GOAL_RATIO, color="grey", ls=":", label=f"goal {GOAL_RATIO}")
        axes[1, col].axhline(1.0, color="black", lw=0.5)
        for ax in axes[:, col]:
            ax.set_xticks(list(xs), labels)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0, col].set_title("one view, classes T" if curve == "classes" else "sliding window, image H x W")
    axes[0, 0].set_ylabel("seconds per pass (median, min-max)")
    axes[1, 0].set_ylabel("DiSa / CAT-Seg")
    fig.suptitle(
        f"{data['pair']['disa']['preset']} vs {data['pair']['catseg']['preset']} ({data['machine']['device_name']}, "
        f"{data['threads']} thread(s))"
    )
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    plt.close(fig)


def code_version() -> dict:
    """The measured checkout: its commit and whether it had uncommitted changes (None outside a git checkout)."""
    import modeling_disa

    def git(*args):
        proc = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "modeling_disa": str(Path(modeling_disa.__file__).parent),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
    }


def check_pair(pair: dict) -> None:
    """The DiSa model must have SDM or HRM on, the CAT-Seg one neither, and both the same class cap and view size."""
    configs = {model: build_config(pair[model]["preset"], pair[model]["settings"]) for model in MODELS}
    for model, config in configs.items():
        if mode_of(config) != MODE[model]:
            raise SystemExit(
                f"--{model} {pair[model]['preset']} with {pair[model]['settings']} is a {mode_of(config)} model, not "
                f"{MODE[model]}: pass a preset (or --{model}_set use_sdm=... use_hrm=...) of that mode."
            )
    for key in ("class_cap", "clip_resolution"):
        values = {model: getattr(config, key) for model, config in configs.items()}
        if len(set(values.values())) != 1:
            raise SystemExit(f"the pair differs in {key} ({values}): its points would not be comparable.")


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker:
        print(json.dumps(measure(json.loads(a.worker))))
        return 0
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; run with --device cpu.")
    pair = {
        "disa": {"preset": a.disa, "settings": a.disa_set},
        "catseg": {"preset": a.catseg, "settings": a.catseg_set},
    }
    check_pair(pair)
    threads = a.threads or torch.get_num_threads()
    if a.output:
        output = Path(a.output)
    elif a.quick:  # a smoke run is no result: kept out of benchmarks/results
        output = Path(tempfile.gettempdir()) / f"cost_curves_quick_{device.type}.json"
    else:
        output = RESULTS / f"cost_curves_{device.type}.json"
    data = json.loads(output.read_text()) if output.exists() else {}
    if data and (data.get("schema") != SCHEMA or data["pair"] != pair or data["threads"] != threads):
        what = (
            f"pair {data.get('pair')}, {data.get('threads')} thread(s)"
            if data.get("schema") == SCHEMA
            else "an older layout (single runs per model, not interleaved pairs)"
        )
        raise SystemExit(
            f"{output} holds points of {what}; this run measures pair {pair} with {threads} thread(s). Pass another "
            "--output, or move the file away to replace it."
        )
    points = {p["key"]: p for p in data.get("points", [])}
    code = code_version()  # at the start: what every run of this invocation imports
    command = "python benchmarks/cost_curves.py " + " ".join(sys.argv[1:] if argv is None else argv)
    grid = [{"curve": "classes", "classes": t, "height": None, "width": None} for t in a.classes]
    grid += [{"curve": "sides", "classes": a.side_classes, "height": h, "width": w} for h, w in a.sides]
    for base in grid:
        key = point_key(base["curve"], base["classes"], base["height"], base["width"])
        if key in points and not a.force:
            print(f"{key}: kept from {output.name}", flush=True)
            continue
        runs = {model: [] for model in MODELS}
        orders = []
        for round_index in range(a.repeats):
            # alternate which model runs first: a load that changes during a round biases neither
            order = list(MODELS) if round_index % 2 == 0 else list(reversed(MODELS))
            orders.append(order)
            for model in order:
                spec = {
                    **base,
                    "key": key,
                    "preset": pair[model]["preset"],
                    "settings": pair[model]["settings"],
                    "device": a.device,
                    "threads": a.threads,
                    "count_flops": round_index == 0,
                }
                runs[model].append(run_worker(spec))
        first = runs["catseg"][0]
        point = pair_point({"key": key, **base, "height": first["height"], "width": first["width"]}, runs, orders)
        points[key] = point
        print(
            f"{key}: DiSa {point['disa']['median_s']} s, CAT-Seg {point['catseg']['median_s']} s, ratio "
            f"{point['ratio']} [{point['ratio_min']}, {point['ratio_max']}], memory ratio {point['memory_ratio']}, "
            f"FLOP ratio {point['flop_ratio']}",
            flush=True,
        )
        ordered = sorted(
            points.values(), key=lambda p: (p["curve"], p["classes"], p["views"], p["height"] * p["width"])
        )
        commands = data.get("commands", [])
        data = {
            "schema": SCHEMA,
            "what": __doc__.split("\n\n")[0],
            "commands": commands if command in commands else commands + [command],
            "pair": pair,
            "timing": (
                "per point, interleaved rounds (order alternating); per round one run of each model in a fresh "
                "interpreter: build, one warm-up view (in the first round: the whole pass under FlopCounterMode), "
                "one timed pass (wall clock and process CPU time); ratio = median over rounds of DiSa / CAT-Seg "
                "within a round"
            ),
            "memory_method": (
                "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory allocated "
                "before the run"
                if device.type == "cuda"
                else "CPU: growth of peak RSS (resource.getrusage ru_maxrss) over its value after model "
                "construction and input allocation, one fresh interpreter per run"
            ),
            "flops_method": "torch.utils.flop_counter.FlopCounterMode over one pass (matmuls, convolutions, "
            "attention; elementwise operators are not counted)",
            "threads": threads,
            "code": code,
            "machine": machine_info(device),
            "points": ordered,
        }
        data["summary"] = summary(ordered)
        data["sanity"] = sanity(ordered)
        write_json(output, data)
    if not data:
        raise SystemExit("no points requested and none in the output: pass --classes and/or --sides.")
    output.with_suffix(".md").write_text(markdown(data))
    plot(data, output.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=1))
    for flag in data["sanity"]["flags"]:
        print("SANITY:", flag)
    print(f"sanity: {'passed' if data['sanity']['passed'] else str(len(data['sanity']['flags'])) + ' flag(s)'}")
    print("wrote", output)
    return 1 if a.strict and not data["sanity"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
