"""transformers' common image-processor and processor tests, ported to DiSaImageProcessor / DiSaProcessor.

transformers' wheel does not ship its test suite (`ImageProcessingTestMixin`,
`PostProcessSemanticSegmentationTestMixin` and `PreprocessingTesterMixin` in `tests/test_image_processing_common.py`
and `tests/test_preprocessing_common.py`, `ProcessorTesterMixin` in `tests/test_processing_common.py` of the
transformers repository), so each applicable test is ported here under its upstream name, with the same inputs and
assertions (pytest instead of unittest, one PIL backend instead of the loop over backends).

Upstream tests that do not apply, and why:
- `test_backends_equivalence`, `test_backends_equivalence_batched`, `test_save_load_backends`,
  `test_save_load_backends_auto`, `test_can_compile_torchvision_backend`: DiSa ships one image processor, on the PIL
  backend (the torchvision backend cannot be installed beside the CPU torch wheel this project is built with), so
  there is no second backend to compare, load or compile.
- `test_new_models_require_torchvision_backend`: fails by design for the same reason: DiSa's image processor is
  PIL-only, and DiSa is not a transformers model with an entry in its list of older models.
- `test_call_numpy_4_channels`: feeds 4-channel images with a 4-value `image_mean`; DiSa's CLIP towers take RGB,
  so 4-channel (RGBA) images are converted to 3 channels (alpha dropped, or composited with `do_convert_rgb=True`)
  and the 3-value CLIP mean applies.
- `test_override_instance_attributes_does_not_affect_other_instances`: checks only processors whose `size` is a
  `dict` and `image_mean` a `list`; in transformers 5.x `size` is a `SizeDict` and `image_mean` a tuple, so the
  upstream test returns without checking anything.
- `test_explicit_none_preserved`: pins the `preprocessing_base.py` of releases after 5.25, where `None` given to
  the constructor is stored; in 5.25 `BaseImageProcessor._set_attributes` replaces it with the class default.
- `test_image_processor_preprocess_arguments`: checks `_valid_processor_keys` or the
  `filter_out_non_signature_kwargs` decorator, which 5.x backends no longer have (upstream skips it); the 5.x
  equivalent, `validate_typed_dict` refusing unknown keywords, is checked by
  `test_unknown_preprocess_argument_is_refused`.
- `test_slow_*` ADE20k / COCO integration tests: they download fixtures; this suite runs offline.
- processor tests on chat templates, audio, video and multimodal token counts: DiSa's processor has no such
  inputs.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, BatchFeature
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.testing_utils import check_json_file_has_correct_format

from modeling_disa import DiSaImageProcessor, DiSaProcessor

BATCH_SIZE, NUM_CHANNELS, MIN_RESOLUTION, MAX_RESOLUTION = 7, 3, 30, 400
SIZE = {"height": 18, "width": 20}
NUM_LABELS = 10
IMAGE_PROCESSOR_DICT = {
    "do_resize": True,
    "size": SIZE,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_reduce_labels": False,
}


def prepare_image_inputs(equal_resolution=False, numpify=False, torchify=False, batch_size=BATCH_SIZE, seed=0):
    """Upstream `prepare_image_inputs`: random uint8 images, PIL (default), channels-last NumPy or channels-first
    torch."""
    rng = np.random.RandomState(seed)
    images = []
    for _ in range(batch_size):
        if equal_resolution:
            width = height = MAX_RESOLUTION
        else:
            width, height = rng.choice(np.arange(MIN_RESOLUTION, MAX_RESOLUTION), 2)
        images.append(rng.randint(255, size=(NUM_CHANNELS, width, height), dtype=np.uint8))
    if torchify:
        return [torch.from_numpy(image) for image in images]
    if numpify:
        return [image.transpose(1, 2, 0) for image in images]
    return [Image.fromarray(np.moveaxis(image, 0, -1)) for image in images]


def expected_output_image_shape():
    return NUM_CHANNELS, SIZE["height"], SIZE["width"]


@pytest.fixture
def image_processor():
    return DiSaImageProcessor(**IMAGE_PROCESSOR_DICT)


# --------------------------------------------------------------- PreprocessingTesterMixin / ImageProcessingTestMixin
def test_to_json_string(image_processor):
    obj = json.loads(image_processor.to_json_string())
    for key, value in IMAGE_PROCESSOR_DICT.items():
        assert obj[key] == value, f"`{key}` did not survive `to_json_string`"


def test_to_json_file(image_processor, tmp_path):
    image_processor.to_json_file(tmp_path / "processor.json")
    second = DiSaImageProcessor.from_json_file(tmp_path / "processor.json")
    assert second.to_dict() == image_processor.to_dict()


def test_from_and_save_pretrained(image_processor, tmp_path):
    saved_file = image_processor.save_pretrained(tmp_path)[0]
    check_json_file_has_correct_format(saved_file)
    second = DiSaImageProcessor.from_pretrained(tmp_path)
    assert second.to_dict() == image_processor.to_dict()


def test_save_load_with_auto_class(image_processor, tmp_path):
    # upstream passes `backend=`; a remote-code image processor loads with `trust_remote_code=True`
    saved_file = image_processor.save_pretrained(tmp_path)[0]
    check_json_file_has_correct_format(saved_file)
    second = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert second.to_dict() == image_processor.to_dict()


def test_init_without_params():
    assert DiSaImageProcessor() is not None


def test_explicit_none_kwarg_falls_back_to_default(image_processor):
    """At call time `None` means "unset" and resolves to the processor's configured value."""
    inputs = prepare_image_inputs(equal_resolution=True, torchify=True)
    reference = image_processor(inputs, return_tensors="pt")
    candidates = [
        name
        for name in image_processor._valid_kwargs_names
        if isinstance(getattr(image_processor, name, None), bool) and getattr(image_processor, name)
    ]
    assert candidates
    for name in candidates:
        encoding = image_processor(inputs, return_tensors="pt", **{name: None})
        assert set(encoding.keys()) == set(reference.keys())
        for key, expected in reference.items():
            torch.testing.assert_close(encoding[key], expected, atol=0, rtol=0, msg=f"`{name}=None` changed `{key}`")


