"""Open-vocabulary segmentation pipeline for DiSa (shipped to the Hub with the model code).

`pipeline("open-vocabulary-segmentation", model=...)` takes one image or a list of images and the class names
to look for (`candidate_labels`, like `zero-shot-image-classification`), and returns, per image, one entry per label
present in the segmentation: `{"label", "score", "mask"}`, where `mask` is a PIL "L" image (0/255) at the input
size and `score` is the mean sigmoid probability of that class over its mask. The output format is the one of the
built-in `image-segmentation` pipeline (which runs DiSa with its default vocabulary, `config.id2label`).

Batching: `pipe(images, candidate_labels=[...], batch_size=4)` runs 4 images per forward pass. The labels are shared
by the whole call: their prompts are tokenized and encoded once (`model.get_text_embeddings`) and every forward pass
gets the embeddings (`text_embeds=`).

Text-embedding cache: the embeddings of the last `text_embedding_cache_size` (8) vocabularies are kept, keyed by the
labels, the processor's prompt templates, the device and dtype, and the state of every text-tower parameter (its
storage and its in-place version counter), so a later call with the same labels encodes nothing, and an optimiser
step, `load_state_dict` or any in-place edit of the text weights makes the next call encode again. Edits through
`param.data`, which bypass PyTorch's version counter, are not seen: call `pipe.clear_text_embedding_cache()` after
them. `text_embedding_cache_size = 0` disables the cache.
Post-processing is the image processor's `post_process_semantic_segmentation` (sigmoid at the logits' resolution,
then bilinear resize: CAT-Seg's order), a few classes at a time (`inference.upsampled_argmax`), so its memory does
not grow with the number of labels. EXIF orientation is applied to every input form (path, URL, PIL image), so
masks have the displayed size. An empty list of images gives an empty list.

Image size: the label map and the masks are made at the image's size, and one class's probabilities at that size
are the smallest block resized at once (4 bytes per pixel), so images over `max_image_pixels` (2**28 pixels, one
GiB per class map; a class attribute) are refused before they are decoded. Raise it on the pipeline
(`pipe.max_image_pixels = ...`) for larger images, or downscale them.

Options:
- `inference_mode="sliding"`: CAT-Seg's evaluation protocol (crops of the processor's view size with a 2/3 stride
  over the image warped to 5/3 of it, plus a global view; at 384 views that is warp 640, stride 256), instead of the
  default `"whole"` (one view of the processor's size). All views of a batch go through the model in one forward
  pass, with the call's text embeddings; the views' logits are resized to the view size before the sigmoid and the
  probabilities resized to the image size (CAT-Seg's sliding-window order).
- Speed (set when the pipeline is built): `dtype=torch.bfloat16` (transformers' option: the weights are loaded in
  bfloat16; on a CPU only where it has bfloat16 instructions, AVX512_BF16 / AMX, else a `ValueError`), and
  `torch_compile=True` (with `torch_compile_backend` / `torch_compile_mode`, `TrainingArguments`' names) to run the
  image forward through `torch.compile`. The first call then compiles (minutes on a CPU); inductor's numbers differ
  from eager ones in the last bits.
- `output_saliency=True` (models with SDM, `config.use_sdm`): each entry also holds `"saliency"` (float32
  `(grid, grid)`, the class's SDM Grad-CAM saliency) and `"foreground_mask"` (bool `(grid, grid)`, the tokens SDM
  routes to the class's foreground branch), from the whole-image view (the global view in sliding mode).

Hub-shipped module: only single-dot imports of sibling modules and absolute imports of public libraries.
"""

import os
from collections import OrderedDict

import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from PIL import Image, ImageOps
from transformers import AutoModel, Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_disa import validate_class_names
from .inference import sliding_window_geometry, sliding_window_probs, upsampled_argmax
from .inference_options import check_inference_dtype, compile_for_inference, resolve_dtype

PIPELINE_TASK = "open-vocabulary-segmentation"
INFERENCE_MODES = ("whole", "sliding")
# Pixels of the label map summed per class at a time for the class scores (float64 sums: 32 MiB per block).
SCORE_BLOCK_PIXELS = 2**22


