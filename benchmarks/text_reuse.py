#!/usr/bin/env python
"""Text-encoder cost of a 150-class vocabulary: prompts padded to the longest one vs padded to 77 (one run).

The processor pads prompts to the longest one (`padding="longest"`); CLIP's causal mask and its pooling at the EOS
token make that identical to padding to 77 (checked here on the embeddings). This times the ViT-B/16 text tower
(`disa-vit-b-16` preset, random weights, no download) on the 150 ADE-20k class names in the preset's prompt
template, both ways, in one run (alternating rounds, median per way), and writes
benchmarks/results/text_reuse_cpu.json with the machine and load.

Prompt lengths: no CLIP BPE vocabulary is available offline, so each prompt's length is estimated as BOS + one
token per word or punctuation piece (CLIP's pre-tokenizer pattern) + EOS; real BPE gives at least that many.
The ratio is also measured at twice the estimated longest length (a pessimistic bound for rare words split in
several BPE pieces).

That repeated label sets cost no text encoding (pipeline cache, sliding-window views, validation loop) is counted,
not timed, in tests/test_text_reuse.py.

    python benchmarks/text_reuse.py [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_common import RESULTS, load_config, machine_info, write_json  # noqa: E402

CLIP_CONTEXT = 77
# CLIP's pre-tokenizer pattern (words, digits, other symbols), without its special-token alternatives
PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", re.IGNORECASE)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per padding (after one warm-up each)")
    p.add_argument("--output", default=str(RESULTS / "text_reuse_cpu.json"))
    return p.parse_args()


def prompts_150(config) -> list[str]:
    from modeling_disa.evaluation.dataset_definitions import first_synonym, load_evaluation_dataset

    names = [first_synonym(n) for n in load_evaluation_dataset("ade150").class_names]
    return [template.format(name) for name in names for template in config.prompt_templates]


def tokens(prompts: list[str], length: int, vocab: int, g: torch.Generator) -> dict:
    """Random ids at each prompt's estimated length, BOS/EOS, padded to `length`."""
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        n = min(len(PIECES.findall(prompt)) + 2, length)
        ids[row, :n] = torch.randint(1, vocab - 2, (n,), generator=g)
        ids[row, 0], ids[row, n - 1] = vocab - 2, vocab - 1
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def main() -> None:
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import CLIPTextModelWithProjection

    config = load_config("disa-vit-b-16")
    text_config = config.text_config
    prompts = prompts_150(config)
    torch.manual_seed(0)
    tower = CLIPTextModelWithProjection(text_config).eval()
    g = torch.Generator().manual_seed(0)
    longest = max(len(PIECES.findall(p)) + 2 for p in prompts)
    results = {}
    for name, length in (("estimated", longest), ("twice_estimated", min(2 * longest, CLIP_CONTEXT))):
        short = tokens(prompts, length, text_config.vocab_size, g)
        padded = {k: torch.nn.functional.pad(v, (0, CLIP_CONTEXT - length)) for k, v in short.items()}
        times = {"longest": [], "77": []}
        with torch.inference_mode():
            same = torch.allclose(tower(**short).text_embeds, tower(**padded).text_embeds, atol=1e-5)  # + warm-up
            for _ in range(a.rounds):  # alternating, so load changes hit both ways alike
                for key, batch in (("longest", short), ("77", padded)):
                    start = time.perf_counter()
                    tower(**batch)
                    times[key].append(time.perf_counter() - start)
        medians = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {
            "padded_length": length,
            "seconds_longest": [round(t, 4) for t in times["longest"]],
            "seconds_77": [round(t, 4) for t in times["77"]],
            "median_seconds_longest": round(medians["longest"], 4),
            "median_seconds_77": round(medians["77"], 4),
            "ratio_77_over_longest": round(medians["77"] / medians["longest"], 2),
            "same_embeddings": same,
        }
        print(name, results[name])
    report = {
        "what": __doc__.split("\n\n")[0],
        "command": "python benchmarks/text_reuse.py"
        + (f" --threads {a.threads}" if a.threads else "")
        + f" --rounds {a.rounds}",
        "text_tower": "CLIP ViT-B/16 text tower (disa-vit-b-16 preset, random weights)",
        "classes": 150,
        "prompts": len(prompts),
        "templates": list(config.prompt_templates),
        "length_estimate": "BOS + words/punctuation pieces + EOS (no CLIP BPE offline; real BPE gives >= that)",
        "results": results,
        "goal_ratio": 4.0,
        "goal_met": results["estimated"]["ratio_77_over_longest"] >= 4.0,
        "machine": machine_info("cpu"),
    }
    write_json(a.output, report)
    print("wrote", a.output)


if __name__ == "__main__":
    main()
