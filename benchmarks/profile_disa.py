#!/usr/bin/env python
"""Where a DiSa view spends its time, next to CAT-Seg mode: torch.profiler CPU time per module and per operator.

Both presets (random weights, no download) run one view (ViT-B at 384, precomputed text embeddings for `--classes`
classes, batch 1) under `torch.profiler.profile`; every module listed in `MODULES` is wrapped in a
`record_function` range by forward hooks, so the profiler's own table gives the CPU time per module (inclusive of
its children), and the operator table shows what the routing costs (`aten::index_select`, `aten::index_copy_`, ...).
The two models are profiled interleaved (`--rounds` times each, medians reported).

Writes `benchmarks/results/<output>.json` (default `disa_profile_cpu.json`).
Usage: python benchmarks/profile_disa.py [--classes 150] [--rounds 3] [--threads N] [--output NAME]
"""

import argparse
import json
import statistics
import sys

import torch
from bench_common import RESULTS, load_model, machine_info, write_json
from torch.profiler import ProfilerActivity, profile, record_function

# module-name prefixes timed as one range each (inclusive); names that a configuration lacks are skipped
MODULES = (
    "clip.vision_model",
    "cost_embedding",
    "appearance_guidance",
    "guidance_upsampler",
    "sdm.cost_saliency",
    "aggregator.layers.0.spatial",
    "aggregator.layers.0.class_aggregation",
    "aggregator.layers.0.refinement",
    "aggregator.layers.1.spatial",
    "aggregator.layers.1.class_aggregation",
    "aggregator.layers.1.refinement",
    "sdm.fusion",
    "decoder",
    "decoder.up1",
    "decoder.up1.refinement",
    "decoder.up2",
    "decoder.up2.refinement",
    "decoder.head",
)
OPERATORS = (
    "aten::index_select",
    "aten::index_copy_",
    "aten::where",
    "aten::nonzero",
    "aten::mul",
    "aten::sum",
    "aten::addmm",
    "aten::linear",
    "aten::layer_norm",
    "aten::convolution",
    "aten::copy_",
    "aten::cat",
    "aten::scaled_dot_product_attention",
    "aten::einsum",
)


def wrap_modules(model) -> list:
    handles = []
    modules = dict(model.named_modules())
    for name in MODULES:
        module = modules.get(name)
        if module is None:
            continue
        ranges = []

        def enter(_module, _args, name=name, ranges=ranges):
            ranges.append(record_function(f"module::{name}"))
            ranges[-1].__enter__()

        def leave(_module, _args, _output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def profile_view(model, pixels, embeds) -> dict:
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("view"):
            model(pixel_values=pixels, text_embeds=embeds)
    rows = {}
    for event in prof.key_averages():
        if event.key == "view" or event.key.startswith("module::") or event.key in OPERATORS:
            # cpu_time_total is inclusive of children, in microseconds
            rows[event.key.removeprefix("module::")] = event.cpu_time_total / 1e6
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="disa_profile_cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {mode: load_model(f"{mode}-vit-b-16") for mode in ("catseg", "disa")}
    for model in models.values():
        wrap_modules(model)
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    embeds = torch.nn.functional.normalize(
        torch.randn(args.classes, 1, models["disa"].config.projection_dim, generator=torch.Generator().manual_seed(1)),
        dim=-1,
    )
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(pixel_values=pixels, text_embeds=embeds)
    runs = {mode: [] for mode in models}
    for _ in range(args.rounds):
        for mode, model in models.items():
            runs[mode].append(profile_view(model, pixels, embeds))
    result = {"command": " ".join(sys.argv), "classes": args.classes, "rounds": args.rounds, "seconds": {}}
    for mode, rounds in runs.items():
        keys = sorted(set().union(*rounds), key=lambda k: -statistics.median(r.get(k, 0.0) for r in rounds))
        result["seconds"][mode] = {k: round(statistics.median(r.get(k, 0.0) for r in rounds), 4) for k in keys}
    result["view_ratio_disa_over_catseg"] = round(
        result["seconds"]["disa"]["view"] / result["seconds"]["catseg"]["view"], 4
    )
    result["machine"] = machine_info("cpu")
    print(json.dumps(result, indent=1))
    output = RESULTS / f"{args.output}.json"
    write_json(output, result)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
