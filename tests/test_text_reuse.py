"""Repeated label sets cost no text encoding: the pipeline's text-embedding cache, sliding-window inference and the
training script's validation loop, counted by wrapping the CLIP text tower's forward (no timing)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_disa import PIPELINE_TASK
from modeling_disa.model.inference import predict_segmentation, sliding_window_probs

LABELS = ["cat", "dog", "grass", "sky", "road", "tree"]
SLIDING = dict(warp_size=160, window_size=128, stride=32, batch_size=1)  # 2x2 crops + the global view, 1 per call


class TextCalls:
    """Counts calls of `model.clip.text_model.forward` (and of the whole model's forward, for the views)."""

    def __init__(self, model, monkeypatch):
        self.text = self.views = 0
        text_forward, model_forward = model.clip.text_model.forward, model.forward

        def counted_text(*args, **kwargs):
            self.text += 1
            return text_forward(*args, **kwargs)

        def counted_model(*args, **kwargs):
            self.views += kwargs["pixel_values"].shape[0]
            return model_forward(*args, **kwargs)

        monkeypatch.setattr(model.clip.text_model, "forward", counted_text)
        monkeypatch.setattr(model, "forward", counted_model)

    def take(self) -> tuple[int, int]:
        counts, self.text, self.views = (self.text, self.views), 0, 0
        return counts


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def model(tiny_config):
    from modeling_disa import DiSaForOpenVocabSegmentation

    torch.manual_seed(0)
    return DiSaForOpenVocabSegmentation(tiny_config).eval()


@pytest.fixture
def segmenter(model, tiny_processor):
    return pipeline(PIPELINE_TASK, model=model, processor=tiny_processor)


def test_second_pipeline_call_with_the_same_labels_encodes_nothing(model, segmenter, monkeypatch):
    calls = TextCalls(model, monkeypatch)
    first = segmenter(images(4), candidate_labels=LABELS, batch_size=2)
    assert calls.take() == (1, 4)  # 4 images in 2 forward passes, one encoding
    second = segmenter(images(4), candidate_labels=LABELS, batch_size=2)
    assert calls.take() == (0, 4)
    for a, b in zip(first, second):  # the cached embeddings give the same result
        assert [(e["label"], e["score"]) for e in a] == [(e["label"], e["score"]) for e in b]
    segmenter(images(2), candidate_labels=LABELS, inference_mode="sliding")
    assert calls.take() == (0, 10)  # 2 images x 5 views, still no encoding
    segmenter(images(1), candidate_labels=LABELS[:3])  # another vocabulary: encoded once
    segmenter(images(1), candidate_labels=LABELS[:3])
    assert calls.take() == (1, 2)
    segmenter(images(1))  # the default vocabulary (config.id2label) is cached too
    segmenter(images(1))
    assert calls.take() == (1, 2)


def test_cache_follows_weight_changes_and_is_bounded(model, segmenter, monkeypatch):
    calls = TextCalls(model, monkeypatch)
    image = images(1)[0]
    segmenter(image, candidate_labels=LABELS)
    with torch.no_grad():  # an in-place edit moves the version counter: encoded again
        model.clip.text_model.final_layer_norm.weight.mul_(2)
    segmenter(image, candidate_labels=LABELS)
    model.load_state_dict(model.state_dict())  # copies into the parameters in place
    segmenter(image, candidate_labels=LABELS)
    assert calls.take()[0] == 3
    with torch.no_grad():  # `.data` bypasses the version counter: documented, cleared by hand
        model.clip.text_model.final_layer_norm.weight.data.mul_(2)
    segmenter(image, candidate_labels=LABELS)
    assert calls.take()[0] == 0
    segmenter.clear_text_embedding_cache()
    segmenter(image, candidate_labels=LABELS)
    assert calls.take()[0] == 1

    size = segmenter.text_embedding_cache_size
    for k in range(size - 1):  # LABELS plus `size - 1` others fill the cache; LABELS is the oldest entry
        segmenter(image, candidate_labels=[f"thing {k}"])
    assert len(segmenter._text_embedding_cache) == size
    segmenter(image, candidate_labels=["one more"])  # evicts the oldest: LABELS
    calls.take()
    segmenter(image, candidate_labels=LABELS)
    assert calls.take()[0] == 1
    assert len(segmenter._text_embedding_cache) == size


def test_cache_can_be_disabled(model, segmenter, monkeypatch):
    calls = TextCalls(model, monkeypatch)
    monkeypatch.setattr(segmenter, "text_embedding_cache_size", 0)
    segmenter(images(1), candidate_labels=LABELS)
    segmenter(images(1), candidate_labels=LABELS)
    assert calls.take()[0] == 2


def test_sliding_window_evaluation_encodes_once_per_vocabulary(model, tiny_processor, monkeypatch):
    tokens = dict(tiny_processor.tokenize_class_names(LABELS))
    pixels = tiny_processor.image_processor(images(3, 1), return_tensors="pt")["pixel_values"]
    calls = TextCalls(model, monkeypatch)
    embeds = model.get_text_embeddings(**tokens)
    for image in pixels:  # an evaluation loop over images, one view per forward pass
        sliding_window_probs(model, image[None], embeds, **SLIDING)
    assert calls.take() == (1, 15)
    sliding_window_probs(model, pixels, **SLIDING, **tokens)  # tokens given: encoded once for all 15 views
    assert calls.take() == (1, 15)
    predict_segmentation(model, pixels, embeds, mode="sliding", short_side=None, **SLIDING)
    assert calls.take() == (0, 15)

    def plain(**kwargs):  # a model without get_text_embeddings gets the tokens on every view
        return model(**kwargs)

    sliding_window_probs(plain, pixels[:1], **SLIDING, **tokens)
    assert calls.take() == (5, 5)


def test_validation_loop_encodes_once(model, tiny_processor, monkeypatch):
    from accelerate import Accelerator

    from train import evaluate

    rng = torch.Generator().manual_seed(0)
    loader = [
        {
            "pixel_values": torch.randn(2, 3, 64, 64, generator=rng),
            "labels": torch.randint(0, len(LABELS), (2, 64, 64), generator=rng),
        }
        for _ in range(3)
    ]
    tokens = dict(tiny_processor.tokenize_class_names(LABELS))
    calls = TextCalls(model, monkeypatch)
    evaluate(model, loader, Accelerator(cpu=True), tokens, len(LABELS), 255)
    assert calls.take() == (1, 6)
