"""DiSaImageProcessor / DiSaProcessor: conversions, label handling, post-processing and input errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from modeling_disa import DiSaImageProcessor, DiSaProcessor
from modeling_disa.model.modeling_disa import DiSaSegmentationOutput


@pytest.fixture
def image_processor():
    return DiSaImageProcessor(size={"height": 64, "width": 64})


def expected_pixels(rgb_uint8, size=64):
    resized = np.asarray(Image.fromarray(rgb_uint8).resize((size, size), Image.BILINEAR)).astype(np.float64) / 255.0
    normalised = (resized - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    return torch.from_numpy(normalised.transpose(2, 0, 1)).float()


def test_rgb_image_is_resized_and_clip_normalised(image_processor):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out = image_processor(Image.fromarray(rgb), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 64, 64)
    torch.testing.assert_close(out["pixel_values"][0], expected_pixels(rgb), rtol=1e-4, atol=1e-4)


def test_grayscale_rgba_16bit_and_float_inputs_convert_to_the_same_rgb(image_processor):
    gray = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    reference = image_processor(rgb, return_tensors="pt")["pixel_values"]
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 7, np.uint8)], axis=-1)
    variants = [
        Image.fromarray(gray),
        gray,
        Image.fromarray(rgba),
        rgb.astype(np.uint16) * 257,  # 16-bit: /257 maps back exactly
        Image.fromarray(gray.astype(np.uint16) * 257),
        rgb.astype(np.float32) / 255.0,  # float in [0, 1] is taken as already rescaled
        torch.from_numpy(rgb).permute(2, 0, 1),  # channels-first tensor
    ]
    for variant in variants:
        got = image_processor(variant, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.zeros((32, 32, 2), np.uint8), ValueError, "channels"),
        (np.zeros((32, 32, 5), np.uint8), ValueError, "channels"),
        (np.full((32, 32, 3), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros((8, 40, 3), np.uint8), ValueError, "smaller than one CLIP patch"),
        ("not an image", (TypeError, ValueError), "image"),
    ],
)
def test_bad_images_are_rejected(image_processor, image, error, message):
    with pytest.raises(error, match=message):
        image_processor(image, return_tensors="pt")


def test_segmentation_maps_resize_by_nearest_and_keep_ignore(image_processor):
    label = np.zeros((32, 32), np.int64)
    label[:, 16:] = 3
    label[:8] = 255
    out = image_processor(np.zeros((32, 32, 3), np.uint8), segmentation_maps=label, return_tensors="pt")
    labels = out["labels"]
    assert labels.dtype == torch.int64 and labels.shape == (1, 64, 64)
    assert set(labels.unique().tolist()) == {0, 3, 255}  # nearest: no blended values
    expected = np.asarray(Image.fromarray(label.astype(np.int32)).resize((64, 64), Image.NEAREST))
    np.testing.assert_array_equal(labels[0].numpy(), expected)


def test_sixteen_bit_labels_keep_values_above_255():
    processor = DiSaImageProcessor(size={"height": 32, "width": 32}, ignore_index=65535)
    label = np.full((32, 32), 846, np.uint16)
    label[0] = 65535
    out = processor(np.zeros((32, 32, 3), np.uint8), segmentation_maps=Image.fromarray(label), return_tensors="pt")
    assert set(out["labels"].unique().tolist()) == {846, 65535}


def test_reduce_labels_follows_ade_convention():
    processor = DiSaImageProcessor(size={"height": 16, "width": 16}, do_reduce_labels=True)
    label = np.array([[0, 1, 150, 255]] * 16, np.uint8).repeat(4, axis=1)
    out = processor(np.zeros((16, 16, 3), np.uint8), segmentation_maps=label, return_tensors="pt")
    assert out["labels"][0, 0, ::4].tolist() == [255, 0, 149, 255]


def test_map_size_mismatch_is_an_error(image_processor):
    with pytest.raises(ValueError, match="segmentation map 0 has size"):
        image_processor(np.zeros((32, 32, 3), np.uint8), segmentation_maps=np.zeros((16, 16), np.int64))


def nearest_reference(label_map, height, width):
    """PIL's nearest-neighbour resize of an int32 ("I") image: every id kept, whatever its value."""
    return np.asarray(Image.fromarray(label_map.astype(np.int32)).resize((width, height), Image.NEAREST))


