"""Open-vocabulary segmentation pipeline for DiSa (shipped to the Hub with the model code).

`pipeline("open-vocabulary-segmentation", model=...)` takes one image or a list of images and the class names
to look for (`candidate_labels`, like `zero-shot-image-classification`), and returns, per image, one entry per label
present in the segmentation: `{"label", "score", "mask"}`, where `mask` is a PIL "L" image (0/255) at the input
size and `score` is the mean sigmoid probability of that class over its mask. The output format is the one of the
built-in `image-segmentation` pipeline (which runs DiSa with its default vocabulary, `config.id2label`).

Batching: `pipe(images, candidate_labels=[...], batch_size=4)` runs 4 images per forward pass. The labels are shared
by the whole call: their prompts are tokenized and encoded once per call (`model.get_text_embeddings`) and every
forward pass gets the embeddings (`text_embeds=`); nothing is kept between calls, so edited weights are always used.
Post-processing is the image processor's `post_process_semantic_segmentation` (sigmoid at the logits' resolution,
then bilinear resize: CAT-Seg's order). EXIF orientation is applied to every input form (path, URL, PIL image), so
masks have the displayed size. An empty list of images gives an empty list.

Hub-shipped module: only single-dot imports of sibling modules and absolute imports of public libraries.
"""

import os

import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from PIL import Image, ImageOps
from transformers import AutoModel, Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_disa import validate_class_names
from .image_processing_disa import class_scores

PIPELINE_TASK = "open-vocabulary-segmentation"


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


def load_pipeline_image(image, timeout: float | None = None) -> Image.Image:
    """PIL image from a PIL image, array, tensor, local path or URL (URLs refused in offline mode), upright: the
    EXIF orientation is applied here, once, for every PIL input (what `transformers.image_utils.load_image` does for
    the built-in pipelines), so the masks have the displayed size whatever the input form."""
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
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return image
    raise TypeError(
        f"unsupported image type {type(image).__name__}: pass a PIL image, an array, a local path or a URL."
    )


def _image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an (H, W[, C]) / (C, H, W) array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    shape = tuple(image.shape)
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        return shape[1], shape[2]
    return shape[0], shape[1]


def segments_from_logits(logits: torch.Tensor, target_size, labels) -> list[dict]:
    """One image's `(T, h, w)` logits -> entries `{"score", "label", "mask"}` for every class present.

    As `DiSaImageProcessor.post_process_semantic_segmentation` (`class_scores`): per-class sigmoid at the logits'
    resolution, probabilities resized bilinearly (align_corners=False) to `target_size` `(H, W)`, label map = argmax
    over classes; a class's score is the mean probability over its pixels.
    """
    probabilities = class_scores(logits, tuple(int(s) for s in target_size), "probabilities")
    segmentation = probabilities.argmax(dim=0)
    results = []
    for class_id in torch.unique(segmentation).tolist():
        mask = segmentation == class_id
        score = float(probabilities[class_id][mask].mean())
        image = Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L")
        results.append({"score": score, "label": labels[class_id], "mask": image})
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None or not hasattr(self.processor, "tokenize_class_names"):
            raise ValueError(
                "the open-vocabulary-segmentation pipeline needs the DiSa processor (image processor + tokenizer); "
                "the repository must hold processor_config.json and the tokenizer files."
            )

    def __call__(self, image, candidate_labels=None, **kwargs):
        """
        Args:
            image: a PIL image, a NumPy array / tensor, a local path or a URL, or a list of them.
            candidate_labels (`list[str]`, *optional*): the class names to segment (synonyms as
                `"building, edifice"` are prompted with the first one). Default: `config.id2label`.
            batch_size (`int`, *optional*): images per forward pass.
            timeout (`float`, *optional*): seconds to wait for an image URL.

        Returns:
            For one image, a list of `{"score": float, "label": str, "mask": PIL.Image}` (one per label present);
            for a list of images, a list of such lists (`[]` for an empty list).
        """
        unexpected = sorted(set(kwargs) - {"batch_size", "num_workers", "timeout"})
        if unexpected:
            raise TypeError(f"unexpected arguments {unexpected} for the {PIPELINE_TASK} pipeline.")
        labels, tokens = self._vocabulary(candidate_labels)
        if isinstance(image, (list, tuple)) and not image:
            return []  # transformers' Pipeline.__call__ would index the empty list
        with torch.no_grad():
            # one encoding per call, shared by every batch of images (the model keeps no cache)
            text_embeds = self.model.get_text_embeddings(tokens["input_ids"].to(self.device),
                                                         tokens["attention_mask"].to(self.device))
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
        return [id2label[i] for i in sorted(id2label, key=int)], {"input_ids": input_ids, "attention_mask": attention_mask}

    def _sanitize_parameters(self, _labels=None, _text_embeds=None, timeout=None, **kwargs):
        # `_labels` / `_text_embeds` come from `__call__` (validated labels and their embeddings for this call)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for the {PIPELINE_TASK} pipeline.")
        forward_params = {} if _text_embeds is None else {"text_embeds": _text_embeds}
        postprocess_params = {} if _labels is None else {"labels": _labels}
        return {"timeout": timeout}, forward_params, postprocess_params

    def preprocess(self, image, timeout=None):
        image = load_pipeline_image(image, timeout=timeout)
        height, width = _image_size(image)
        inputs = self.processor.image_processor(images=image, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.dtype), "target_size": torch.tensor([[height, width]])}

    def _forward(self, model_inputs, text_embeds=None):
        outputs = self.model(pixel_values=model_inputs["pixel_values"], text_embeds=text_embeds)
        return {"logits": outputs.logits, "target_size": model_inputs["target_size"]}

    def postprocess(self, model_outputs, labels=None):
        logits = model_outputs["logits"][0].detach().cpu()
        target_size = model_outputs["target_size"].reshape(-1)[:2].tolist()
        return segments_from_logits(logits, target_size, labels)


PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=DiSaOpenVocabSegmentationPipeline, pt_model=AutoModel, type="multimodal"
)

__all__ = ["DiSaOpenVocabSegmentationPipeline", "PIPELINE_TASK", "check_candidate_labels", "segments_from_logits"]