def _is_offline() -> bool:
    return bool(hub_constants.HF_HUB_OFFLINE)


def check_candidate_labels(candidate_labels) -> list[str]:
    """A non-empty list of distinct, non-empty strings (a bare string is refused: pass `["cat"]`)."""
    if isinstance(candidate_labels, str):
        raise TypeError(
            f"candidate_labels must be a list of strings, got the string {candidate_labels!r}; "
            f"pass [{candidate_labels!r}] for a single label."
        )
    if candidate_labels is not None and not isinstance(candidate_labels, (list, tuple)):
        raise TypeError(f"candidate_labels must be a list of strings, got {type(candidate_labels).__name__}.")
    try:
        return validate_class_names(candidate_labels)
    except (TypeError, ValueError) as error:
        raise type(error)(f"candidate_labels: {error}") from None


def load_pipeline_image(image, timeout: float | None = None, max_pixels: int | None = None) -> Image.Image:
    """PIL image from a PIL image, array, tensor, local path or URL (URLs refused in offline mode), upright: the
    EXIF orientation is applied here, once, for every PIL input (what `transformers.image_utils.load_image` does for
    the built-in pipelines), so the masks have the displayed size whatever the input form. Images of more than
    `max_pixels` pixels are refused before their pixels are decoded."""
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            if _is_offline():
                raise ValueError(
                    f"cannot download the image {image!r}: offline mode is enabled (HF_HUB_OFFLINE=1). Download it "
                    "yourself and pass a local path or a PIL image."
                )
            try:
                image = load_image(image, timeout=timeout if timeout is not None else 10.0)
            except Exception as error:  # noqa: BLE001 - re-raised with the URL named
                raise ValueError(f"could not load the image {image!r}: {error}") from error
        elif os.path.isfile(image):
            image = Image.open(image)  # not load_image: it converts to RGB, which would drop 16-bit precision
        else:
            image = load_image(image)  # base64 data, or its error for a missing file
    if not isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        raise TypeError(
            f"unsupported image type {type(image).__name__}: pass a PIL image, an array, a local path or a URL."
        )
    height, width = _image_size(image)  # a PIL image's size comes from its header: nothing decoded yet
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(
            f"the image is {width} x {height} = {height * width / 1e6:.1f} megapixels, over the pipeline's limit of "
            f"{max_pixels / 1e6:.1f} megapixels (`max_image_pixels`): its label map and masks are made at the "
            "image size. Raise the limit with `pipe.max_image_pixels = ...`, or downscale the image."
        )
    return ImageOps.exif_transpose(image) if isinstance(image, Image.Image) else image


def _image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an (H, W[, C]) / (C, H, W) array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    shape = tuple(image.shape)
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        return shape[1], shape[2]
    return shape[0], shape[1]


def _index_dtype(num_classes: int) -> torch.dtype:
    # the label map is as large as the image: the smallest integer type that holds every class id
    return torch.uint8 if num_classes <= 256 else torch.int16 if num_classes <= 2**15 else torch.int32


def segments_from_logits(logits: torch.Tensor, target_size, labels) -> list[dict]:
    """One image's `(T, h, w)` logits -> entries `{"score", "label", "mask"}` for every class present.

    As `DiSaImageProcessor.post_process_semantic_segmentation`: per-class sigmoid at the logits' resolution,
    probabilities resized bilinearly (align_corners=False) to `target_size` `(H, W)`, label map = argmax over classes
    (`upsampled_argmax`, a few classes at a time); a class's score is the mean probability over its pixels.
    """
    size = tuple(int(s) for s in target_size)
    index, best = upsampled_argmax(logits, size, before=torch.sigmoid, index_dtype=_index_dtype(logits.shape[0]))
    return _segments(index, best, labels, logits.shape[0])


def segments_from_probabilities(probabilities: torch.Tensor, target_size, labels) -> list[dict]:
    """Like `segments_from_logits` for `(T, h, w)` probabilities (sliding-window output): CAT-Seg's sliding-window
    order, the probabilities (sigmoid of the logits resized to the view size) are resized to the image size before
    the argmax."""
    size = tuple(int(s) for s in target_size)
    index, best = upsampled_argmax(probabilities, size, index_dtype=_index_dtype(probabilities.shape[0]))
    return _segments(index, best, labels, probabilities.shape[0])


