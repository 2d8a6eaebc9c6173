#!/usr/bin/env python
"""Wall time of one request to the demo app (space/app.py), as a user's client sees it (figure script, not a test).

The app is launched on 127.0.0.1 with its own settings and the model of the default job (`runs/toy-world`, or
`--model`); a `gradio_client` sends the app's first example (space/examples/, a toy-world test scene) with the full
24-class vocabulary of its world, SDM saliency on, in each
inference mode. One request = upload, the pipeline call, the overlay / legend / saliency panels, download of the
results. Reports the median and minimum over `--rounds` after `--warmup` requests, and the pipeline's share as the
app measured it; the machine's load average is recorded beside them (a busy CPU slows every figure).

    python benchmarks/demo_request.py [--model runs/toy-world] [--rounds 10] [--threads 1]

`--threads` sets torch's intra-op threads (default: torch's, one per core); on a CPU that other jobs keep busy, one
thread avoids the spinning of a thread pool that cannot get its cores.

Results go to benchmarks/results/demo_request_cpu.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from bench_common import machine_info  # noqa: E402 - after the environment it reads


def load_app():
    spec = importlib.util.spec_from_file_location("disa_space_app", REPO / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "runs" / "toy-world"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "demo_request_cpu.json"))
    args = parser.parse_args(argv)

    import torch
    from gradio_client import Client, handle_file

    if args.threads:
        torch.set_num_threads(args.threads)
    app = load_app()
    with tempfile.TemporaryDirectory() as tmp:
        examples, example_world = app.load_examples()
        segmenter = app.load_segmenter(args.model)
        demo = app.build_demo(segmenter, args.model, "the benchmark", examples, example_world)
        demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **app.launch_options())
        try:
            client = Client(demo.local_url, verbose=False, download_files=str(Path(tmp) / "client"))
            labels = app.format_labels(example_world)
            image = examples[0]
            size = "{} x {}".format(*app.Image.open(image).size)
            results = {
                "command": " ".join(sys.argv),
                "model": args.model,
                "image": f"space/examples/{image.name}, {size}",
                "classes": len(example_world),
                "saliency": True,
                "load_average_before": os.getloadavg(),
                "machine": machine_info("cpu"),
                "modes": {},
            }
            for mode in app.MODES:
                walls, pipeline = [], []
                for round_ in range(args.warmup + args.rounds):
                    start = time.perf_counter()
                    *_, timing = client.predict(handle_file(str(image)), labels, mode, True, api_name="/segment")
                    if round_ >= args.warmup:
                        walls.append(time.perf_counter() - start)
                        pipeline.append(float(re.match(r"Pipeline: ([0-9.]+) s", timing).group(1)))
                results["modes"][mode] = {
                    "request_s_median": round(statistics.median(walls), 3),
                    "request_s_min": round(min(walls), 3),
                    "pipeline_s_median": round(statistics.median(pipeline), 3),
                    "rounds": args.rounds,
                }
                print(
                    f"{mode}: request {statistics.median(walls):.3f} s median (min {min(walls):.3f}), "
                    f"pipeline {statistics.median(pipeline):.3f} s"
                )
            results["load_average_after"] = os.getloadavg()
        finally:
            demo.close()
    partial = Path(args.output + ".partial")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(partial, args.output)
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
