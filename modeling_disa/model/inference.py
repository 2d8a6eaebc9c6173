"""CAT-Seg evaluation-time inference: sliding window plus a global view, or whole image.

Works with any callable ``model(pixel_values=(N, 3, h, w), text_embeds=(T, C))`` returning an object with
``.logits`` of shape ``(N, T, h', w')`` (DiSa's model, or a stub in tests). The model prunes more than
``class_cap`` classes per view itself (pruned classes get logit -100, i.e. probability ~0), so the class list
is passed through unchanged.

Sliding-window protocol (CAT-Seg's evaluation: its `test` mapper and `inference_sliding_window`), per image:

1. (optional, ``short_side``) resize so the short side is 640, as detectron2's test mapper does
   (antialiased bilinear, close to PIL's);
2. warp to ``warp_size`` x ``warp_size`` (640x640, bilinear, aspect ratio not kept);
3. crops of ``window_size`` (384) with ``stride`` (256): 2x2 = 4 crops; plus a global view = the warped
   image resized to 384x384; all views of all images of the batch go through the model in batches of
   ``batch_size`` views;
4. logits are bilinearly upsampled to the view size and passed through a sigmoid (CAT-Seg's sliding-window order;
   ``upsample="probabilities"`` applies the sigmoid first);
5. crop probabilities are folded back onto the 640x640 canvas and divided by the overlap count; the global
   view is upsampled to 640; final = (local + global) / 2;
6. bilinear resize to the original image size, argmax over classes.

Whole-image mode resizes the image to ``window_size`` x ``window_size``, runs one view, applies the sigmoid at the
logits' resolution and upsamples the probabilities to the image size (CAT-Seg's whole-image order;
``upsample="logits"`` resizes the logits first).

Text embeddings: pass ``text_embeds`` (``model.get_text_embeddings(...)``, computed once per vocabulary). Given
``input_ids`` instead (with the processor's ``attention_mask`` and ``prompt_templates``, which the model checks
against its config), a model with ``get_text_embeddings`` encodes them once per call, not once per chunk of views.

Accumulation is always in float32; ``autocast_dtype=torch.bfloat16`` runs the model under autocast.
Standalone: torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

SizeLike = int | tuple[int, int]

# CAT-Seg's sliding-window protocol for 384-pixel views (catseg: TEST.SLIDING_WINDOW, out_res 640, overlap 0.333).
CATSEG_WARP_SIZE = 640
CATSEG_WINDOW_SIZE = 384
CATSEG_STRIDE = 256


def sliding_window_geometry(window_size: int = CATSEG_WINDOW_SIZE) -> dict:
    """``warp_size`` / ``window_size`` / ``stride`` of CAT-Seg's protocol scaled to ``window_size`` views.

    ``sliding_window_geometry(384) == {"warp_size": 640, "window_size": 384, "stride": 256}`` (the published
    setting); a 64-pixel model gets warp 107, stride 43: still 2x2 crops plus the global view.
    """
    if window_size <= 0:
        raise ValueError(f"window_size must be positive, got {window_size}.")
    return {
        "warp_size": round(window_size * CATSEG_WARP_SIZE / CATSEG_WINDOW_SIZE),
        "window_size": int(window_size),
        "stride": round(window_size * CATSEG_STRIDE / CATSEG_WINDOW_SIZE),
    }


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with windows of ``window`` and step ``stride``.

    The last window is aligned to the end when the stride does not divide ``length - window``.
    ``window_starts(640, 384, 256) == [0, 256]``.
    """
    if window >= length:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _resize(x: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def short_side_size(height: int, width: int, short_side: int, max_size: int | None = 2560) -> tuple[int, int]:
    """Output size of detectron2's ``ResizeShortestEdge(short_side, max_size)``."""
    scale = short_side / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max_size is not None and max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


UPSAMPLE_MODES = ("logits", "probabilities")


def _run_views(
    model: Callable,
    views: torch.Tensor,
    text_embeds: torch.Tensor | None,
    batch_size: int | None,
    out_size: tuple[int, int],
    autocast_dtype: torch.dtype | None,
    upsample: str = "logits",
    **model_kwargs,
) -> torch.Tensor:
    """Model on ``views`` (N,3,h,w) in chunks -> float32 sigmoid probabilities (N,T,*out_size); ``upsample``:
    resize the ``"logits"`` then take the sigmoid, or take the sigmoid and resize the ``"probabilities"``."""
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}.")
    if text_embeds is None and "input_ids" in model_kwargs and hasattr(model, "get_text_embeddings"):
        # encode the vocabulary once for all chunks of views
        with _autocast(views.device, autocast_dtype):
            text_embeds = model.get_text_embeddings(
                model_kwargs.pop("input_ids"),
                model_kwargs.pop("attention_mask", None),
                prompt_templates=model_kwargs.pop("prompt_templates", None),
            )
    n = views.shape[0]
    bs = n if not batch_size else batch_size
    outs = []
    for i in range(0, n, bs):
        chunk = views[i : i + bs]
        with _autocast(views.device, autocast_dtype):
            kwargs = dict(model_kwargs)
            if text_embeds is not None:
                kwargs["text_embeds"] = text_embeds
            logits = model(pixel_values=chunk, **kwargs).logits
        logits = logits.float()
        if logits.dim() != 4 or logits.shape[0] != chunk.shape[0]:
            raise ValueError(
                f"Model returned logits of shape {tuple(logits.shape)} for {chunk.shape[0]} views; "
                "expected (views, classes, h, w)."
            )
        outs.append(
            _resize(logits, out_size).sigmoid() if upsample == "logits" else _resize(logits.sigmoid(), out_size)
        )
    return torch.cat(outs, 0)


