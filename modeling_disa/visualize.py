"""Visualisation of DiSa predictions: a colour overlay with a legend of the labels present, and (for SDM models) a
saliency / foreground-background figure.

Python:

    from modeling_disa.visualize import overlay_segmentation, render_saliency, segmentation_from_pipeline
    overlay_segmentation(image, segmentation, labels).save("overlay.png")       # segmentation: (H, W) class ids
    render_saliency(image, outputs.saliency[0], outputs.foreground_mask[0], labels).save("saliency.png")

CLI (a saved model folder or Hub id, one image, the class names):

    python -m modeling_disa.visualize --model out/disa --image street.jpg --labels car road sky \
        --output overlay.png [--saliency_output saliency.png]

Layout of `render_saliency`: one row per class, `TITLE_HEIGHT` pixels of caption, then two image-sized panels side
by side: the per-class min-max normalised saliency as a "hot" heat map blended over the image (`alpha`), and the
foreground/background split (foreground tinted green, background darkened). Grid cells are shown as blocks
(nearest-neighbour upsampling), so what is drawn is exactly the model's grid.
"""

from __future__ import annotations

import argparse
import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

TITLE_HEIGHT = 18
LEGEND_SWATCH = 14
LEGEND_ROW = 20
LEGEND_PAD = 6
FOREGROUND_TINT = (0, 200, 0)
FOREGROUND_TINT_WEIGHT = 0.3
BACKGROUND_DIM = 0.35


def palette(num_colors: int) -> np.ndarray:
    """`(num_colors, 3)` uint8 distinct saturated colours (golden-ratio hues; deterministic)."""
    colors = []
    for i in range(num_colors):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 == 0 else 0.75
        colors.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, value)])
    return np.asarray(colors, dtype=np.uint8).reshape(-1, 3)


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> "hot" RGB uint8 (black -> red -> yellow -> white)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(np.concatenate([3 * v, 3 * v - 1, 3 * v - 2], axis=-1), 0.0, 1.0)
    return np.rint(rgb * 255).astype(np.uint8)


def _rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}.")
    if np.issubdtype(array.dtype, np.floating) and array.max() <= 1.0:
        array = array * 255.0
    return np.clip(np.rint(array[..., :3]), 0, 255).astype(np.uint8)


def _font():
    return ImageFont.load_default()


