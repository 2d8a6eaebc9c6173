"""DiSa processor: the image processor plus a CLIP tokenizer that turns a class vocabulary into prompts."""

from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import BatchEncoding

from .configuration_disa import DEFAULT_PROMPT_TEMPLATE, format_prompts


class DiSaProcessor(ProcessorMixin):
    r"""
    Wraps a [`DiSaImageProcessor`] and a `CLIPTokenizer`.

    `processor(images=..., text=["cat", "grass"], segmentation_maps=None, return_tensors="pt")` returns
    `pixel_values` `(batch, 3, S, S)`, `input_ids` / `attention_mask` `(T * P, L)` (one row per class and prompt
    template, padded to the longest prompt) and, with maps, `labels`. `text` is the class vocabulary shared by
    every image of the batch; names with synonyms (`"building, edifice"`) are prompted with the first one.
    """

    def __init__(self, image_processor=None, tokenizer=None, prompt_templates=None, **kwargs):
        self.prompt_templates = list(prompt_templates or [DEFAULT_PROMPT_TEMPLATE])
        super().__init__(image_processor, tokenizer, **kwargs)

    def tokenize_class_names(self, class_names, return_tensors="pt") -> BatchEncoding:
        """Prompts for `class_names` (class-major, P templates each) tokenized and padded to the longest."""
        prompts = format_prompts(class_names, self.prompt_templates)
        return self.tokenizer(prompts, padding="longest", return_tensors=return_tensors)

    def __call__(self, images=None, text=None, segmentation_maps=None, return_tensors="pt", **kwargs):
        if images is None and text is None:
            raise ValueError("pass `images`, `text` (the class names) or both.")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, segmentation_maps=segmentation_maps, return_tensors=return_tensors, **kwargs))
        elif segmentation_maps is not None:
            raise ValueError("`segmentation_maps` need their `images`.")
        if text is not None:
            data.update(self.tokenize_class_names(text, return_tensors=return_tensors))
        return BatchEncoding(data=data, tensor_type=return_tensors)

    def post_process_semantic_segmentation(self, outputs, target_sizes=None):
        return self.image_processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)

    @property
    def model_input_names(self):
        return ["pixel_values", "input_ids", "attention_mask"]


DiSaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["DiSaProcessor"]
