"""Pipelines: the registered `open-vocabulary-segmentation` task and the built-in `image-segmentation` one.

References are computed here from the model's logits directly (CAT-Seg's order: per-class sigmoid at the logits'
resolution, bilinear resize, argmax; a class's score is the mean probability over its mask), checked against the image
processor's own post-processing, not with the pipeline's helper.
"""

import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from transformers import pipeline

from modeling_disa import PIPELINE_TASK, DiSaOpenVocabSegmentationPipeline

LABELS = ["cat", "sky", "road", "building, edifice"]


def make_image(seed: int, size=(90, 120)) -> Image.Image:
    array = (np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)
    return Image.fromarray(array)


class Segments(dict):
    """{label: (bool mask (H, W), score)}, with `margin` (H, W): the top-1 minus top-2 class probability of the
    reference, which tells a real disagreement from a float near-tie (batched and single runs, or the sliding
    window's views, sum in another order: a pixel whose two best classes tie within float noise may flip)."""

    margin = None


NEAR_TIE = 1e-5


def with_margin(out: dict, probabilities: torch.Tensor) -> Segments:
    top2 = probabilities.topk(2, dim=0).values
    segments = Segments(out)
    segments.margin = (top2[0] - top2[1]).numpy()
    return segments


def reference_segments(model, processor, image, labels=None):
    """{label: (bool mask (H, W), score)} from the model directly (`Segments`, with the near-tie margin)."""
    inputs = (
        processor(images=image, text=labels)
        if labels
        else processor.image_processor(images=image, return_tensors="pt")
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    names = labels or [model.config.id2label[i] for i in range(len(model.config.id2label))]
    size = (image.height, image.width)
    probabilities = F.interpolate(logits.sigmoid(), size=size, mode="bilinear", align_corners=False)[0]
    segmentation = probabilities.argmax(0)
    processed = processor.post_process_semantic_segmentation(SimpleNamespace(logits=logits), target_sizes=[size])[0]
    assert torch.equal(processed, segmentation)
    out = {}
    for class_id in np.unique(segmentation.numpy()):
        mask = segmentation.numpy() == class_id
        out[names[class_id]] = (mask, float(probabilities[class_id].numpy()[mask].mean()))
    return with_margin(out, probabilities)


def as_dict(result):
    return {entry["label"]: (np.asarray(entry["mask"]) > 127, entry["score"]) for entry in result}


def assert_same_segments(result, reference, image, check_scores=True):
    got = as_dict(result)
    assert len(got) == len(result), "one entry per label"
    assert set(got) == set(reference)
    margin = getattr(reference, "margin", None)
    for label, (mask, score) in reference.items():
        assert got[label][0].shape == (image.height, image.width)
        differ = got[label][0] != mask
        if margin is None or not differ.any():
            np.testing.assert_array_equal(got[label][0], mask)
        else:
            # only float near-ties may flip, and only a few pixels
            assert margin[differ].max() <= NEAR_TIE, f"{label}: pixels flipped where the classes do not tie"
            assert differ.sum() <= max(1, differ.size // 1000)
        if check_scores:
            assert got[label][1] == pytest.approx(score, abs=1e-5 if not differ.any() else 1e-3)
    # the masks partition the image
    assert sum(m.astype(int) for m, _ in got.values()).min() == 1


@pytest.fixture
def segmenter(tiny_model, tiny_processor):
    return pipeline(PIPELINE_TASK, model=tiny_model, processor=tiny_processor)


def test_task_is_registered_with_an_auto_class():
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    task = PIPELINE_REGISTRY.supported_tasks[PIPELINE_TASK]
    assert task["impl"] is DiSaOpenVocabSegmentationPipeline
    assert task["pt"] == (AutoModel,)


def test_open_vocabulary_pipeline_matches_the_model(segmenter, tiny_model, tiny_processor):
    assert isinstance(segmenter, DiSaOpenVocabSegmentationPipeline)
    image = make_image(0)
    result = segmenter(image, candidate_labels=LABELS)
    assert all(entry["mask"].mode == "L" and entry["mask"].size == image.size for entry in result)
    assert {e["label"] for e in result} <= set(LABELS)
    assert_same_segments(result, reference_segments(tiny_model, tiny_processor, image, LABELS), image)


def test_batched_images_equal_single_runs(segmenter, tiny_model, tiny_processor):
    images = [make_image(1), make_image(2, size=(64, 80)), make_image(3)]
    batched = segmenter(images, candidate_labels=LABELS, batch_size=2)
    assert isinstance(batched, list) and len(batched) == 3
    for image, result in zip(images, batched):
        assert_same_segments(result, reference_segments(tiny_model, tiny_processor, image, LABELS), image)


def test_default_vocabulary_and_builtin_image_segmentation(segmenter, tiny_model, tiny_processor):
    image = make_image(4)
    reference = reference_segments(tiny_model, tiny_processor, image)
    assert set(reference) <= set(tiny_model.config.id2label.values())
    assert_same_segments(segmenter(image), reference, image)

    builtin = pipeline("image-segmentation", model=tiny_model, image_processor=tiny_processor.image_processor)
    result = builtin(image)
    assert all(entry["score"] is None for entry in result)  # the built-in semantic branch gives no score
    assert_same_segments(result, reference, image, check_scores=False)


@pytest.mark.parametrize(
    "labels, error, match",
    [
        ([], ValueError, "empty"),
        (["cat", 3], TypeError, "strings"),
        (["cat", ""], TypeError, "strings"),
        ("cat", TypeError, r"\['cat'\]"),
        (["cat", "cat"], ValueError, "duplicate"),
        ({"cat": 1}, TypeError, "list of strings"),
    ],
)
def test_bad_candidate_labels(segmenter, labels, error, match):
    with pytest.raises(error, match=match):
        segmenter(make_image(0), candidate_labels=labels)


def test_a_model_without_a_default_vocabulary_needs_labels_per_call(tiny_config, tiny_processor):
    from modeling_disa import DiSaForOpenVocabSegmentation

    tiny_config.label_token_ids = None
    segmenter = pipeline(
        PIPELINE_TASK, model=DiSaForOpenVocabSegmentation(tiny_config).eval(), processor=tiny_processor
    )
    assert {e["label"] for e in segmenter(make_image(0), candidate_labels=["cat", "sky"])} <= {"cat", "sky"}
    with pytest.raises(ValueError, match="no stored default vocabulary"):
        segmenter(make_image(0))


def test_image_url_while_offline_fails_fast(segmenter, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ValueError, match="offline mode"):
        segmenter("https://example.com/cat.png", candidate_labels=["cat"])
    assert time.monotonic() - start < 5


def test_unknown_argument_and_missing_file(segmenter, tmp_path):
    with pytest.raises(TypeError, match="unexpected arguments"):
        segmenter(make_image(0), candidate_labels=["cat"], threshold=0.5)
    with pytest.raises((FileNotFoundError, ValueError, OSError)):
        segmenter(str(tmp_path / "missing.png"), candidate_labels=["cat"])


def test_local_path_input(segmenter, tiny_model, tiny_processor, tmp_path):
    image = make_image(5)
    image.save(tmp_path / "img.png")
    result = segmenter(str(tmp_path / "img.png"), candidate_labels=LABELS)
    assert_same_segments(result, reference_segments(tiny_model, tiny_processor, image, LABELS), image)


def test_saved_folder_pipelines_in_a_fresh_process_without_the_package(tiny_model, tiny_processor, tmp_path):
    from modeling_disa.hub import save_for_hub

    folder = save_for_hub(tiny_model, tiny_processor, tmp_path / "repo", repo_id="tester/disa-tiny")
    image = make_image(6)
    image.save(tmp_path / "img.png")
    expected_ov = {k: (m, s) for k, (m, s) in reference_segments(tiny_model, tiny_processor, image, LABELS).items()}
    expected_default = reference_segments(tiny_model, tiny_processor, image)
    torch.save(
        {
            "ov": {k: (torch.from_numpy(m), s) for k, (m, s) in expected_ov.items()},
            "default": {k: torch.from_numpy(m) for k, (m, _) in expected_default.items()},
        },
        tmp_path / "expected.pt",
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_disa"] = None
        import numpy as np, torch
        from PIL import Image
        from transformers import pipeline
        folder, labels = {str(folder)!r}, {LABELS!r}
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        image = Image.open({str(tmp_path / "img.png")!r})

        ov = pipeline(model=folder, trust_remote_code=True)   # the task comes from config.custom_pipelines
        assert type(ov).__name__ == "DiSaOpenVocabSegmentationPipeline", type(ov)
        assert type(ov).__module__.startswith("transformers_modules"), type(ov).__module__
        got = {{e["label"]: e for e in ov(image, candidate_labels=labels)}}
        assert set(got) == set(expected["ov"]), (set(got), set(expected["ov"]))
        for label, (mask, score) in expected["ov"].items():
            assert np.array_equal(np.asarray(got[label]["mask"]) > 127, mask.numpy()), label
            assert abs(got[label]["score"] - score) < 1e-5, (label, got[label]["score"], score)
        batched = ov([image, image], candidate_labels=labels, batch_size=2)
        assert [sorted(e["label"] for e in r) for r in batched] == [sorted(expected["ov"])] * 2

        seg = pipeline("image-segmentation", model=folder, trust_remote_code=True)
        got = {{e["label"]: np.asarray(e["mask"]) > 127 for e in seg(image)}}
        assert set(got) == set(expected["default"]), (set(got), set(expected["default"]))
        for label, mask in expected["default"].items():
            assert np.array_equal(got[label], mask.numpy()), label
        print("OK", type(seg.model).__module__)
        """
    )
    # same thread count as here, so that float reductions (and so near-tied pixels) round the same way
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PATH": "/usr/bin:/bin",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK transformers_modules" in result.stdout


@pytest.fixture(scope="module")
def sdm_segmenter(tiny_path, tiny_processor):
    from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation

    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(DiSaConfig.from_pretrained(tiny_path, use_sdm=True)).eval()
    return pipeline(PIPELINE_TASK, model=model, processor=tiny_processor)


def test_sliding_window_matches_the_protocol_run_view_by_view(sdm_segmenter, tiny_processor):
    from modeling_disa.model.inference import sliding_window_geometry, sliding_window_probs

    model, image = sdm_segmenter.model, make_image(9)
    geometry = sliding_window_geometry(tiny_processor.image_processor.size["height"])
    assert sdm_segmenter.sliding_window_geometry() == geometry == {"warp_size": 213, "window_size": 128, "stride": 85}
    warp = geometry["warp_size"]
    pixel_values = tiny_processor.image_processor(
        images=image, size={"height": warp, "width": warp}, return_tensors="pt"
    )["pixel_values"]
    tokens = tiny_processor.tokenize_class_names(LABELS)
    with torch.no_grad():
        text_embeds = model.get_text_embeddings(tokens["input_ids"], tokens["attention_mask"])
    probabilities = sliding_window_probs(model, pixel_values, text_embeds, batch_size=1, **geometry)
    probabilities = F.interpolate(
        probabilities, size=(image.height, image.width), mode="bilinear", align_corners=False
    )[0]
    segmentation = probabilities.argmax(dim=0).numpy()
    reference = with_margin(
        {
            LABELS[c]: (segmentation == c, float(probabilities[c].numpy()[segmentation == c].mean()))
            for c in np.unique(segmentation)
        },
        probabilities,
    )
    assert_same_segments(sdm_segmenter(image, candidate_labels=LABELS, inference_mode="sliding"), reference, image)


def test_saliency_entries_are_the_models_maps_and_text_is_encoded_once(sdm_segmenter, tiny_processor):
    model, image = sdm_segmenter.model, make_image(10)
    labels = ["saliency test one", "saliency test two", "saliency test three"]
    encodings, per_call = [], []
    hook = model.clip.text_model.register_forward_hook(lambda *args: encodings.append(1))
    try:
        for mode in ("whole", "sliding"):  # sliding: 5 views and the saliency maps
            start = len(encodings)
            sdm_segmenter(image, candidate_labels=labels, inference_mode=mode, output_saliency=True)
            per_call.append(len(encodings) - start)
            labels = [name + " again" for name in labels]
    finally:
        hook.remove()
    assert per_call == [1, 1]

    result = sdm_segmenter(image, candidate_labels=LABELS, output_saliency=True)
    with torch.no_grad():
        outputs = model(**tiny_processor(images=image, text=LABELS), output_saliency=True)
    assert result
    for entry in result:
        class_id = LABELS.index(entry["label"])
        np.testing.assert_array_equal(entry["saliency"], outputs.saliency[0, class_id].numpy())
        np.testing.assert_array_equal(entry["foreground_mask"], outputs.foreground_mask[0, class_id].numpy())
        assert entry["foreground_mask"].dtype == bool
    assert "saliency" not in sdm_segmenter(image, candidate_labels=LABELS)[0]


def test_bad_options(segmenter, sdm_segmenter):
    with pytest.raises(ValueError, match="inference_mode must be one of"):
        sdm_segmenter(make_image(0), candidate_labels=["cat"], inference_mode="tiles")
    with pytest.raises(ValueError, match="use_sdm=True"):
        segmenter(make_image(0), candidate_labels=["cat"], output_saliency=True)


class TextEncoderCalls:
    """Counts forward passes of the model's CLIP text tower."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.clip.text_model.register_forward_hook(self.hook)

    def hook(self, *args):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.handle.remove()


def test_one_text_encoding_per_vocabulary_and_nothing_goes_stale(segmenter, tiny_model, tiny_processor):
    images = [make_image(7), make_image(8), make_image(9)]
    segmenter.clear_text_embedding_cache()
    with TextEncoderCalls(tiny_model) as calls:
        segmenter(images, candidate_labels=LABELS, batch_size=2)  # two forward passes, one encoding
        assert calls.count == 1
        before = segmenter(images[0], candidate_labels=LABELS)
        assert calls.count == 1  # the same vocabulary: cached
        # the text weights edited in place (the version counter moves): the next call encodes again
        with torch.no_grad():
            for param in tiny_model.clip.text_projection.parameters():
                param.mul_(-1)
        after = segmenter(images[0], candidate_labels=LABELS)
        assert calls.count == 2
    assert_same_segments(after, reference_segments(tiny_model, tiny_processor, images[0], LABELS), images[0])
    changed = {label: entry for label, entry in as_dict(after).items()}
    assert changed.keys() != as_dict(before).keys() or any(
        not np.array_equal(mask, as_dict(before)[label][0]) for label, (mask, _) in changed.items()
    )
    with torch.no_grad():
        for param in tiny_model.clip.text_projection.parameters():
            param.mul_(-1)  # restore the session fixture's weights


def exif_rotated_jpeg(path, size=(120, 80)):
    """A JPEG stored at `size` (width, height) with EXIF orientation 6 (displayed rotated by 90 degrees)."""
    stored = make_image(10, size=(size[1], size[0]))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied_for_every_input_form(segmenter, tmp_path):
    from PIL import ImageOps

    path = exif_rotated_jpeg(tmp_path / "rotated.jpg")
    upright = ImageOps.exif_transpose(Image.open(path))
    assert upright.size == (80, 120)  # displayed size (width, height)
    by_path = segmenter(str(path), candidate_labels=LABELS)
    by_pil = segmenter(Image.open(path), candidate_labels=LABELS)
    by_upright = segmenter(upright, candidate_labels=LABELS)
    builtin = pipeline(
        "image-segmentation", model=segmenter.model, image_processor=segmenter.processor.image_processor
    )
    for result in (by_path, by_pil, by_upright, builtin(Image.open(path))):
        assert {entry["mask"].size for entry in result} == {(80, 120)}
    assert as_dict(by_pil).keys() == as_dict(by_path).keys() == as_dict(by_upright).keys()
    for label, (mask, score) in as_dict(by_path).items():
        np.testing.assert_array_equal(as_dict(by_pil)[label][0], mask)
        np.testing.assert_array_equal(as_dict(by_upright)[label][0], mask)


def test_empty_image_list_gives_an_empty_list(segmenter):
    assert segmenter([], candidate_labels=LABELS) == []
    assert segmenter([]) == []  # default vocabulary
    with pytest.raises(ValueError, match="duplicate"):
        segmenter([], candidate_labels=["cat", "cat"])  # arguments are still checked


def test_labels_sharing_a_prompt_are_refused(segmenter):
    with pytest.raises(ValueError, match=r"\['building, edifice', 'building, house'\]"):
        segmenter(make_image(0), candidate_labels=["building, edifice", "building, house"])
    with pytest.raises(ValueError, match="empty first synonym"):
        segmenter(make_image(0), candidate_labels=["sky", ", cat"])


def test_segments_equal_the_full_tensor_computation_in_bounded_blocks(request):
    """600 classes at 200 x 300 (36M values at once before): the same masks and label order as the argmax of all
    resized probabilities, the scores their mean, and no resized block that grows with the number of classes."""
    from modeling_disa.model.inference import UPSAMPLE_BLOCK_ELEMENTS
    from modeling_disa.model.pipeline_disa import segments_from_logits, segments_from_probabilities

    logits = 4 * torch.randn(600, 8, 8, generator=torch.Generator().manual_seed(0))
    logits[450] = logits[7]  # a tied pair: the first class keeps its pixels, as in argmax
    labels = [f"class {i}" for i in range(600)]
    size = (200, 300)
    probabilities = F.interpolate(logits.sigmoid()[None], size=size, mode="bilinear", align_corners=False)[0]
    segmentation = probabilities.argmax(0)
    expected = {
        labels[c]: (segmentation.numpy() == c, float(probabilities[c][segmentation == c].mean()))
        for c in torch.unique(segmentation).tolist()
    }
    assert labels[7] in expected and labels[450] not in expected
    sizes = request.getfixturevalue("interpolate_sizes")  # recording from here on, after the references
    for result in (
        segments_from_logits(logits, size, labels),
        segments_from_probabilities(logits.sigmoid(), size, labels),
    ):
        assert [entry["label"] for entry in result] == list(expected)
        for entry in result:
            mask, score = expected[entry["label"]]
            np.testing.assert_array_equal(np.asarray(entry["mask"]), mask.astype(np.uint8) * 255)
            assert entry["score"] == pytest.approx(score, rel=1e-6)  # a float64 sum instead of float32's
    assert max(sizes) <= UPSAMPLE_BLOCK_ELEMENTS


def test_images_over_max_image_pixels_are_refused_before_decoding(segmenter, tmp_path, monkeypatch):
    path = tmp_path / "image.png"
    make_image(0).save(path)
    monkeypatch.setattr(segmenter, "max_image_pixels", 90 * 120 - 1)
    message = r"120 x 90 = 0\.0 megapixels.*max_image_pixels"
    for image in (make_image(0), np.zeros((90, 120, 3), np.uint8)):
        with pytest.raises(ValueError, match=message):
            segmenter(image, candidate_labels=LABELS)

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", no_decoding)
        with pytest.raises(ValueError, match=message):
            segmenter(str(path), candidate_labels=LABELS)
    monkeypatch.setattr(segmenter, "max_image_pixels", 90 * 120)
    assert segmenter(make_image(0), candidate_labels=LABELS)