def test_cast_dtype_device(image_processor):
    image_inputs = prepare_image_inputs(equal_resolution=False, torchify=True)
    encoding = image_processor(image_inputs, return_tensors="pt")
    assert encoding.pixel_values.device == torch.device("cpu") and encoding.pixel_values.dtype == torch.float32
    encoding = image_processor(image_inputs, return_tensors="pt").to(torch.float16)
    assert encoding.pixel_values.device == torch.device("cpu") and encoding.pixel_values.dtype == torch.float16
    encoding = image_processor(image_inputs, return_tensors="pt").to("cpu", torch.bfloat16)
    assert encoding.pixel_values.device == torch.device("cpu") and encoding.pixel_values.dtype == torch.bfloat16
    with pytest.raises(TypeError):
        image_processor(image_inputs, return_tensors="pt").to(torch.bfloat16, "cpu")
    encoding = image_processor(image_inputs, return_tensors="pt")
    encoding.update({"input_ids": torch.LongTensor([[1, 2, 3], [4, 5, 6]])})
    encoding = encoding.to(torch.float16)
    assert encoding.pixel_values.dtype == torch.float16 and encoding.input_ids.dtype == torch.long


@pytest.mark.parametrize("kind", ["pil", "numpy", "pytorch"])  # test_call_pil / test_call_numpy / test_call_pytorch
def test_call(image_processor, kind):
    image_inputs = prepare_image_inputs(numpify=kind == "numpy", torchify=kind == "pytorch")
    expected_type = {"pil": Image.Image, "numpy": np.ndarray, "pytorch": torch.Tensor}[kind]
    assert all(isinstance(image, expected_type) for image in image_inputs)
    encoded_images = image_processor(image_inputs[0], return_tensors="pt").pixel_values
    assert tuple(encoded_images.shape) == (1, *expected_output_image_shape())
    encoded_images = image_processor(image_inputs, return_tensors="pt").pixel_values
    assert tuple(encoded_images.shape) == (BATCH_SIZE, *expected_output_image_shape())


def test_unknown_preprocess_argument_is_refused(image_processor):
    with pytest.raises(TypeError, match="extra_argument"):
        image_processor(prepare_image_inputs(), extra_argument=True)


# ---------------------------------------------------------------------------- PostProcessSemanticSegmentationTestMixin
def prepare_post_process_semantic_segmentation_inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH_SIZE, NUM_LABELS, SIZE["height"], SIZE["width"], generator=generator)
    return {"outputs": SemanticSegmenterOutput(logits=logits)}


def test_post_process_semantic_segmentation(image_processor):
    inputs = prepare_post_process_semantic_segmentation_inputs()
    segmentation = image_processor.post_process_semantic_segmentation(**inputs)
    assert len(segmentation) == BATCH_SIZE
    assert segmentation[0].shape == (SIZE["height"], SIZE["width"])
    segmentation_output = image_processor.post_process_semantic_segmentation(**inputs, return_segmentation_scores=True)
    assert len(segmentation_output) == BATCH_SIZE
    assert torch.equal(segmentation_output[0].segmentation, segmentation[0])
    assert segmentation_output[0].segmentation_scores.shape == (NUM_LABELS, SIZE["height"], SIZE["width"])


def test_post_process_semantic_segmentation_target_sizes(image_processor):
    inputs = prepare_post_process_semantic_segmentation_inputs()
    target_sizes = [(1, 4) for _ in range(BATCH_SIZE)]
    segmentation_resized = image_processor.post_process_semantic_segmentation(**inputs, target_sizes=target_sizes)
    assert segmentation_resized[0].shape == target_sizes[0]
    segmentation_output_resized = image_processor.post_process_semantic_segmentation(
        **inputs, target_sizes=target_sizes, return_segmentation_scores=True
    )
    assert torch.equal(segmentation_output_resized[0].segmentation, segmentation_resized[0])
    assert segmentation_output_resized[0].segmentation_scores.shape == (NUM_LABELS,) + target_sizes[0]
    with pytest.raises(ValueError):
        image_processor.post_process_semantic_segmentation(**inputs, target_sizes=target_sizes + [(1, 4)])


