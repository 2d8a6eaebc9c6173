#!/usr/bin/env python
"""Peak memory of semantic post-processing vs the number of classes: 10 vs 847 classes to a 2048 x 2048 target.

Each case runs in a fresh subprocess, which builds random `(T, 96, 96)` logits (in which the same 10 classes
can win a pixel: the pipeline returns one full-size mask per class present), warms the code up on a small
target, reads its resident set size (the baseline), post-processes to 2048 x 2048 and reads its high-water RSS
(`ru_maxrss`); the figure is the growth over the baseline, i.e. the working memory of the post-processing alone.

Cases: `processor` (`DiSaImageProcessor.post_process_semantic_segmentation`: label map, int64), `pipeline`
(`segments_from_logits`: label map, masks and scores of the classes present) and `full_tensor`, the computation
they replaced (every class resized at once, then the argmax), at 10 and 50 classes only: at 847 it needs ~14 GB.
Goal: 847-class peak within 1.2x of the 10-class peak for `processor` and `pipeline`.

Writes benchmarks/results/postprocess_memory_cpu.json. Usage:
python benchmarks/postprocess_memory.py [--threads N] [--size 2048] [--classes 10 847]
"""

import argparse
import json
import subprocess
import sys
import time

from bench_common import REPO, RESULTS, machine_info, write_json

GOAL_RATIO = 1.2
LOGITS_SIDE = 96
# Classes that can win a pixel (the others' logits are 20 lower): the pipeline returns a full-size mask per class
# present, output memory that a real image with hundreds of candidate labels does not have.
PRESENT_CLASSES = 10
FULL_TENSOR_CLASSES = (10, 50)

CHILD = r"""
import json, resource, sys
import torch
import torch.nn.functional as F
from modeling_disa.model.image_processing_disa import DiSaImageProcessor
from modeling_disa.model.modeling_disa import DiSaSegmentationOutput
from modeling_disa.model.pipeline_disa import segments_from_logits

case = sys.argv[1]
classes, side, logits_side, threads, PRESENT = map(int, sys.argv[2:7])
torch.set_num_threads(threads)
logits = 4 * torch.randn(1, classes, logits_side, logits_side, generator=torch.Generator().manual_seed(0))
logits[:, PRESENT:] -= 20  # every class is resized, but the same few lead: both runs return as many masks
labels = [f"class {i}" for i in range(classes)]
processor = DiSaImageProcessor()


def run(size):
    if case == "processor":
        return processor.post_process_semantic_segmentation(DiSaSegmentationOutput(logits=logits), [size])[0]
    if case == "pipeline":
        return segments_from_logits(logits[0], size, labels)
    probabilities = F.interpolate(logits.sigmoid(), size=size, mode="bilinear", align_corners=False)[0]
    return probabilities.argmax(0)


def rss_mib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


run((64, 64))
baseline = rss_mib()
result = run((side, side))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"baseline_rss_mib": round(baseline, 1), "peak_rss_mib": round(peak, 1),
                  "growth_mib": round(peak - baseline, 1)}))
"""


def measure(case: str, classes: int, side: int, threads: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, case, *map(str, (classes, side, LOGITS_SIDE, threads, PRESENT_CLASSES))],
        check=True,
        capture_output=True,
        cwd=REPO,
        text=True,
    )
    row = {"case": case, "classes": classes, **json.loads(out.stdout.strip().splitlines()[-1])}
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(row, flush=True)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=2048, help="side of the square target")
    parser.add_argument("--classes", type=int, nargs=2, default=[10, 847], help="few and many classes")
    parser.add_argument("--output", default=str(RESULTS / "postprocess_memory_cpu.json"))
    args = parser.parse_args(argv)

    few, many = args.classes
    rows = [measure(case, t, args.size, args.threads) for case in ("processor", "pipeline") for t in (few, many)]
    rows += [measure("full_tensor", t, args.size, args.threads) for t in FULL_TENSOR_CLASSES]
    growth = {(row["case"], row["classes"]): row["growth_mib"] for row in rows}
    ratios = {case: round(growth[case, many] / growth[case, few], 3) for case in ("processor", "pipeline")}
    import torch

    torch.set_num_threads(args.threads)
    result = {
        "what": f"peak working memory of semantic post-processing, {few} vs {many} classes, "
        f"({LOGITS_SIDE} x {LOGITS_SIDE}) logits to a {args.size} x {args.size} target",
        "command": "python benchmarks/postprocess_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "memory": "high-water RSS growth over the RSS after a warm-up, in a fresh process per case (MiB)",
        "classes_present": f"the first {PRESENT_CLASSES} (the other classes' logits are 20 lower)",
        "results": rows,
        "ratio_many_to_few": ratios,
        "goal_ratio": GOAL_RATIO,
        "goal_met": all(ratio <= GOAL_RATIO for ratio in ratios.values()),
        "machine": machine_info("cpu"),
    }
    write_json(args.output, result)
    print(json.dumps({"ratio_many_to_few": ratios, "goal_met": result["goal_met"]}))
    if not result["goal_met"]:
        raise SystemExit(f"peak memory at {many} classes is over {GOAL_RATIO}x the {few}-class peak: {ratios}")
    return result


if __name__ == "__main__":
    main()