@pytest.mark.parametrize(
    "size",
    [
        {"height": 24, "width": 40},
        {"shortest_edge": 32},
        {"shortest_edge": 32, "longest_edge": 40},
        {"max_height": 30, "max_width": 50},
        24,  # an int: square, `default_to_square`
    ],
)
def test_segmentation_maps_follow_every_size_form_of_the_images(size, tiny_processor):
    """Maps take the images' geometry for every `size` form of the backend, by nearest neighbour, ids above 255 and
    more than 256 distinct ids included (847-class maps with a 16-bit ignore value)."""
    processor = DiSaImageProcessor()
    rng = np.random.default_rng(3)
    label = rng.integers(0, 847, (45, 70))
    label[:5] = 65535
    out = processor(
        rng.integers(0, 256, (45, 70, 3), dtype=np.uint8), segmentation_maps=label, size=size, return_tensors="pt"
    )
    height, width = out["pixel_values"].shape[-2:]
    assert out["labels"].shape == (1, height, width) and out["labels"].dtype == torch.int64
    np.testing.assert_array_equal(out["labels"][0].numpy(), nearest_reference(label, height, width))
    # the processor routes the same options to the image processor
    routed = DiSaProcessor(processor, tiny_processor.tokenizer)(
        images=np.zeros((45, 70, 3), np.uint8), segmentation_maps=label, size=size, return_tensors="pt"
    )
    assert torch.equal(routed["labels"], out["labels"])


def test_crop_and_pad_reach_the_maps_with_ignore_index():
    """`do_center_crop` / `do_pad` move the maps with the images; pixels outside the map get `ignore_index`."""
    processor = DiSaImageProcessor(ignore_index=300)
    label = np.random.default_rng(4).integers(0, 290, (32, 48))
    options = {
        "size": {"height": 20, "width": 30},
        "do_center_crop": True,
        "crop_size": {"height": 24, "width": 26},  # taller than the resized map: the crop pads 2 rows each side
        "do_pad": True,
        "pad_size": {"height": 28, "width": 30},
    }
    out = processor(np.zeros((32, 48, 3), np.uint8), segmentation_maps=label, return_tensors="pt", **options)
    expected = np.full((28, 30), 300)
    expected[2:22, :26] = nearest_reference(label, 20, 30)[:, 2:28]
    np.testing.assert_array_equal(out["labels"][0].numpy(), expected)
    assert out["pixel_values"].shape == (1, 3, 28, 30)


