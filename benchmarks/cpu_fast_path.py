#!/usr/bin/env python
"""The fast CPU inference path against float32 eager: one ViT-B 384 view, 150 classes, interleaved in one run.

    python benchmarks/cpu_fast_path.py          # every option, 3 rounds -> benchmarks/results/cpu_fast_path_cpu.json
    python benchmarks/cpu_fast_path.py --quick  # no torch.compile rows (inductor compiles for minutes on 2 cores)

Each round times one forward of every option in turn (float32 eager first) plus a large `torch.mm` loop in each
measured dtype, so that a load change hits all of them alike; the headline per option is the median over rounds of
the per-round speed-up (float32 eager time / option time), with the median times and their spread beside it.
Achieved GFLOP/s = the forward's FLOPs (`torch.utils.flop_counter.FlopCounterMode`, counted once on float32 eager;
every option computes the same FLOPs) / the option's time, reported as a fraction of the round's matmul rate in the
option's dtype (the machine's practical peak, measured in the same round). Options the CPU cannot run fast
(bfloat16 without AVX512_BF16 / AMX, `modeling_disa.check_inference_dtype`) are recorded as refused, with the reason.
Accuracy per option: largest logit difference to float32 eager (absolute and relative to max |logit|) and the share
of pixels whose argmax class agrees.

Options: `fp32_eager` (the baseline: SDPA attention, transformers' default), `fp32_eager_attention` (attention
without SDPA, to show what the fused kernel brings), `fp32_channels_last` (weights and input in channels-last
memory format for the convolutions), `fp32_compile` (`torch.compile`, inductor), `bf16_weights` (the model in
bfloat16: `from_pretrained(dtype=torch.bfloat16)` / `pipeline(dtype=...)`), `bf16_autocast` (`torch.autocast`,
what `run_evaluation.py --dtype bf16` does), `bf16_compile`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_common import RESULTS, load_model, machine_info, random_text_embeds, write_json  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from modeling_disa import check_inference_dtype  # noqa: E402

OPTIONS = [
    "fp32_eager",
    "fp32_eager_attention",
    "fp32_channels_last",
    "fp32_compile",
    "bf16_weights",
    "bf16_autocast",
    "bf16_compile",
]
QUICK_SKIP = {"fp32_compile", "bf16_compile"}
GOAL_SPEEDUP = 2.0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="disa-vit-b-16")
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3 for a median with a spread)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    p.add_argument("--options", nargs="+", choices=OPTIONS, default=None)
    p.add_argument("--quick", action="store_true", help="skip the torch.compile options")
    p.add_argument("--matmul_side", type=int, default=2048, help="side of the square torch.mm of the peak probe")
    p.add_argument("--output", default=str(RESULTS / "cpu_fast_path_cpu.json"))
    return p.parse_args(argv)


def matmul_rate(dtype: torch.dtype, side: int, repeats: int = 3) -> float:
    """FLOP/s of the best of `repeats` (side x side) @ (side x side) products in `dtype` (after one warm-up)."""
    a, b = torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b))[0] for _ in range(repeats))
    return 2 * side**3 / best


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def build_options(names, model, pixel_values, text_embeds):
    """name -> (callable returning float32 logits, the option's dtype) or a refusal string."""
    built = {}
    for name in names:
        dtype = torch.bfloat16 if name.startswith("bf16") else torch.float32
        try:
            check_inference_dtype(dtype, "cpu")
        except ValueError as error:
            built[name] = f"refused: {error}"
            continue
        if name == "fp32_eager":
            net, x = model, pixel_values
        elif name == "fp32_eager_attention":
            net, x = copy.deepcopy(model), pixel_values
            net.set_attn_implementation("eager")
        elif name == "fp32_channels_last":
            net = copy.deepcopy(model).to(memory_format=torch.channels_last)
            x = pixel_values.contiguous(memory_format=torch.channels_last)
        elif name in ("fp32_compile", "bf16_compile"):
            net = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
            net, x = torch.compile(net), pixel_values.to(dtype)
        elif name == "bf16_weights":
            net, x = copy.deepcopy(model).to(dtype), pixel_values.to(dtype)
        else:  # bf16_autocast
            net, x = model, pixel_values
        autocast = name == "bf16_autocast"

        def call(net=net, x=x, autocast=autocast):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return net(pixel_values=x, text_embeds=text_embeds).logits.float()

        built[name] = (call, dtype)
    return built


def main(argv=None) -> dict:
    args = parse(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1.")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    names = args.options or [o for o in OPTIONS if not (args.quick and o in QUICK_SKIP)]
    if "fp32_eager" not in names:
        names = ["fp32_eager", *names]
    started = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    model = load_model(args.preset).eval()
    side = model.config.clip_resolution
    pixel_values = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    text_embeds = random_text_embeds(model.config, args.classes, "cpu")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(pixel_values=pixel_values, text_embeds=text_embeds)
    flops = counter.get_total_flops()
    built = build_options(names, model, pixel_values, text_embeds)
    runnable = {n: b for n, b in built.items() if not isinstance(b, str)}
    dtypes = sorted({dtype for _, dtype in runnable.values()}, key=str)

    # first call of every option: warm-up, compilation for the compiled ones, and the reference logits
    first_call_s, logits = {}, {}
    for name, (call, _) in runnable.items():
        first_call_s[name], logits[name] = _timed(call)
        print(f"{name}: first call {first_call_s[name]:.1f} s", flush=True)
    rounds = []
    for r in range(args.rounds):
        times = {name: _timed(call)[0] for name, (call, _) in runnable.items()}
        peaks = {str(dtype): matmul_rate(dtype, args.matmul_side) for dtype in dtypes}
        rounds.append({"seconds": times, "matmul_flops_per_s": peaks, "load_1min": round(os.getloadavg()[0], 2)})
        print(f"round {r + 1}: " + ", ".join(f"{n} {t:.2f} s" for n, t in times.items()), flush=True)

    reference = logits["fp32_eager"]
    rows = []
    for name in names:
        if isinstance(built[name], str):
            rows.append({"option": name, "supported": False, "reason": built[name]})
            continue
        dtype = str(runnable[name][1])
        seconds = [rd["seconds"][name] for rd in rounds]
        speedups = [rd["seconds"]["fp32_eager"] / rd["seconds"][name] for rd in rounds]
        fractions = [flops / rd["seconds"][name] / rd["matmul_flops_per_s"][dtype] for rd in rounds]
        difference = (logits[name] - reference).abs().max().item()
        rows.append(
            {
                "option": name,
                "supported": True,
                "dtype": dtype,
                "first_call_s": round(first_call_s[name], 2),
                "seconds_median": statistics.median(seconds),
                "seconds_min_max": [min(seconds), max(seconds)],
                "speedup_vs_fp32_eager_median": statistics.median(speedups),
                "speedup_per_round": [round(s, 3) for s in speedups],
                "achieved_gflop_per_s_median": flops / statistics.median(seconds) / 1e9,
                "fraction_of_matmul_peak_median": statistics.median(fractions),
                "max_abs_logit_difference": difference,
                "max_abs_logit_difference_relative": difference / reference.abs().max().item(),
                "argmax_agreement": (logits[name].argmax(1) == reference.argmax(1)).float().mean().item(),
            }
        )
    best = max((r for r in rows if r["supported"]), key=lambda r: r["speedup_vs_fp32_eager_median"])
    report = {
        "what": __doc__.split("\n\n")[0],
        "command": "python benchmarks/cpu_fast_path.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": args.preset,
        "view_side": side,
        "classes": args.classes,
        "rounds": args.rounds,
        "quick": args.quick,
        "flops_per_view": flops,
        "machine": {**machine_info("cpu"), "torch_threads": threads, "load_average_before": load_before},
        "matmul_probe": {
            "side": args.matmul_side,
            "flop_per_s_per_round": [rd["matmul_flops_per_s"] for rd in rounds],
        },
        "rounds_raw": rounds,
        "options": rows,
        "goal": {
            "speedup": GOAL_SPEEDUP,
            "best_option": best["option"],
            "best_speedup": best["speedup_vs_fp32_eager_median"],
            "met": best["speedup_vs_fp32_eager_median"] >= GOAL_SPEEDUP,
        },
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    write_json(args.output, report)
    for row in rows:
        if row["supported"]:
            print(
                f"{row['option']:>22}: {row['seconds_median']:.2f} s, x{row['speedup_vs_fp32_eager_median']:.2f}, "
                f"{row['achieved_gflop_per_s_median']:.1f} GFLOP/s = {row['fraction_of_matmul_peak_median']:.0%} "
                f"of matmul, max |dlogit| {row['max_abs_logit_difference']:.2e}"
            )
        else:
            print(f"{row['option']:>22}: {row['reason'][:100]}")
    print("wrote", args.output)
    return report


if __name__ == "__main__":
    main()
