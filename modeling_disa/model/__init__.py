"""The model as it ships to the Hub: `save_pretrained` copies these files as remote code (`trust_remote_code=True`),
so they use single-dot imports only and import nothing else of this package (evaluation, Hub tooling, conversion and
visualisation live beside this folder and import from it, never the other way)."""

from .clip_dense_features import DenseCLIPFeatures, dense_clip_features
from .configuration_disa import (
    DEFAULT_PROMPT_TEMPLATE,
    PAPER_SDM_SETTINGS,
    DiSaConfig,
    format_prompts,
    validate_class_names,
)
from .cost_volume import cosine_cost_volume
from .image_processing_disa import DiSaImageProcessor
from .inference_options import check_inference_dtype, compile_for_inference, compile_settings, cpu_supports_dtype
from .modeling_disa import DiSaForOpenVocabSegmentation, DiSaPreTrainedModel, DiSaSegmentationOutput
from .pipeline_disa import PIPELINE_TASK, DiSaOpenVocabSegmentationPipeline
from .processing_disa import DiSaProcessor

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "DenseCLIPFeatures",
    "DiSaConfig",
    "DiSaForOpenVocabSegmentation",
    "DiSaImageProcessor",
    "DiSaOpenVocabSegmentationPipeline",
    "DiSaPreTrainedModel",
    "DiSaProcessor",
    "DiSaSegmentationOutput",
    "PAPER_SDM_SETTINGS",
    "PIPELINE_TASK",
    "check_inference_dtype",
    "compile_for_inference",
    "compile_settings",
    "cosine_cost_volume",
    "cpu_supports_dtype",
    "dense_clip_features",
    "format_prompts",
    "validate_class_names",
]
