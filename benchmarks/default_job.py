#!/usr/bin/env python
"""Wall time of README's main command: `HF_HUB_OFFLINE=1 accelerate launch training/train.py`, the toy-world job
(toy CLIP pretraining, DiSa, CAT-Seg mode, report), on a fresh toy-world cache.

Runs the command in a subprocess with `DISA_TOY_CACHE` pointing at an empty temporary folder (so the toy CLIP is
pretrained, as on a fresh machine), measures its wall time and the peak resident memory of its process tree
(`ru_maxrss` of the children), and reads the stage timings and CPU threads the job itself reports
(`<output_dir>/toy_world_results.json`: `timings_seconds`, `cpu_threads`). Records the machine and its load before and
after. Extra arguments go to `train.py` (e.g. `--max_train_steps 3` for a check of the script itself; such a run is
marked as not the default job).

Writes benchmarks/results/default_job_cpu.json. Usage:
python benchmarks/default_job.py [--output PATH] [-- train.py arguments]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from bench_common import REPO, RESULTS, machine_info, write_json

GOAL_MINUTES = 12.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(RESULTS / "default_job_cpu.json"))
    parser.add_argument("train_args", nargs="*", help="arguments passed to train.py after `--`")
    args = parser.parse_args(argv)

    before = machine_info()
    with tempfile.TemporaryDirectory(prefix="disa-default-job-") as tmp:
        output_dir = os.path.join(tmp, "toy-world")
        env = {**os.environ, "DISA_TOY_CACHE": os.path.join(tmp, "cache"), "HF_HUB_OFFLINE": "1"}
        env.pop("OMP_NUM_THREADS", None)  # the job decides its threads, as on a fresh machine
        # `accelerate launch` of this interpreter's environment (the console script may not be on PATH)
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        command = [*launch, "training/train.py", "--output_dir", output_dir, *args.train_args]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"the job failed (exit {proc.returncode}): {' '.join(command)}")
        with open(os.path.join(output_dir, "toy_world_results.json")) as fh:
            report = json.load(fh)
        with open(os.path.join(output_dir, "toy_world_results.md")) as fh:
            report_markdown = fh.read()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    result = {
        "machine": before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": "HF_HUB_OFFLINE=1 accelerate launch training/train.py" + "".join(f" {a}" for a in args.train_args),
        "default_job": not args.train_args,
        "fresh_cache": True,
        "wall_seconds": round(wall, 1),
        "goal_minutes": GOAL_MINUTES,
        "goal_met": wall / 60 <= GOAL_MINUTES,
        "peak_rss_mib_largest_process": round(peak_rss_mib),
        "timings_seconds": report.get("timings_seconds"),
        "cpu_threads": report.get("cpu_threads"),
        "report_markdown": report_markdown,
        "test_miou": {name: scores.get("mIoU") for name, scores in report.get("results", {}).items()},
    }
    write_json(args.output, result)
    print(json.dumps({k: result[k] for k in ("wall_seconds", "timings_seconds", "cpu_threads", "goal_met")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
