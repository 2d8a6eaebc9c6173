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
6. bilinear resize to the original image size, argmax over classes (`upsampled_argmax`: a few classes at a time,
   so the memory does not grow with the number of classes).

Whole-image mode resizes the image to ``window_size`` x ``window_size``, runs one view, applies the sigmoid at the
logits' resolution and upsamples the probabilities to the image size (CAT-Seg's whole-image order;
``upsample="logits"`` resizes the logits first).

Text embeddings: pass ``text_embeds`` (``model.get_text_embeddings(...)``, computed once per vocabulary). Given
``input_ids`` instead (with the processor's ``attention_mask`` and ``prompt_templates``, which the model checks
against its config), a model with ``get_text_embeddings`` encodes them once per call, not once per chunk of views.

Accumulation is always in float32; ``autocast_dtype=torch.bfloat16`` runs the model under autocast.

``upsampled_argmax`` is the memory-bounded form of ``F.interpolate(maps, size).argmax(0)`` used by
``predict_segmentation``, the image processor's ``post_process_semantic_segmentation`` and the pipeline: classes are
resized in chunks of at most ``UPSAMPLE_BLOCK_ELEMENTS`` output values and reduced with a running max / argmax, which
gives the same label map (the first class wins a tie, as in ``argmax``) with a working set that does not depend on
the number of classes. The output size is not tiled: ``F.interpolate`` on a band of the output computes other
floating-point roundings than on the whole image (its CPU kernel vectorises by width), so the label map would no
longer be the one of the whole-image computation; one class map at the output size is the smallest block.
Standalone: torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

SizeLike = int | tuple[int, int]

# Working set of `upsampled_argmax`: class maps are resized this many output values at a time (64 MiB of float32),
# however many classes there are (at least one class map per block).
UPSAMPLE_BLOCK_ELEMENTS = 2**24
# Output maps smaller than this are resized with all classes at once: on CPU, `F.interpolate` rounds small maps
# differently depending on how many channels it resizes together (measured: maps of 64 x 64 pixels and less), and
# such maps take little memory anyway (64 KiB per class).
MIN_CHUNKED_MAP_PIXELS = 2**14

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


def _class_blocks(num_classes: int, chunk: int) -> list[tuple[int, int]]:
    """`(start, stop)` class ranges of at most `chunk` classes, none of exactly 3 unless the vocabulary is 3 classes.

    PyTorch's CPU bilinear kernel takes another path for a tensor of exactly 3 channels on one thread (an RGB image's
    shape), whose results differ from the per-channel ones in the last bit; every other channel count gives the
    per-channel results. A 3-class vocabulary is resized as one block, as the whole-tensor computation does."""
    if num_classes == 3:
        return [(0, 3)]
    chunk = 2 if chunk == 3 else chunk
    blocks = [(start, min(start + chunk, num_classes)) for start in range(0, num_classes, chunk)]
    start, stop = blocks[-1]
    if stop - start == 3:
        blocks[-1:] = [(start, start + 2), (start + 2, stop)]
    return blocks