def _segments(index: torch.Tensor, best: torch.Tensor, labels, num_classes: int) -> list[dict]:
    """Entries for the classes present in the label map `index`; `best` holds each pixel's probability of its class,
    whose mean over the class's pixels is the score (summed in float64, a block of pixels at a time)."""
    flat_index, flat_best = index.reshape(-1), best.reshape(-1)
    sums = torch.zeros(num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for start in range(0, flat_index.numel(), SCORE_BLOCK_PIXELS):
        ids = flat_index[start : start + SCORE_BLOCK_PIXELS].long()
        counts += torch.bincount(ids, minlength=num_classes)
        sums.index_add_(0, ids, flat_best[start : start + SCORE_BLOCK_PIXELS].double())
    results = []
    for class_id in torch.nonzero(counts).flatten().tolist():
        mask = (index == class_id).to(torch.uint8).mul_(255)
        image = Image.fromarray(mask.numpy(), mode="L")
        results.append({"score": float(sums[class_id] / counts[class_id]), "label": labels[class_id], "mask": image})
    return results


class DiSaOpenVocabSegmentationPipeline(Pipeline):
    """
    Open-vocabulary semantic segmentation with a DiSa / CAT-Seg model.

    ```python
    from transformers import pipeline
    segmenter = pipeline("open-vocabulary-segmentation", model="org/disa-vitb", trust_remote_code=True)
    segmenter("street.jpg", candidate_labels=["car", "road", "sky"])
    # [{"score": 0.71, "label": "road", "mask": <PIL.Image.Image mode=L>}, ...]
    ```

    Without `candidate_labels` the model's default vocabulary (`config.id2label`) is used.
    """

    _load_processor = True
    _load_image_processor = None
    _load_feature_extractor = False
    _load_tokenizer = None

    text_embedding_cache_size = 8
    max_image_pixels = 2**28

    def __init__(self, *args, torch_compile=False, torch_compile_backend=None, torch_compile_mode=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None or not hasattr(self.processor, "tokenize_class_names"):
            raise ValueError(
                "the open-vocabulary-segmentation pipeline needs the DiSa processor (image processor + tokenizer); "
                "the repository must hold processor_config.json and the tokenizer files."
            )
        # transformers applies `dtype=` only when it loads the model; for a model object it would drop it silently
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype not in (None, "auto") and resolve_dtype(dtype) != self.model.dtype:
            raise ValueError(
                f"dtype={dtype} but the model given is in {self.model.dtype}: the pipeline does not convert a loaded "
                f"model; load it with from_pretrained(..., dtype={dtype}) or pass model.to({dtype})."
            )
        check_inference_dtype(self.model.dtype, self.device)  # bf16 / fp16 weights: refused here, before a call
        # the image forward only: the text tower runs once per vocabulary (cached), not worth a compilation
        self._model_call = compile_for_inference(self.model, torch_compile, torch_compile_backend, torch_compile_mode)
        # prompts built with other templates than the model's would be read as other classes (masks named wrongly)
        self.model.check_prompt_templates(self.processor.prompt_templates)
        self._text_embedding_cache = OrderedDict()

    def clear_text_embedding_cache(self) -> None:
        """Forget the cached text embeddings (needed only after editing text weights through `param.data`)."""
        self._text_embedding_cache.clear()

    def _text_weights_state(self) -> tuple:
        # `_version` is bumped by every in-place op on a tensor (what autograd uses to detect stale saved tensors);
        # with the storage pointer it identifies the current values of each parameter without reading them
        clip = self.model.clip
        params = [*clip.text_model.parameters(), *clip.text_projection.parameters()]
        return tuple((p.data_ptr(), p._version) for p in params)

    def _text_embeddings(self, candidate_labels) -> tuple:
        """(label names, `(T, P, C)` text embeddings) of the vocabulary, from the cache when nothing changed."""
        labels = None if candidate_labels is None else check_candidate_labels(candidate_labels)
        if labels is not None:
            vocabulary = tuple(labels)
        else:  # the default vocabulary: its stored prompt tokens and names
            config = self.model.config
            vocabulary = (
                tuple(map(tuple, getattr(config, "label_token_ids", None) or ())),
                tuple(sorted((str(k), v) for k, v in (getattr(config, "id2label", None) or {}).items())),
            )
        templates = tuple(getattr(self.processor, "prompt_templates", None) or ())
        key = (
            labels is None,
            vocabulary,
            templates,
            str(self.device),
            str(self.model.dtype),
            self._text_weights_state(),
        )
        if key in self._text_embedding_cache:
            self._text_embedding_cache.move_to_end(key)
            return self._text_embedding_cache[key]
        names, tokens = self._vocabulary(labels)
        with torch.no_grad():
            text_embeds = self.model.get_text_embeddings(
                tokens["input_ids"].to(self.device),
                tokens["attention_mask"].to(self.device),
                prompt_templates=tokens.get("prompt_templates"),
            )
        if self.text_embedding_cache_size > 0:
            self._text_embedding_cache[key] = (names, text_embeds)
            while len(self._text_embedding_cache) > self.text_embedding_cache_size:
                self._text_embedding_cache.popitem(last=False)
        return names, text_embeds

    def __call__(self, image, candidate_labels=None, **kwargs):
        """
        Args:
            image: a PIL image, a NumPy array / tensor, a local path or a URL, or a list of them.
            candidate_labels (`list[str]`, *optional*): the class names to segment (synonyms as
                `"building, edifice"` are prompted with the first one). Default: `config.id2label`.
            batch_size (`int`, *optional*): images per forward pass.
            inference_mode (`str`, *optional*): `"whole"` (default, one view) or `"sliding"` (CAT-Seg's sliding
                window plus a global view).
            output_saliency (`bool`, *optional*): add each class's SDM `"saliency"` and `"foreground_mask"` (SDM
                models only).
            timeout (`float`, *optional*): seconds to wait for an image URL.

        Returns:
            For one image, a list of `{"score": float, "label": str, "mask": PIL.Image}` (one per label present,
            plus `"saliency"` and `"foreground_mask"` arrays with `output_saliency`); for a list of images, a list
            of such lists (`[]` for an empty list).
        """
        unexpected = sorted(
            set(kwargs) - {"batch_size", "num_workers", "timeout", "inference_mode", "output_saliency"}
        )
        if unexpected:
            raise TypeError(f"unexpected arguments {unexpected} for the {PIPELINE_TASK} pipeline.")
        self._check_options(kwargs.get("inference_mode"), kwargs.get("output_saliency"))
        if isinstance(image, (list, tuple)) and not image:
            self._vocabulary(candidate_labels)  # still validates the labels
            return []  # transformers' Pipeline.__call__ would index the empty list
        # at most one encoding per call, shared by every batch of images and every sliding-window view, and none
        # when the vocabulary and the text weights are those of a cached call
        labels, text_embeds = self._text_embeddings(candidate_labels)
        return super().__call__(image, _labels=labels, _text_embeds=text_embeds, **kwargs)

    def _vocabulary(self, candidate_labels):
        """(label names, prompt tokens) of `candidate_labels`, or of the model's default vocabulary."""
        if candidate_labels is not None:
            labels = check_candidate_labels(candidate_labels)
            return labels, self.processor.tokenize_class_names(labels, return_tensors="pt")
        config = self.model.config
        if not getattr(config, "label_token_ids", None):
            raise ValueError(
                "pass candidate_labels=[...]: this model has no stored default vocabulary (config.label_token_ids)."
            )
        id2label = getattr(config, "id2label", None) or {}
        input_ids, attention_mask = self.model.default_vocabulary_tokens()
        return [id2label[i] for i in sorted(id2label, key=int)], {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }

    def _check_options(self, inference_mode, output_saliency) -> None:
        if inference_mode is not None and inference_mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode must be one of {INFERENCE_MODES}, got {inference_mode!r}.")
        if output_saliency and not getattr(self.model.config, "use_sdm", False):
            raise ValueError("output_saliency=True needs a model with the saliency module (config.use_sdm=True).")

    def _sanitize_parameters(
        self, _labels=None, _text_embeds=None, timeout=None, inference_mode=None, output_saliency=None, **kwargs
    ):
        # `_labels` / `_text_embeds` come from `__call__` (validated labels and their embeddings for this call)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for the {PIPELINE_TASK} pipeline.")
        self._check_options(inference_mode, output_saliency)
        preprocess_params = {"timeout": timeout}
        forward_params = {} if _text_embeds is None else {"text_embeds": _text_embeds}
        if inference_mode is not None:
            preprocess_params["inference_mode"] = forward_params["inference_mode"] = inference_mode
        if output_saliency is not None:
            forward_params["output_saliency"] = bool(output_saliency)
        postprocess_params = {} if _labels is None else {"labels": _labels}
        return preprocess_params, forward_params, postprocess_params

    def sliding_window_geometry(self) -> dict:
        """`warp_size`, `window_size`, `stride` of sliding-window inference for this processor's view size."""
        size = self.processor.image_processor.size
        if size["height"] != size["width"]:
            raise ValueError(f"sliding-window inference needs square views, the image processor's size is {size}.")
        return sliding_window_geometry(int(size["height"]))

    def preprocess(self, image, timeout=None, inference_mode="whole"):
        image = load_pipeline_image(image, timeout=timeout, max_pixels=self.max_image_pixels)
        height, width = _image_size(image)
        resize = {}
        if inference_mode == "sliding":
            # CAT-Seg warps the image to the sliding canvas: resize once from the original pixels to that size.
            warp = self.sliding_window_geometry()["warp_size"]
            resize = {"size": {"height": warp, "width": warp}}
        inputs = self.processor.image_processor(images=image, return_tensors="pt", **resize)
        return {"pixel_values": inputs["pixel_values"].to(self.dtype), "target_size": torch.tensor([[height, width]])}

    def _forward(self, model_inputs, text_embeds=None, inference_mode="whole", output_saliency=False):
        pixel_values = model_inputs["pixel_values"]
        batch = pixel_values.shape[0]
        result = {"target_size": model_inputs["target_size"]}
        model_kwargs = {"output_saliency": output_saliency}
        if inference_mode == "sliding":
            calls = []

            def model_call(**inputs):
                calls.append(self._model_call(**inputs))
                return calls[-1]

            # batch_size=None: every view of the batch in one forward pass, all with this call's text embeddings;
            # CAT-Seg's sliding-window order (logits resized to the view size, then the sigmoid)
            result["probabilities"] = sliding_window_probs(
                model_call, pixel_values, text_embeds, **self.sliding_window_geometry(), **model_kwargs
            )
            (outputs,) = calls
            views = outputs.logits.shape[0] // batch
            image_view = slice(views - 1, None, views)  # views are image-major; the global view comes last
        else:
            outputs = self._model_call(pixel_values=pixel_values, text_embeds=text_embeds, **model_kwargs)
            result["logits"] = outputs.logits
            image_view = slice(None)
        if output_saliency:
            result["saliency"] = outputs.saliency[image_view]
            result["foreground_mask"] = outputs.foreground_mask[image_view]
        return result

    def postprocess(self, model_outputs, labels=None):
        target_size = model_outputs["target_size"].reshape(-1)[:2].tolist()
        if "probabilities" in model_outputs:
            results = segments_from_probabilities(
                model_outputs["probabilities"][0].detach().cpu(), target_size, labels
            )
        else:
            results = segments_from_logits(model_outputs["logits"][0].detach().cpu(), target_size, labels)
        if "saliency" in model_outputs:
            saliency = model_outputs["saliency"][0].detach().float().cpu().numpy()
            foreground = model_outputs["foreground_mask"][0].detach().cpu().numpy().astype(bool)
            for entry in results:
                class_id = labels.index(entry["label"])
                entry["saliency"], entry["foreground_mask"] = saliency[class_id], foreground[class_id]
        return results


PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=DiSaOpenVocabSegmentationPipeline, pt_model=AutoModel, type="multimodal"
)

__all__ = [
    "DiSaOpenVocabSegmentationPipeline",
    "INFERENCE_MODES",
    "PIPELINE_TASK",
    "check_candidate_labels",
    "segments_from_logits",
    "segments_from_probabilities",
]
