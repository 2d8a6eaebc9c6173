#!/usr/bin/env python
"""Text-encoder calls where one vocabulary serves many forward passes (figure script, not a test).

The model keeps no text-embedding cache; the callers that run one vocabulary many times encode it once with
`get_text_embeddings` and pass `text_embeds=`. This counts CLIP text-tower forward passes (a forward hook) on the
disa-tiny preset (random weights), for each such caller, against passing the prompt tokens to every forward pass:

- the `open-vocabulary-segmentation` pipeline: 8 images, `batch_size=2` (4 forward passes), the same labels;
- sliding-window inference (`modeling_disa.model.inference`): 2 images of 5 views each, 1 view per forward pass;
- the training script's validation loop (`training/train.py:evaluate`): 6 images, batch 2.

It also times the ViT-B/16 text tower (`disa-vit-b-16` preset, random weights) on 150 prompts, which is what each
avoided encoding costs at full size, and checks that editing text weights in place (no tensor version bump) changes
the next pipeline call's output (nothing stale). Writes benchmarks/results/text_reuse_cpu.json.

    python benchmarks/text_reuse.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_disa import PIPELINE_TASK, DiSaConfig, DiSaForOpenVocabSegmentation, DiSaProcessor  # noqa: E402
from modeling_disa.model.inference import sliding_window_probs  # noqa: E402

PRESETS = REPO / "configuration" / "models"
LABELS = ["cat", "dog", "grass", "sky", "road", "tree", "water", "car"]


class TextCalls:
    def __init__(self, model):
        self.count = 0
        self.handle = model.clip.text_model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1

    def reset(self) -> int:
        count, self.count = self.count, 0
        return count


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(n)]


def pipeline_counts(model, processor, calls) -> dict:
    from transformers import pipeline

    segmenter = pipeline(PIPELINE_TASK, model=model, processor=processor)
    batch = images(8)
    calls.reset()
    segmenter(batch, candidate_labels=LABELS, batch_size=2)
    reused = calls.reset()
    # the same forward passes with the prompt tokens given to each one
    tokens = processor.tokenize_class_names(LABELS)
    with torch.no_grad():
        for i in range(0, len(batch), 2):
            pixels = processor.image_processor(batch[i:i + 2], return_tensors="pt")["pixel_values"]
            model(pixel_values=pixels, **tokens)
    per_forward = calls.reset()

    # nothing stale: an in-place edit of the text weights shows in the next call
    before = segmenter(batch[0], candidate_labels=LABELS)
    with torch.no_grad():
        for param in model.clip.text_projection.parameters():
            param.data.mul_(-1)
    after = segmenter(batch[0], candidate_labels=LABELS)
    with torch.no_grad():
        for param in model.clip.text_projection.parameters():
            param.data.mul_(-1)
    changed = [(e["label"], round(e["score"], 6)) for e in before] != [(e["label"], round(e["score"], 6)) for e in after]
    calls.reset()
    return {"images": 8, "batch_size": 2, "forward_passes": 4, "text_encodings_reused": reused,
            "text_encodings_tokens_per_forward": per_forward, "in_place_text_weight_edit_changes_output": changed}


def sliding_counts(model, processor, calls) -> dict:
    tokens = dict(processor.tokenize_class_names(LABELS))
    pixels = processor.image_processor(images(2, 1), return_tensors="pt")["pixel_values"]
    kwargs = dict(warp_size=160, window_size=128, stride=32, batch_size=1)  # 4 crops + global view, 1 per call
    calls.reset()
    for image in pixels:
        with torch.no_grad():
            embeds = model.get_text_embeddings(**tokens)
        sliding_window_probs(model, image[None], embeds, **kwargs)
    explicit = calls.reset()
    for image in pixels:
        sliding_window_probs(model, image[None], **kwargs, **tokens)
    from_tokens = calls.reset()
    # a model that is not DiSa's (no get_text_embeddings) gets the tokens on every view
    plain = lambda **kw: model(**kw)  # noqa: E731
    for image in pixels:
        sliding_window_probs(plain, image[None], **kwargs, **tokens)
    per_view = calls.reset()
    return {"images": 2, "views_per_image": 5, "forward_passes": 10, "text_encodings_text_embeds": explicit,
            "text_encodings_input_ids": from_tokens, "text_encodings_tokens_per_forward": per_view}


def evaluation_counts(model, processor, calls) -> dict:
    from accelerate import Accelerator

    from train import evaluate

    class Loader(list):
        pass

    rng = torch.Generator().manual_seed(0)
    loader = Loader({"pixel_values": torch.randn(2, 3, 64, 64, generator=rng),
                     "labels": torch.randint(0, len(LABELS), (2, 64, 64), generator=rng)} for _ in range(3))
    tokens = dict(processor.tokenize_class_names(LABELS))
    calls.reset()
    evaluate(model, loader, Accelerator(cpu=True), tokens, len(LABELS), 255)
    reused = calls.reset()
    with torch.no_grad():  # the same batches with the prompt tokens given to each forward pass
        for batch in loader:
            model(pixel_values=batch["pixel_values"], **tokens)
    per_forward = calls.reset()
    return {"images": 6, "batches": 3, "text_encodings": reused, "text_encodings_tokens_per_forward": per_forward}


def vit_b_text_seconds(rounds: int = 3) -> dict:
    from transformers import CLIPTextModelWithProjection

    config = DiSaConfig.from_pretrained(PRESETS / "disa-vit-b-16")
    torch.manual_seed(0)
    tower = CLIPTextModelWithProjection(config.text_config).eval()
    tokens = torch.randint(0, config.text_config.vocab_size, (150, 12))
    times = []
    with torch.inference_mode():
        tower(input_ids=tokens)
        for _ in range(rounds):
            start = time.perf_counter()
            tower(input_ids=tokens)
            times.append(time.perf_counter() - start)
    return {"prompts": 150, "prompt_length": 12, "seconds": [round(t, 4) for t in times],
            "median_seconds": round(statistics.median(times), 4)}


def main() -> None:
    config = DiSaConfig.from_pretrained(PRESETS / "disa-tiny")
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(config).eval()
    processor = DiSaProcessor.from_pretrained(PRESETS / "disa-tiny")
    calls = TextCalls(model)
    results = {
        "what": __doc__.split("\n\n")[0],
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average_1_5_15_min": os.getloadavg()},
        "pipeline": pipeline_counts(model, processor, calls),
        "sliding_window": sliding_counts(model, processor, calls),
        "evaluation_loop": evaluation_counts(model, processor, calls),
        "vit_b_16_text_encoder_150_prompts": vit_b_text_seconds(),
    }
    seconds = results["vit_b_16_text_encoder_150_prompts"]["median_seconds"]
    sliding = results["sliding_window"]
    avoided = (sliding["text_encodings_tokens_per_forward"] - sliding["text_encodings_text_embeds"]) / sliding["images"]
    results["vit_b_16_text_seconds_saved_per_sliding_window_image"] = round(avoided * seconds, 3)
    print(json.dumps(results, indent=1))
    output = REPO / "benchmarks" / "results" / "text_reuse_cpu.json"
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