def test_do_convert_rgb_composites_transparency_as_transformers_does(image_processor):
    from transformers.image_transforms import convert_to_rgb

    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    composited = convert_to_rgb(Image.fromarray(rgba), return_numpy=True)  # transformers' own conversion
    reference = image_processor(composited, return_tensors="pt")["pixel_values"]
    dropped = image_processor(rgba[..., :3], return_tensors="pt")["pixel_values"]
    for variant in (Image.fromarray(rgba), rgba, torch.from_numpy(rgba).permute(2, 0, 1)):
        torch.testing.assert_close(
            image_processor(variant, do_convert_rgb=True, return_tensors="pt")["pixel_values"], reference
        )
        torch.testing.assert_close(
            image_processor(variant, return_tensors="pt")["pixel_values"], dropped
        )  # default: alpha dropped
    assert not torch.equal(reference, dropped)
    # as a constructor setting, and for a palette image with a transparent entry
    palette = Image.fromarray(rgb_palette := rng.integers(0, 4, (32, 32), dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    palette.info["transparency"] = 3
    converting = DiSaImageProcessor(size={"height": 64, "width": 64}, do_convert_rgb=True)
    expected = image_processor(convert_to_rgb(palette, return_numpy=True), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(converting(palette, return_tensors="pt")["pixel_values"], expected)
    assert (rgb_palette == 3).any()


def test_input_data_format_names_the_channel_axis():
    """An array whose both end axes could be channels: the guess takes the last; `input_data_format` decides."""
    processor = DiSaImageProcessor(size={"height": 8, "width": 8}, patch_size=1)
    image = np.random.default_rng(6).integers(0, 256, (3, 20, 4), dtype=np.uint8)
    first = processor(image, input_data_format="channels_first", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(first, processor(np.moveaxis(image, 0, -1), return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(
        processor(image, input_data_format="channels_last", return_tensors="pt")["pixel_values"],
        processor(image, return_tensors="pt")["pixel_values"],
    )
    assert not torch.equal(first, processor(image, return_tensors="pt")["pixel_values"])
    with pytest.raises(ValueError, match="PIL image"):
        processor(Image.fromarray(np.moveaxis(image, 0, -1)[..., :3]), input_data_format="channels_first")
    with pytest.raises(ValueError, match="input_data_format"):
        processor(image, input_data_format="none")
    with pytest.raises(ValueError, match="channels"):
        processor(np.zeros((20, 20, 20), np.uint8), input_data_format="channels_last")


def test_output_options_are_honoured_and_backend_only_options_refused(image_processor):
    image = np.random.default_rng(7).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    reference = image_processor(image, return_tensors="pt")["pixel_values"]
    last = image_processor(image, return_tensors="pt", data_format="channels_last")["pixel_values"]
    torch.testing.assert_close(last, reference.permute(0, 2, 3, 1))
    on_device = image_processor(
        image, segmentation_maps=np.zeros((32, 40), np.int64), return_tensors="pt", device="cpu"
    )
    assert on_device["pixel_values"].device.type == "cpu" and on_device["labels"].device.type == "cpu"
    with pytest.raises(ValueError, match="return_tensors='pt'"):
        image_processor(image, device="cpu")
    for name, value in (("disable_grouping", True), ("image_seq_length", 4)):
        with pytest.raises(ValueError, match=name):
            image_processor(image, **{name: value})


def test_post_process_sizes_and_argmax(image_processor):
    logits = torch.randn(2, 4, 8, 8)
    results = image_processor.post_process_semantic_segmentation(
        DiSaSegmentationOutput(logits=logits), target_sizes=[(30, 40), (17, 9)]
    )
    assert [r.shape for r in results] == [(30, 40), (17, 9)]
    native = image_processor.post_process_semantic_segmentation(DiSaSegmentationOutput(logits=logits))
    assert torch.equal(native[1], logits[1].argmax(0))  # the sigmoid is monotonic: same argmax at native size


def test_post_process_orders_match_direct_computations(image_processor):
    """Default: CAT-Seg's order (sigmoid at the logits' resolution, then resize); option: resize the logits."""
    torch.manual_seed(0)
    logits = 4 * torch.randn(2, 5, 8, 8)
    sizes = [(61, 47), (30, 90)]
    default = image_processor.post_process_semantic_segmentation(DiSaSegmentationOutput(logits=logits), sizes)
    resized_logits = image_processor.post_process_semantic_segmentation(
        DiSaSegmentationOutput(logits=logits), sizes, upsample="logits"
    )
    differ = 0
    for index, size in enumerate(sizes):
        probabilities = torch.nn.functional.interpolate(
            logits[index : index + 1].sigmoid(), size=size, mode="bilinear", align_corners=False
        )[0]
        up = torch.nn.functional.interpolate(
            logits[index : index + 1], size=size, mode="bilinear", align_corners=False
        )[0]
        assert torch.equal(default[index], probabilities.argmax(0))
        assert torch.equal(resized_logits[index], up.argmax(0))
        differ += int((probabilities.argmax(0) != up.argmax(0)).sum())
    assert differ > 0  # the two orders are distinguishable on these logits
    with pytest.raises(ValueError, match="upsample"):
        image_processor.post_process_semantic_segmentation(DiSaSegmentationOutput(logits=logits), upsample="nearest")


def test_post_process_resizes_a_bounded_block_of_classes(image_processor, request):
    """600 classes to 256 x 256 (39M values at once before): the label maps of the full-tensor argmax in both
    orders, ties included, with no resized block that grows with the number of classes."""
    from modeling_disa.model.inference import UPSAMPLE_BLOCK_ELEMENTS

    logits = 4 * torch.randn(1, 600, 8, 8, generator=torch.Generator().manual_seed(2))
    logits[0, 10, :2] = 20.0  # class 10 leads in the top rows
    logits[0, 300] = logits[0, 10]  # tied with class 10 everywhere: class 10 keeps the pixels
    outputs = DiSaSegmentationOutput(logits=logits)
    resize = lambda x: torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)  # noqa: E731
    expected = {"probabilities": resize(logits.sigmoid())[0].argmax(0), "logits": resize(logits)[0].argmax(0)}
    assert (expected["logits"] == 10).any()
    sizes = request.getfixturevalue("interpolate_sizes")  # recording from here on, after the references
    for upsample, reference in expected.items():
        got = image_processor.post_process_semantic_segmentation(outputs, [(256, 256)], upsample=upsample)[0]
        assert torch.equal(got, reference), upsample
    assert max(sizes) <= UPSAMPLE_BLOCK_ELEMENTS


def test_post_process_returns_segmentation_scores(image_processor, tiny_processor):
    from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8)
    outputs = DiSaSegmentationOutput(logits=logits)
    results = image_processor.post_process_semantic_segmentation(
        outputs, [(20, 24), (8, 8)], return_segmentation_scores=True
    )
    plain = image_processor.post_process_semantic_segmentation(outputs, [(20, 24), (8, 8)])
    for index, (result, size) in enumerate(zip(results, [(20, 24), (8, 8)])):
        assert isinstance(result, SemanticSegmentationPostProcessorOutput)
        expected = torch.nn.functional.interpolate(
            logits[index : index + 1].sigmoid(), size=size, mode="bilinear", align_corners=False
        )[0]
        torch.testing.assert_close(result.segmentation_scores, expected)
        assert result.segmentation_scores.shape == (3, *size)
        assert torch.equal(result.segmentation, plain[index])
    # the processor forwards the option, as transformers' processors do
    via_processor = tiny_processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True)
    torch.testing.assert_close(via_processor[0].segmentation_scores, logits[0].sigmoid())


def test_float_images_follow_one_rule_whatever_the_container(image_processor):
    """PIL "F" images and float arrays: values in [0, 1] are rescaled (x255), others taken as 0-255."""
    gray = np.random.default_rng(2).integers(0, 256, (32, 32)).astype(np.uint8)
    reference = image_processor(gray, return_tensors="pt")["pixel_values"]
    unit = gray.astype(np.float32) / 255.0
    for variant in (
        Image.fromarray(unit, mode="F"),
        unit,
        torch.from_numpy(unit),
        Image.fromarray(gray.astype(np.float32), mode="F"),
        gray.astype(np.float64),
    ):
        got = image_processor(variant, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_processor_routes_keyword_arguments_like_transformers_processors(tiny_processor):
    names = ["cat", "building", "sky"]
    prompts = [f"A photo of a {n} in the scene" for n in names]
    tokenizer = tiny_processor.tokenizer
    # default: pad to the longest prompt
    out = tiny_processor(text=names)
    assert torch.equal(out["input_ids"], tokenizer(prompts, padding="longest", return_tensors="pt")["input_ids"])
    # flat tokenizer kwargs
    out = tiny_processor(text=names, padding="max_length", max_length=77)
    expected = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    assert out["input_ids"].shape == (3, 77) and torch.equal(out["input_ids"], expected["input_ids"])
    # per-modality dictionaries and common kwargs
    image = np.zeros((40, 50, 3), np.uint8)
    out = tiny_processor(
        images=image,
        text=names,
        text_kwargs={"padding": "max_length", "max_length": 60},
        images_kwargs={"size": {"height": 32, "width": 48}},
    )
    assert out["input_ids"].shape == (3, 60) and out["pixel_values"].shape == (1, 3, 32, 48)
    out = tiny_processor(images=image, text=names, common_kwargs={"return_tensors": "np"})
    assert isinstance(out["input_ids"], np.ndarray) and isinstance(out["pixel_values"], np.ndarray)
    with pytest.raises(ValueError, match="passed two times"):
        tiny_processor(text=names, padding="longest", text_kwargs={"padding": "max_length"})


def test_processor_builds_prompts_with_first_synonym(tiny_processor):
    out = tiny_processor(text=["building, edifice", "cat"], return_tensors="pt")
    expected = tiny_processor.tokenizer(
        ["A photo of a building in the scene", "A photo of a cat in the scene"], padding="longest", return_tensors="pt"
    )
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert torch.equal(out["attention_mask"], expected["attention_mask"])


def catseg_prompt_name(name):
    """CAT-Seg's rule, written out from its `get_text_embeds`: the text before the first ", ", nothing stripped."""
    return name.split(", ")[0]


@pytest.mark.parametrize(
    "name", ["a,b", "building, edifice", "a , b", "a,  b", "person, individual, someone", "bed ", "tv,monitor, screen"]
)
def test_synonyms_follow_catseg_rule(tiny_processor, name):
    from modeling_disa.model.configuration_disa import prompt_name

    assert prompt_name(name) == catseg_prompt_name(name)
    out = tiny_processor(text=[name])
    expected = tiny_processor.tokenizer([f"A photo of a {catseg_prompt_name(name)} in the scene"], return_tensors="pt")
    assert torch.equal(out["input_ids"], expected["input_ids"])


def test_shipped_class_lists_are_prompted_as_catseg_prompts_them(tiny_processor):
    """Every shipped definition, verbatim names through the processor (as run_evaluation.py passes them), against
    CAT-Seg's rule applied to the JSON's names; and token for token the same as the previous rule (split on "," and
    strip): the rules differ on ADE-150's "bed " only, and CLIP's tokenizer reads white space runs as one space."""
    import json

    from modeling_disa.evaluation.dataset_definitions import ALL_DATASETS, definitions_dir

    template = tiny_processor.prompt_templates[0]
    for name in ALL_DATASETS:
        names = json.loads((definitions_dir() / f"{name}.json").read_text())["class_names"]
        got = tiny_processor(text=names, allow_shared_prompts=True)["input_ids"]
        official = tiny_processor.tokenizer([template.format(catseg_prompt_name(n)) for n in names], padding=True)
        assert got.tolist() == official["input_ids"], name
        previous = [template.format(n.split(",")[0].strip()) for n in names]
        assert got.tolist() == tiny_processor.tokenizer(previous, padding=True)["input_ids"], name


@pytest.mark.parametrize(
    "text, error, message",
    [
        ([], ValueError, "empty"),
        (["cat", "cat"], ValueError, "duplicate"),
        (["cat", 3], TypeError, "strings"),
        ("cat", TypeError, "list"),
        # two classes prompted alike would get identical logits; an empty first synonym prompts nothing
        (
            ["building, edifice", "cat", "building, house"],
            ValueError,
            r"\['building, edifice', 'building, house'\] are all prompted as 'building'",
        ),
        (["dog", ", cat"], ValueError, r"\[', cat'\] have an empty first synonym"),
    ],
)
def test_processor_rejects_bad_vocabularies(tiny_processor, text, error, message):
    with pytest.raises(error, match=message):
        tiny_processor(text=text)


def test_dataset_protocol_may_share_prompts(tiny_processor):
    from modeling_disa.evaluation.dataset_definitions import load_evaluation_dataset

    names = load_evaluation_dataset("ade847").prompt_names  # CAT-Seg's list: three classes are prompted as "bag"
    with pytest.raises(ValueError, match="duplicate class names"):
        tiny_processor(text=names)
    out = tiny_processor(text=names, allow_shared_prompts=True)
    assert out["input_ids"].shape[0] == 847
    with pytest.raises(ValueError, match="empty first synonym"):
        tiny_processor(text=["cat", ", dog"], allow_shared_prompts=True)


def test_call_arguments_default_none_and_allow_shared_prompts_is_a_routed_text_option(tiny_processor):
    import inspect

    explicit = [
        p
        for name, p in inspect.signature(DiSaProcessor.__call__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    assert [p.name for p in explicit if p.default is not None] == []  # transformers' processor convention
    names = ["bag", "bag, handbag"]  # both prompted as "bag"
    with pytest.raises(ValueError, match="are all prompted as 'bag'"):
        tiny_processor(text=names)
    expected = tiny_processor.tokenizer(["A photo of a bag in the scene"] * 2, return_tensors="pt")["input_ids"]
    for kwargs in ({"allow_shared_prompts": True}, {"text_kwargs": {"allow_shared_prompts": True}}):
        assert torch.equal(tiny_processor(text=names, **kwargs)["input_ids"], expected)


def test_folder_without_tokenizer_files_names_them(tmp_path, tiny_processor):
    from transformers import AutoProcessor

    tiny_processor.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    for loader in (DiSaProcessor, AutoProcessor):
        with pytest.raises(OSError, match="has no tokenizer.json") as info:
            loader.from_pretrained(tmp_path)
        assert "sentencepiece" not in str(info.value)


def test_processor_output_feeds_the_model(tiny_model, tiny_processor):
    images = [Image.new("RGB", (90, 60), (10, 200, 30)), Image.new("L", (50, 50), 128)]
    maps = [np.zeros((60, 90), np.uint8), np.ones((50, 50), np.uint8)]
    inputs = tiny_processor(images=images, text=["cat", "grass"], segmentation_maps=maps, return_tensors="pt")
    out = tiny_model(**inputs)
    assert out.logits.shape == (2, 2, 32, 32) and torch.isfinite(out.loss)
    masks = tiny_processor.post_process_semantic_segmentation(out, target_sizes=[(60, 90), (50, 50)])
    assert [m.shape for m in masks] == [(60, 90), (50, 50)]


def test_processor_round_trip(tmp_path, tiny_processor):
    tiny_processor.save_pretrained(tmp_path)
    again = DiSaProcessor.from_pretrained(tmp_path)
    assert again.prompt_templates == tiny_processor.prompt_templates
    assert again.image_processor.size == tiny_processor.image_processor.size
    assert again(text=["cat"])["input_ids"].tolist() == tiny_processor(text=["cat"])["input_ids"].tolist()
