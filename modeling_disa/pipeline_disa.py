"""Open-vocabulary segmentation pipeline for DiSa (shipped to the Hub with the model code).

`pipeline("open-vocabulary-segmentation", model=...)` takes one image or a list of images and the class names
to look for (`candidate_labels`, like `zero-shot-image-classification`), and returns, per image, one entry per label
present in the segmentation: `{"label", "score", "mask"}`, where `mask` is a PIL "L" image (0/255) at the input
size and `score` is the mean sigmoid probability of that class over its mask. The output format is the one of the
built-in `image-segmentation` pipeline (which runs DiSa with its default vocabulary, `config.id2label`).

Batching: `pipe(images, candidate_labels=[...], batch_size=4)` runs 4 images per forward pass; the labels are shared
by the whole call, so the prompts are tokenized (and their embeddings computed) once per batch.

Hub-shipped module: only single-dot imports of sibling modules and absolute imports of public libraries.
"""

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from PIL import Image
from transformers import AutoModel, Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_disa import validate_class_names

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
    """PIL image from a PIL image, array, tensor, local path or URL (URLs refused in offline mode)."""
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            if _is_offline():
                raise ValueError(
                    f"cannot download the image {image!r}: offline mode is enabled (HF_HUB_OFFLINE=1). Download it "
                    "yourself and pass a local path or a PIL image."
                )
            try:
                return load_image(image, timeout=timeout if timeout is not None else 10.0)
            except Exception as error:  # noqa: BLE001 - re-raised with the URL named
                raise ValueError(f"could not load the image {image!r}: {error}") from error
        return load_image(image)
    if isinstance(image, Image.Image):
        return image
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

    The logits are resized bilinearly (align_corners=False) to `target_size` `(H, W)`, the label map is the argmax
    over classes, and a class's score is the mean sigmoid probability over its pixels.
    """
    resized = F.interpolate(logits[None].float(), size=tuple(int(s) for s in target_size), mode="bilinear",
                            align_corners=False)[0]
    segmentation = resized.argmax(dim=0)
    probabilities = resized.sigmoid()
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
            for a list of images, a list of such lists.
        """
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def _sanitize_parameters(self, candidate_labels=None, timeout=None, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)} for the {PIPELINE_TASK} pipeline.")
        preprocess_params = {"timeout": timeout}
        if candidate_labels is None:
            id2label = getattr(self.model.config, "id2label", None) or {}
            if not getattr(self.model.config, "label_token_ids", None):
                raise ValueError(
                    "pass candidate_labels=[...]: this model has no stored default vocabulary "
                    "(config.label_token_ids)."
                )
            preprocess_params["candidate_labels"] = None
            preprocess_params["default_labels"] = [id2label[i] for i in sorted(id2label, key=int)]
        else:
            preprocess_params["candidate_labels"] = check_candidate_labels(candidate_labels)
        return preprocess_params, {}, {}

    def preprocess(self, image, candidate_labels=None, default_labels=None, timeout=None):
        image = load_pipeline_image(image, timeout=timeout)
        height, width = _image_size(image)
        inputs = self.processor.image_processor(images=image, return_tensors="pt")
        return {
            "pixel_values": inputs["pixel_values"].to(self.dtype),
            "target_size": torch.tensor([[height, width]]),
            "labels_spec": [(tuple(candidate_labels) if candidate_labels is not None else None,
                             tuple(default_labels) if default_labels is not None else None)],
        }

    def _forward(self, model_inputs):
        specs = model_inputs.pop("labels_spec")
        # batch_size=1: the item's own list; batched: one list per item (equal within a call).
        flat = [spec for item in specs for spec in (item if isinstance(item, list) else [item])]
        if len(set(flat)) != 1:
            raise ValueError("all images of a batch must share the same candidate_labels.")
        candidate, default = flat[0]
        text = {}
        if candidate is not None:
            tokens = self.processor.tokenize_class_names(list(candidate), return_tensors="pt")
            text = {"input_ids": tokens["input_ids"].to(self.device),
                    "attention_mask": tokens["attention_mask"].to(self.device)}
        labels = list(candidate if candidate is not None else default)
        outputs = self.model(pixel_values=model_inputs["pixel_values"], **text)
        batch = outputs.logits.shape[0]
        return {"logits": outputs.logits, "target_size": model_inputs["target_size"], "labels": [labels] * batch}

    def postprocess(self, model_outputs):
        labels = model_outputs["labels"]
        if labels and isinstance(labels[0], list):
            labels = labels[0]
        logits = model_outputs["logits"][0].detach().cpu()
        target_size = model_outputs["target_size"].reshape(-1)[:2].tolist()
        return segments_from_logits(logits, target_size, labels)


PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=DiSaOpenVocabSegmentationPipeline, pt_model=AutoModel, type="multimodal"
)

__all__ = ["DiSaOpenVocabSegmentationPipeline", "PIPELINE_TASK", "check_candidate_labels", "segments_from_logits"]