def _resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) array -> (H, W) by nearest neighbour (PIL's pixel-centre rule)."""
    height, width = size
    if array.shape == (height, width):
        return array
    if np.issubdtype(array.dtype, np.floating):
        source = Image.fromarray(array.astype(np.float32), mode="F")
    else:
        source = Image.fromarray(array.astype(np.int32))
    return np.asarray(source.resize((width, height), Image.NEAREST)).astype(array.dtype)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def overlay_segmentation(image, segmentation, labels, alpha: float = 0.5, legend: bool = True) -> Image.Image:
    """
    Blend a class-colour map over the image and add a legend of the labels present.

    Args:
        image: PIL image or (H, W, 3) array.
        segmentation: (H', W') class ids into `labels` (resized to the image by nearest neighbour if needed).
        labels: class names, index = class id.
        alpha: weight of the class colour (pixel = (1 - alpha) * image + alpha * colour, rounded).
        legend: add a white legend panel to the right listing each class present once (in class-id order).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    rgb = _rgb_array(image)
    seg = _to_numpy(segmentation)
    if seg.ndim != 2:
        raise ValueError(f"segmentation must be a 2-D class-id map, got shape {seg.shape}.")
    seg = _resize_nearest(seg.astype(np.int64), rgb.shape[:2])
    labels = list(labels)
    if seg.size and (seg.min() < 0 or seg.max() >= len(labels)):
        raise ValueError(f"segmentation holds class ids outside [0, {len(labels)}) (got {seg.min()}..{seg.max()}).")
    colors = palette(len(labels))
    blended = (1 - alpha) * rgb.astype(np.float64) + alpha * colors[seg].astype(np.float64)
    out = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    if not legend:
        return out
    present = sorted(int(c) for c in np.unique(seg))
    font = _font()
    measure = ImageDraw.Draw(out)
    text_width = max((measure.textlength(labels[c], font=font) for c in present), default=0)
    legend_width = int(LEGEND_PAD * 3 + LEGEND_SWATCH + text_width)
    legend_height = LEGEND_PAD * 2 + LEGEND_ROW * len(present)
    canvas = Image.new("RGB", (out.width + legend_width, max(out.height, legend_height)), "white")
    canvas.paste(out, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, class_id in enumerate(present):
        top = LEGEND_PAD + row * LEGEND_ROW
        left = out.width + LEGEND_PAD
        draw.rectangle(
            [left, top, left + LEGEND_SWATCH - 1, top + LEGEND_SWATCH - 1],
            fill=tuple(int(c) for c in colors[class_id]),
        )
        draw.text((left + LEGEND_SWATCH + LEGEND_PAD, top), labels[class_id], fill="black", font=font)
    return canvas


def segmentation_from_pipeline(results) -> tuple[np.ndarray, list[str]]:
    """A pipeline result (list of `{"label", "mask"}`) -> ((H, W) class ids, labels)."""
    if not results:
        raise ValueError("empty pipeline result.")
    labels = [entry["label"] for entry in results]
    masks = [np.asarray(entry["mask"]) > 127 for entry in results]
    segmentation = np.zeros(masks[0].shape, dtype=np.int64)
    for index, mask in enumerate(masks):
        segmentation[mask] = index
    return segmentation, labels


def render_saliency(
    image,
    saliency,
    foreground_mask=None,
    labels=None,
    classes=None,
    alpha: float = 0.6,
    max_classes: int = 8,
) -> Image.Image:
    """
    Saliency / foreground-background figure for one image (see the module docstring for the layout).

    Args:
        image: PIL image or (H, W, 3) array (panels are drawn at its size).
        saliency: `(T, grid, grid)` float (one image's `outputs.saliency[i]`).
        foreground_mask: `(T, grid, grid)` bool (`outputs.foreground_mask[i]`); without it only the heat maps.
        labels: T class names (default `class 0..T-1`).
        classes: class indices to draw, in order (default: the `max_classes` with the highest saliency peak).
    """
    rgb = _rgb_array(image)
    height, width = rgb.shape[:2]
    sal = _to_numpy(saliency).astype(np.float64)
    if sal.ndim != 3:
        raise ValueError(f"saliency must be (num_classes, grid, grid) for one image, got shape {sal.shape}.")
    if not np.isfinite(sal).all():
        raise ValueError("saliency contains NaN or inf values.")
    fg = None
    if foreground_mask is not None:
        fg = _to_numpy(foreground_mask)
        if fg.shape != sal.shape:
            raise ValueError(f"foreground_mask shape {fg.shape} differs from saliency shape {sal.shape}.")
        fg = fg.astype(bool)
    num_classes = sal.shape[0]
    labels = list(labels) if labels is not None else [f"class {i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ValueError(f"got {len(labels)} labels for {num_classes} saliency maps.")
    if classes is None:
        order = np.argsort(-sal.reshape(num_classes, -1).max(axis=1), kind="stable")
        classes = [int(c) for c in order[:max_classes]]
    classes = list(classes)
    if not classes or any(not 0 <= c < num_classes for c in classes):
        raise ValueError(f"classes must be indices in [0, {num_classes}), got {classes}.")

    panels = 2 if fg is not None else 1
    canvas = Image.new("RGB", (width * panels, (TITLE_HEIGHT + height) * len(classes)), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    base = rgb.astype(np.float64)
    for row, class_id in enumerate(classes):
        top = row * (TITLE_HEIGHT + height)
        s = sal[class_id]
        span = s.max() - s.min()
        normalised = (s - s.min()) / span if span > 0 else np.zeros_like(s)
        heat = heat_colormap(_resize_nearest(normalised.astype(np.float32), (height, width)))
        panel = (1 - alpha) * base + alpha * heat.astype(np.float64)
        canvas.paste(Image.fromarray(np.clip(np.rint(panel), 0, 255).astype(np.uint8)), (0, top + TITLE_HEIGHT))
        caption = f"{labels[class_id]}  saliency max {s.max():.3g}"
        if fg is not None:
            mask = _resize_nearest(fg[class_id].astype(np.uint8), (height, width)).astype(bool)[..., None]
            tinted = (1 - FOREGROUND_TINT_WEIGHT) * base + FOREGROUND_TINT_WEIGHT * np.asarray(FOREGROUND_TINT, float)
            split = np.where(mask, tinted, BACKGROUND_DIM * base)
            split = Image.fromarray(np.clip(np.rint(split), 0, 255).astype(np.uint8))
            canvas.paste(split, (width, top + TITLE_HEIGHT))
            caption += f"  foreground {int(fg[class_id].sum())}/{fg[class_id].size} tokens"
        draw.text((2, top + 2), caption, fill="black", font=font)
    return canvas


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Overlay (and SDM saliency) PNGs for one image.")
    parser.add_argument("--model", required=True, help="saved DiSa folder or Hub repo id")
    parser.add_argument("--image", required=True, help="image path")
    parser.add_argument("--labels", nargs="+", default=None, help="class names (default: the model's id2label)")
    parser.add_argument("--output", required=True, help="overlay PNG path")
    parser.add_argument("--saliency_output", default=None, help="saliency / foreground PNG path (SDM models)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)

    from .model.modeling_disa import DiSaForOpenVocabSegmentation
    from .model.processing_disa import DiSaProcessor

    model = DiSaForOpenVocabSegmentation.from_pretrained(args.model).eval()
    processor = DiSaProcessor.from_pretrained(args.model)
    if args.saliency_output and not getattr(model.config, "use_sdm", False):
        print("error: --saliency_output needs a model with the saliency module (config.use_sdm=True).")
        return 1
    image = Image.open(args.image).convert("RGB")
    if args.labels:
        inputs = processor(images=image, text=args.labels)
        labels = list(args.labels)
    else:
        inputs = processor(images=image)
        labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    with torch.no_grad():
        outputs = model(**inputs, output_saliency=bool(args.saliency_output))
    segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]
    overlay_segmentation(image, segmentation, labels, alpha=args.alpha).save(args.output)
    print(f"wrote {args.output}")
    if args.saliency_output:
        if outputs.saliency is None:
            print("error: the model returned no saliency maps.")
            return 1
        mask = outputs.foreground_mask[0] if outputs.foreground_mask is not None else None
        render_saliency(image, outputs.saliency[0], mask, labels).save(args.saliency_output)
        print(f"wrote {args.saliency_output}")
    return 0


__all__ = ["heat_colormap", "overlay_segmentation", "palette", "render_saliency", "segmentation_from_pipeline"]

if __name__ == "__main__":
    raise SystemExit(main())