def upsampled_argmax(
    maps: torch.Tensor,
    size: tuple[int, int] | None = None,
    *,
    before: Callable[[torch.Tensor], torch.Tensor] | None = None,
    after: Callable[[torch.Tensor], torch.Tensor] | None = None,
    index_dtype: torch.dtype = torch.int64,
    block_elements: int = UPSAMPLE_BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label map and its scores from per-class maps, a chunk of classes at a time.

    Equal to ``scores = after(F.interpolate(before(maps.float())[None], size, mode="bilinear",
    align_corners=False)[0]); scores.argmax(0), scores.max(0).values`` (``before`` / ``after`` default to the
    identity; no resize when ``size`` is None or the maps' own size), including ties (the first maximal class wins),
    with at most ``block_elements`` resized values (and never less than one class map) alive at a time; output maps
    under ``MIN_CHUNKED_MAP_PIXELS`` pixels are resized in one block.

    Args:
        maps: ``(T, h, w)`` class maps (logits or probabilities).
        size: ``(H, W)`` output size.
        before / after: elementwise functions (e.g. ``torch.sigmoid``) applied before / after resizing.
        index_dtype: dtype of the returned label map (a smaller one than int64 saves memory on large outputs).

    Returns:
        ``(index, best)``: ``(H, W)`` class ids and the float32 ``(H, W)`` score of the chosen class.
    """
    if maps.dim() != 3 or maps.shape[0] == 0:
        raise ValueError(f"maps must be (classes, height, width) with at least one class, got {tuple(maps.shape)}.")
    num_classes, height, width = maps.shape
    out_hw = (height, width) if size is None else tuple(int(s) for s in size)
    pixels = out_hw[0] * out_hw[1]
    chunk = num_classes if pixels < MIN_CHUNKED_MAP_PIXELS else max(1, min(num_classes, block_elements // pixels))
    index = best = None
    for start, stop in _class_blocks(num_classes, chunk):
        block = maps[start:stop].float()
        if before is not None:
            block = before(block)
        if out_hw != (height, width):
            block = F.interpolate(block[None], size=out_hw, mode="bilinear", align_corners=False)[0]
        if after is not None:
            block = after(block)
        if block.shape[0] == 1:  # no (H, W) int64 block of argmax indices for a single class
            values, at = block[0], None
        else:
            values, at = block.max(dim=0)  # the first maximal index, as `argmax`
        if best is None:
            best = values  # never written in place: a view of `maps` is safe
            index = (
                torch.full(out_hw, start, dtype=index_dtype, device=maps.device)
                if at is None
                else (at + start).to(index_dtype)
            )
            continue
        better = values > best  # strict: an earlier class keeps a tie
        best = torch.where(better, values, best)
        if at is None:
            index.masked_fill_(better, start)
        else:
            index = torch.where(better, (at + start).to(index_dtype), index)
    return index, best


def _run_views(
    model: Callable,
    views: torch.Tensor,
    text_embeds: torch.Tensor | None,
    batch_size: int | None,
    out_size: tuple[int, int] | None,
    autocast_dtype: torch.dtype | None,
    upsample: str = "logits",
    **model_kwargs,
) -> torch.Tensor:
    """Model on ``views`` (N,3,h,w) in chunks -> float32 sigmoid probabilities (N,T,*out_size); ``upsample``:
    resize the ``"logits"`` then take the sigmoid, or take the sigmoid and resize the ``"probabilities"``.
    ``out_size=None``: the float32 logits as the model returns them (N,T,h',w'), for a later chunked resize."""
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
        if out_size is None:
            outs.append(logits)
        elif upsample == "logits":
            outs.append(_resize(logits, out_size).sigmoid())
        else:
            outs.append(_resize(logits.sigmoid(), out_size))
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


def _whole_view(pixel_values: torch.Tensor, input_size: int) -> torch.Tensor:
    return _resize(pixel_values.float(), (input_size, input_size)).to(pixel_values.dtype)


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
    view = _whole_view(pixel_values, input_size)
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
    ``output_size`` (default: the input size) before the argmax, a chunk of classes at a time
    (``upsampled_argmax``: the label map of the whole-tensor resize and argmax, in memory that does not grow with
    the number of classes).
    """
    if mode not in ("sliding", "whole"):
        raise ValueError(f"Unknown inference mode {mode!r}; use 'sliding' or 'whole'.")
    _, _, h, w = pixel_values.shape
    out_hw = tuple(output_size) if output_size is not None else (h, w)
    x = pixel_values
    if short_side:
        size = short_side_size(h, w, short_side, max_size)
        x = _resize(x.float(), size, antialias=size[0] < h).to(pixel_values.dtype)
    before = after = None
    if mode == "sliding":
        # probabilities on the sliding canvas; its resize to the output size happens in `upsampled_argmax`
        warp = kwargs.get("warp_size", CATSEG_WARP_SIZE)
        maps = sliding_window_probs(model, x, text_embeds, output_size=(warp, warp), **kwargs)
    else:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("warp_size", "window_size", "stride", "global_view")}
        view = _whole_view(x, kwargs.pop("input_size", CATSEG_WINDOW_SIZE))
        upsample = kwargs.pop("upsample", "probabilities")
        batch_size, autocast_dtype = kwargs.pop("batch_size", None), kwargs.pop("autocast_dtype", None)
        # the model's logits; `whole_image_probs`'s order of sigmoid and resize is applied in `upsampled_argmax`
        maps = _run_views(model, view, text_embeds, batch_size, None, autocast_dtype, upsample, **kwargs)
        before, after = (torch.sigmoid, None) if upsample == "probabilities" else (None, torch.sigmoid)
    return torch.stack([upsampled_argmax(image, out_hw, before=before, after=after)[0] for image in maps])


__all__ = [
    "predict_segmentation",
    "short_side_size",
    "sliding_window_geometry",
    "sliding_window_probs",
    "upsampled_argmax",
    "whole_image_probs",
    "window_starts",
]
