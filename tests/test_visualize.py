"""Visualisation: overlay + legend, saliency / foreground-background figure (synthetic SDM-shaped tensors), CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_disa.visualize import (
    BACKGROUND_DIM,
    FOREGROUND_TINT,
    FOREGROUND_TINT_WEIGHT,
    LEGEND_PAD,
    LEGEND_ROW,
    TITLE_HEIGHT,
    main,
    overlay_segmentation,
    palette,
    render_saliency,
    segmentation_from_pipeline,
)

GRAY = 100


def gray_image(height=40, width=60):
    return Image.fromarray(np.full((height, width, 3), GRAY, dtype=np.uint8))


def colours_in(region: np.ndarray) -> set:
    return {tuple(int(v) for v in px) for px in region.reshape(-1, 3)}


def test_palette_is_distinct_and_saturated():
    colours = palette(150)
    assert len({tuple(c) for c in colours}) == 150
    assert all(int(c.max()) - int(c.min()) > 40 for c in colours)  # no grays: legend swatches stand out from text


def test_overlay_blends_colours_and_lists_only_present_labels():
    image = gray_image()
    segmentation = np.zeros((40, 60), dtype=np.int64)
    segmentation[:, 30:] = 2
    labels = ["cat", "dog", "sky"]
    out = np.asarray(overlay_segmentation(image, torch.from_numpy(segmentation), labels, alpha=0.5))
    colours = palette(3).astype(float)
    assert out.shape[0] == max(40, 2 * LEGEND_PAD + 2 * LEGEND_ROW) and out.shape[1] > 60  # 2 legend rows
    assert colours_in(out[40:, :60]) == {(255, 255, 255)}
    np.testing.assert_array_equal(out[5, 5], np.rint(0.5 * GRAY + 0.5 * colours[0]).astype(np.uint8))
    np.testing.assert_array_equal(out[5, 45], np.rint(0.5 * GRAY + 0.5 * colours[2]).astype(np.uint8))
    legend = colours_in(out[:, 60:])
    assert tuple(palette(3)[0]) in legend and tuple(palette(3)[2]) in legend
    assert tuple(palette(3)[1]) not in legend  # "dog" is absent

    plain = np.asarray(overlay_segmentation(image, segmentation, labels, alpha=0.0, legend=False))
    np.testing.assert_array_equal(plain, np.asarray(image))


def test_overlay_resizes_a_coarse_map_and_checks_ids():
    image = gray_image(32, 32)
    coarse = np.array([[0, 1], [1, 0]])
    out = np.asarray(overlay_segmentation(image, coarse, ["a", "b"], alpha=1.0, legend=False))
    np.testing.assert_array_equal(out[0, 0], palette(2)[0])
    np.testing.assert_array_equal(out[0, 31], palette(2)[1])
    np.testing.assert_array_equal(out[31, 0], palette(2)[1])
    with pytest.raises(ValueError, match="outside"):
        overlay_segmentation(image, np.array([[0, 5]]), ["a", "b"])
    with pytest.raises(ValueError, match="alpha"):
        overlay_segmentation(image, coarse, ["a", "b"], alpha=2)


def test_segmentation_from_pipeline_output():
    left = Image.fromarray(np.tile(np.array([255, 0], dtype=np.uint8).repeat(4), (8, 1)))
    right = Image.fromarray(255 - np.asarray(left))
    segmentation, labels = segmentation_from_pipeline([{"label": "a", "mask": left}, {"label": "b", "mask": right}])
    assert labels == ["a", "b"]
    assert (segmentation[:, :4] == 0).all() and (segmentation[:, 4:] == 1).all()


def synthetic_sdm_outputs(batch=2, classes=3, grid=4):
    """Shaped like `outputs.saliency` (B, T, g, g) float and `outputs.foreground_mask` (B, T, g, g) bool."""
    saliency = torch.zeros(batch, classes, grid, grid)
    saliency[0, 0, 1, 2] = 5.0  # class 0: one hot cell
    saliency[0, 1] = torch.arange(grid * grid, dtype=torch.float).view(grid, grid) / 10  # class 1: a ramp
    foreground = torch.zeros(batch, classes, grid, grid, dtype=torch.bool)
    foreground[0, 0, 1, 2] = True
    foreground[0, 1, 3, :] = True
    return saliency, foreground


def test_saliency_figure_layout_and_pixels():
    image = gray_image(40, 40)  # 4x4 grid -> 10x10 pixel cells
    saliency, foreground = synthetic_sdm_outputs()
    figure = np.asarray(
        render_saliency(image, saliency[0], foreground[0], ["cat", "sky", "road"], classes=[0, 1], alpha=0.6)
    )
    assert figure.shape == (2 * (TITLE_HEIGHT + 40), 80, 3)
    row0 = figure[TITLE_HEIGHT : TITLE_HEIGHT + 40]
    hot = np.rint(0.4 * GRAY + 0.6 * 255).astype(np.uint8)  # normalised 1 -> white in the hot map
    cold = np.rint(0.4 * GRAY).astype(np.uint8)  # normalised 0 -> black
    np.testing.assert_array_equal(row0[15, 25], [hot] * 3)  # cell (1, 2) = rows 10-19, cols 20-29
    np.testing.assert_array_equal(row0[35, 5], [cold] * 3)
    # foreground/background panel
    tint = np.rint((1 - FOREGROUND_TINT_WEIGHT) * GRAY + FOREGROUND_TINT_WEIGHT * np.array(FOREGROUND_TINT))
    np.testing.assert_array_equal(row0[15, 40 + 25], tint.astype(np.uint8))
    np.testing.assert_array_equal(row0[35, 40 + 5], [np.rint(BACKGROUND_DIM * GRAY)] * 3)
    # class 1: the ramp peaks in the last cell; its foreground is the bottom row
    row1 = figure[2 * TITLE_HEIGHT + 40 :]
    np.testing.assert_array_equal(row1[35, 35], [hot] * 3)
    np.testing.assert_array_equal(row1[5, 5], [cold] * 3)
    np.testing.assert_array_equal(row1[35, 40 + 5], tint.astype(np.uint8))
    np.testing.assert_array_equal(row1[5, 40 + 5], [np.rint(BACKGROUND_DIM * GRAY)] * 3)


def test_saliency_default_order_and_bad_shapes():
    image = gray_image(40, 40)
    saliency, foreground = synthetic_sdm_outputs()
    only_heat = render_saliency(image, saliency[0], None, max_classes=2)
    assert only_heat.size == (40, 2 * (TITLE_HEIGHT + 40))  # the 2 classes with the highest peaks, heat maps only
    flat = render_saliency(image, saliency[1], foreground[1])  # all-zero saliency renders (no division by zero)
    assert flat.size == (80, 3 * (TITLE_HEIGHT + 40))
    with pytest.raises(ValueError, match="one image"):
        render_saliency(image, saliency, foreground)
    with pytest.raises(ValueError, match="differs"):
        render_saliency(image, saliency[0], foreground[0, :2])
    with pytest.raises(ValueError, match="labels"):
        render_saliency(image, saliency[0], foreground[0], ["a"])
    with pytest.raises(ValueError, match="NaN"):
        render_saliency(image, torch.full((1, 4, 4), float("nan")))


def test_cli_writes_an_overlay(tiny_model, tiny_processor, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    image = Image.fromarray((np.random.RandomState(0).rand(50, 70, 3) * 255).astype(np.uint8))
    image.save(tmp_path / "img.png")
    assert (
        main(
            [
                "--model",
                str(tmp_path / "model"),
                "--image",
                str(tmp_path / "img.png"),
                "--labels",
                "cat",
                "sky",
                "--output",
                str(tmp_path / "overlay.png"),
            ]
        )
        == 0
    )
    overlay = Image.open(tmp_path / "overlay.png")
    assert overlay.height >= 50 and overlay.width > 70
    inputs = tiny_processor(images=image, text=["cat", "sky"])
    with torch.no_grad():
        logits = tiny_model(**inputs).logits
    expected = tiny_processor.post_process_semantic_segmentation(
        type("O", (), {"logits": logits})(), target_sizes=[(50, 70)]
    )[0].numpy()
    reference = np.asarray(overlay_segmentation(image, expected, ["cat", "sky"]))
    np.testing.assert_array_equal(np.asarray(overlay), reference)
    # no SDM in this model: asking for saliency is a clear error
    assert (
        main(
            [
                "--model",
                str(tmp_path / "model"),
                "--image",
                str(tmp_path / "img.png"),
                "--output",
                str(tmp_path / "o.png"),
                "--saliency_output",
                str(tmp_path / "s.png"),
            ]
        )
        == 1
    )
    assert "use_sdm=True" in capsys.readouterr().out
