"""DiSa processor: the image processor plus a CLIP tokenizer that turns a class vocabulary into prompts."""

import os

from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs
from transformers.tokenization_utils_base import BatchEncoding
from transformers.utils import cached_file

from .configuration_disa import DEFAULT_PROMPT_TEMPLATE, format_prompts
from .image_processing_disa import DiSaImageProcessor, DiSaImageProcessorKwargs

# Files from which a CLIP tokenizer can be built: the `tokenizers` serialisation, or the slow tokenizer's vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class DiSaTextKwargs(TextKwargs, total=False):
    """Tokenizer options, plus `allow_shared_prompts` (`bool`): accept class lists in which two classes get the same
    prompt (see `format_prompts`); only for reproducing an evaluation protocol."""

    allow_shared_prompts: bool


class DiSaProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: DiSaTextKwargs
    images_kwargs: DiSaImageProcessorKwargs


class DiSaProcessor(ProcessorMixin):
    r"""
    Wraps a [`DiSaImageProcessor`] and a `CLIPTokenizer`.

    `processor(images=..., text=["cat", "grass"], segmentation_maps=None, return_tensors="pt")` returns
    `pixel_values` `(batch, 3, S, S)`, `input_ids` / `attention_mask` `(T * P, L)` (one row per class and prompt
    template, class-major, padded to the longest prompt), `prompt_templates` (the P templates used, a list of
    strings, which `inputs.to(device)` leaves as it is) and, with maps, `labels`. `text` is the class vocabulary
    shared by every image of the batch.

    Synonyms follow CAT-Seg's rule exactly: a class is prompted with `name.split(", ")[0]`, the text before its
    first comma-and-space (`"building, edifice"` -> `"building"`), nothing stripped; a comma without a space is part
    of the name (`"a,b"` is prompted as `"a,b"`).

    Prompt templates: the model reads P = `len(config.prompt_templates)` prompts per class, in that order, so the
    processor's `prompt_templates` must be the model's. `DiSaProcessor.from_pretrained(model_folder)` gives the ones
    saved with the model; a processor built in code takes `prompt_templates=model.config.prompt_templates`
    (default: CAT-Seg's single `"A photo of a {} in the scene"`). The model refuses `input_ids` whose
    `prompt_templates` differ from its config's.

    Keyword arguments are routed as by transformers' processors (`ProcessorMixin._merge_kwargs` with the
    `DiSaProcessorKwargs` TypedDict): tokenizer options (`padding=`, `max_length=`, `truncation=`, ...) and
    `allow_shared_prompts=` go to the text side, image options (`size=`, `do_reduce_labels=`, ...) to the image
    processor, or explicitly per modality with `text_kwargs={...}`, `images_kwargs={...}`, `common_kwargs={...}`.
    Defaults: `padding="longest"`, `allow_shared_prompts=False`.
    """

    valid_processor_kwargs = DiSaProcessorKwargs
    # lowest-priority defaults of `_merge_kwargs` (processor class attributes, the 5.x convention)
    text_kwargs = {"padding": "longest", "return_tensors": "pt", "allow_shared_prompts": False}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(self, image_processor=None, tokenizer=None, prompt_templates=None, **kwargs):
        self.prompt_templates = _check_templates(prompt_templates)
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_model_config(cls, config, tokenizer, **image_processor_kwargs) -> "DiSaProcessor":
        """The processor that matches a `DiSaConfig`, for a model that has no saved processor: the config's
        `prompt_templates`, an image processor from `DiSaImageProcessor.from_model_config(config,
        **image_processor_kwargs)` (input size `clip_resolution`, the CLIP patch size) and `tokenizer` (the CLIP
        tokenizer of the model's text tower)."""
        image_processor = DiSaImageProcessor.from_model_config(config, **image_processor_kwargs)
        return cls(image_processor, tokenizer, prompt_templates=list(config.prompt_templates))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ProcessorMixin.from_pretrained`; a folder or repo without tokenizer files gets an error naming them
        (the tokenizer loader's own error is about sentencepiece, which is not the problem)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if _has_tokenizer_files(pretrained_model_name_or_path, kwargs):
                raise
            raise OSError(
                f"{pretrained_model_name_or_path} has no tokenizer.json (nor a slow tokenizer's vocab.json): the "
                "DiSa processor needs the CLIP tokenizer. Save it there with `processor.save_pretrained(folder)` "
                "(or `tokenizer.save_pretrained(folder)`), or build the processor from a tokenizer: "
                "`DiSaProcessor(DiSaImageProcessor(), CLIPTokenizer.from_pretrained(clip_id))`."
            ) from error

    def tokenize_class_names(
        self, class_names, return_tensors="pt", allow_shared_prompts: bool = False, **text_kwargs
    ) -> BatchEncoding:
        """Prompts for `class_names` (class-major, P templates each), tokenized (padded to the longest by default;
        `text_kwargs` go to the tokenizer), with the `prompt_templates` used (which the model checks against its
        config). `allow_shared_prompts`: see `configuration_disa.format_prompts`."""
        prompts = format_prompts(class_names, self.prompt_templates, allow_shared_prompts=allow_shared_prompts)
        text_kwargs = {"padding": "longest", **text_kwargs}
        encoding = self.tokenizer(prompts, return_tensors=return_tensors, **text_kwargs)
        encoding["prompt_templates"] = list(self.prompt_templates)
        return encoding

    def __call__(self, images=None, text=None, segmentation_maps=None, **kwargs):
        """
        Args:
            images: one image or a list (see `DiSaImageProcessor`).
            text (`list[str]`): the class vocabulary.
            segmentation_maps: optional class-id maps, one per image (returned as `labels`).
            kwargs: tokenizer / image-processor options, routed by `ProcessorMixin._merge_kwargs`;
                `return_tensors` defaults to `"pt"`. Text side also: `allow_shared_prompts` (`bool`, default False),
                accept class lists in which two classes get the same prompt (see `format_prompts`); only for
                reproducing an evaluation protocol.
        """
        if images is None and text is None:
            raise ValueError("pass `images`, `text` (the class names) or both.")
        if images is None and segmentation_maps is not None:
            raise ValueError("`segmentation_maps` need their `images`.")
        output_kwargs = self._merge_kwargs(
            DiSaProcessorKwargs,
            tokenizer_init_kwargs=self.tokenizer.init_kwargs if self.tokenizer is not None else None,
            **kwargs,
        )
        data = {}
        return_tensors = None
        if images is not None:
            images_kwargs = output_kwargs["images_kwargs"]
            return_tensors = images_kwargs.get("return_tensors")
            data.update(self.image_processor(images, segmentation_maps=segmentation_maps, **images_kwargs))
        if text is not None:
            text_kwargs = dict(output_kwargs["text_kwargs"])
            return_tensors = text_kwargs.pop("return_tensors", return_tensors)
            allow_shared_prompts = bool(text_kwargs.pop("allow_shared_prompts", False))
            data.update(
                self.tokenize_class_names(
                    text, return_tensors=return_tensors, allow_shared_prompts=allow_shared_prompts, **text_kwargs
                )
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def post_process_semantic_segmentation(self, outputs, target_sizes=None, **kwargs):
        """See `DiSaImageProcessor.post_process_semantic_segmentation`."""
        return self.image_processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes, **kwargs)

    @property
    def model_input_names(self):
        return ["pixel_values", "input_ids", "attention_mask", "prompt_templates"]


def _check_templates(prompt_templates) -> list[str]:
    """The processor's templates as a list (None: CAT-Seg's single template), refusing what cannot be one."""
    if prompt_templates is None:
        return [DEFAULT_PROMPT_TEMPLATE]
    if isinstance(prompt_templates, str) or not hasattr(prompt_templates, "__iter__"):
        raise TypeError(
            f"prompt_templates must be a list of strings, got {prompt_templates!r}; pass [{prompt_templates!r}] for "
            "one template."
        )
    templates = list(prompt_templates)
    if not templates or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise ValueError(
            f"prompt_templates must be a non-empty list of strings with one '{{}}' each, got {templates}; use the "
            "model's: `prompt_templates=model.config.prompt_templates`."
        )
    return templates


def _has_tokenizer_files(path, kwargs) -> bool:
    subfolder = kwargs.get("subfolder", "") or ""
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, subfolder, name)) for name in TOKENIZER_FILES)
    lookup = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
    for name in TOKENIZER_FILES:
        try:
            if cached_file(
                path,
                name,
                subfolder=subfolder,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **lookup,
            ):
                return True
        except Exception:  # noqa: BLE001 - an unreachable repo is reported by the original error
            return True
    return False


DiSaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["DiSaProcessor", "DiSaProcessorKwargs", "DiSaTextKwargs"]