@torch.no_grad()
def sliding_window_probs(
    model: Callable,
    pixel_values: torch.Tensor,
    text_embeds: torch.Tensor | None = None,
    *,
    warp_size: int = CATSEG_WARP_SIZE,
    window_size: int = CATSEG_WINDOW_SIZE,
    stride: int = CATSEG_STRIDE,
    global_view: bool = True,
    output_size: Sequence[tuple[int, int]] | None = None,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    upsample: str = "logits",
    **model_kwargs,
) -> torch.Tensor:
    """Class probabilities ``(B, T, H, W)`` (float32) with CAT-Seg's sliding window + global view.

    ``pixel_values`` (B,3,H,W) is the normalised image at the size the probabilities should come back at
    (pass ``output_size`` to resize to something else, one size for the whole batch). ``batch_size`` is the
    number of views per model call (default: all views of the batch in one call).
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}.")
    b, _, h, w = pixel_values.shape
    warped = _resize(pixel_values.float(), (warp_size, warp_size))
    starts = window_starts(warp_size, window_size, stride)
    crops = [(y, x) for y in starts for x in starts]
    views = [warped[:, :, y : y + window_size, x : x + window_size] for (y, x) in crops]
    if global_view:
        views.append(_resize(warped, (window_size, window_size)))
    nv = len(views)
    # (B*nv, 3, win, win), image-major so that one image's views are contiguous
    stacked = torch.stack(views, dim=1).reshape(b * nv, 3, window_size, window_size).to(pixel_values.dtype)
    probs = _run_views(
        model, stacked, text_embeds, batch_size, (window_size, window_size), autocast_dtype, upsample, **model_kwargs
    )
    t = probs.shape[1]
    probs = probs.view(b, nv, t, window_size, window_size)
    canvas = probs.new_zeros((b, t, warp_size, warp_size))
    count = probs.new_zeros((1, 1, warp_size, warp_size))
    for i, (y, x) in enumerate(crops):
        canvas[:, :, y : y + window_size, x : x + window_size] += probs[:, i]
        count[:, :, y : y + window_size, x : x + window_size] += 1
    final = canvas / count
    if global_view:
        final = (final + _resize(probs[:, -1], (warp_size, warp_size))) / 2
    out_hw = tuple(output_size) if output_size is not None else (h, w)
    return _resize(final, out_hw)


@torch.no_grad()
def whole_image_probs(
    model: Callable,
    pixel_values: torch.Tensor,
    text_embeds: torch.Tensor | None = None,
    *,
    input_size: int = CATSEG_WINDOW_SIZE,
    output_size: tuple[int, int] | None = None,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    upsample: str = "probabilities",
    **model_kwargs,
) -> torch.Tensor:
    """Class probabilities ``(B, T, H, W)`` from one view per image resized to ``input_size``; the sigmoid is taken
    at the logits' resolution and the probabilities resized (``upsample="logits"``: the other order)."""
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}.")
    _, _, h, w = pixel_values.shape
    view = _resize(pixel_values.float(), (input_size, input_size)).to(pixel_values.dtype)
    out_hw = tuple(output_size) if output_size is not None else (h, w)
    # one resize, from the logits' resolution straight to the output size (CAT-Seg's sem_seg_postprocess)
    return _run_views(model, view, text_embeds, batch_size, out_hw, autocast_dtype, upsample, **model_kwargs)


@torch.no_grad()
def predict_segmentation(
    model: Callable,
    pixel_values: torch.Tensor,
    text_embeds: torch.Tensor | None = None,
    *,
    mode: str = "sliding",
    short_side: int | None = 640,
    max_size: int | None = 2560,
    output_size: tuple[int, int] | None = None,
    **kwargs,
) -> torch.Tensor:
    """Label map ``(B, H, W)`` (int64) for images at their original size ``(H, W)``.

    ``mode="sliding"`` (the published protocol) or ``"whole"``. With ``short_side`` the image is first
    resized so its short side is ``short_side`` (detectron2 test mapper); probabilities are resized back to
    ``output_size`` (default: the input size) before the argmax.
    """
    if mode not in ("sliding", "whole"):
        raise ValueError(f"Unknown inference mode {mode!r}; use 'sliding' or 'whole'.")
    _, _, h, w = pixel_values.shape
    out_hw = tuple(output_size) if output_size is not None else (h, w)
    x = pixel_values
    if short_side:
        size = short_side_size(h, w, short_side, max_size)
        x = _resize(x.float(), size, antialias=size[0] < h).to(pixel_values.dtype)
    if mode == "sliding":
        probs = sliding_window_probs(model, x, text_embeds, output_size=out_hw, **kwargs)
    else:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("warp_size", "window_size", "stride", "global_view")}
        probs = whole_image_probs(model, x, text_embeds, output_size=out_hw, **kwargs)
    return probs.argmax(dim=1)


__all__ = [
    "predict_segmentation",
    "short_side_size",
    "sliding_window_geometry",
    "sliding_window_probs",
    "whole_image_probs",
    "window_starts",
]