# ------------------------------------------------------------------------------------------ ProcessorTesterMixin
CLASS_NAMES = ["lower newer", "upper older longer string"]


@pytest.fixture
def processor(tiny_processor):
    return DiSaProcessor(DiSaImageProcessor(**IMAGE_PROCESSOR_DICT), tiny_processor.tokenizer)


def test_processor_to_json_string(processor):
    obj = json.loads(processor.to_json_string())
    assert obj["prompt_templates"] == processor.prompt_templates
    assert obj["image_processor"]["size"] == SIZE


def test_save_load_pretrained_default(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = DiSaProcessor.from_pretrained(tmp_path)
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert reloaded.image_processor.to_json_string() == processor.image_processor.to_json_string()
    assert reloaded.prompt_templates == processor.prompt_templates


def test_image_processor_defaults(processor):
    image_input = prepare_image_inputs(batch_size=1)
    input_image_proc = processor.image_processor(image_input, return_tensors="pt")
    input_processor = processor(images=image_input, return_tensors="pt")
    torch.testing.assert_close(input_image_proc["pixel_values"], input_processor["pixel_values"])


def test_image_processor_defaults_preserved_by_image_kwargs(tiny_processor):
    image_processor = DiSaImageProcessor(**IMAGE_PROCESSOR_DICT, do_rescale=True, rescale_factor=-1.0)
    processor = DiSaProcessor(image_processor, tiny_processor.tokenizer)
    inputs = processor(text=CLASS_NAMES[:1], images=prepare_image_inputs(batch_size=1), return_tensors="pt")
    assert inputs["pixel_values"][0][0].mean() <= 0


def test_kwargs_overrides_default_image_processor_kwargs(tiny_processor):
    image_processor = DiSaImageProcessor(**IMAGE_PROCESSOR_DICT, do_rescale=True, rescale_factor=1.0)
    processor = DiSaProcessor(image_processor, tiny_processor.tokenizer)
    inputs = processor(
        text=CLASS_NAMES[:1],
        images=prepare_image_inputs(batch_size=1),
        do_rescale=True,
        rescale_factor=-1.0,
        return_tensors="pt",
    )
    assert inputs["pixel_values"][0][0].mean() <= 0


def test_unstructured_kwargs(processor):
    inputs = processor(
        text=CLASS_NAMES[:1],
        images=prepare_image_inputs(batch_size=1),
        return_tensors="pt",
        do_rescale=True,
        rescale_factor=-1.0,
        padding="max_length",
        max_length=76,
    )
    assert inputs["pixel_values"][0][0].mean() <= 0
    assert inputs["input_ids"].shape[-1] == 76


def test_unstructured_kwargs_batched(processor):
    inputs = processor(
        text=CLASS_NAMES,
        images=prepare_image_inputs(batch_size=2),
        return_tensors="pt",
        do_rescale=True,
        rescale_factor=-1.0,
        padding="longest",
        max_length=76,
    )
    assert inputs["pixel_values"][0][0].mean() <= 0
    assert len(inputs["input_ids"][0]) == len(inputs["input_ids"][1]) and len(inputs["input_ids"][1]) < 76


def test_doubly_passed_kwargs(processor):
    with pytest.raises(ValueError):
        processor(
            text=CLASS_NAMES[:1],
            images=prepare_image_inputs(batch_size=1),
            images_kwargs={"do_rescale": True, "rescale_factor": -1.0},
            do_rescale=True,
            return_tensors="pt",
        )


@pytest.mark.parametrize("from_dict", [False, True])  # test_structured_kwargs_nested(_from_dict)
def test_structured_kwargs_nested(processor, from_dict):
    all_kwargs = {
        "common_kwargs": {"return_tensors": "pt"},
        "images_kwargs": {"do_rescale": True, "rescale_factor": -1.0},
        "text_kwargs": {"padding": "max_length", "max_length": 76},
    }
    if not from_dict:
        all_kwargs = {"return_tensors": "pt", **{k: v for k, v in all_kwargs.items() if k != "common_kwargs"}}
    inputs = processor(text=CLASS_NAMES[:1], images=prepare_image_inputs(batch_size=1), **all_kwargs)
    assert inputs["pixel_values"][0][0].mean() <= 0
    assert inputs["input_ids"].shape[-1] == 76


def test_model_input_names(processor):
    inputs = processor(text=CLASS_NAMES, images=prepare_image_inputs(batch_size=1))
    assert isinstance(inputs, BatchFeature)
    assert set(inputs.keys()) == set(processor.model_input_names)
