"""DiSa: saliency-aware foreground-background disentangled open-vocabulary segmentation, on CAT-Seg and HF CLIP.

Importing the package registers the classes with the transformers Auto classes, so `AutoModel.from_pretrained`,
`AutoModelForSemanticSegmentation`, `AutoImageProcessor` and `AutoProcessor` resolve `model_type="disa"` folders
without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
    AutoProcessor,
)

from .configuration_disa import DEFAULT_PROMPT_TEMPLATE, DiSaConfig, format_prompts, validate_class_names
from .image_processing_disa import DiSaImageProcessor
from .modeling_disa import DiSaForOpenVocabSegmentation, DiSaPreTrainedModel, DiSaSegmentationOutput
from .pipeline_disa import PIPELINE_TASK, DiSaOpenVocabSegmentationPipeline  # registers the pipeline task
from .processing_disa import DiSaProcessor

AutoConfig.register(DiSaConfig.model_type, DiSaConfig, exist_ok=True)
AutoModel.register(DiSaConfig, DiSaForOpenVocabSegmentation, exist_ok=True)
AutoModelForSemanticSegmentation.register(DiSaConfig, DiSaForOpenVocabSegmentation, exist_ok=True)
AutoImageProcessor.register(DiSaConfig, slow_image_processor_class=DiSaImageProcessor, exist_ok=True)
AutoProcessor.register(DiSaConfig, DiSaProcessor, exist_ok=True)

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "DiSaConfig",
    "DiSaForOpenVocabSegmentation",
    "DiSaImageProcessor",
    "DiSaOpenVocabSegmentationPipeline",
    "DiSaPreTrainedModel",
    "DiSaProcessor",
    "DiSaSegmentationOutput",
    "PIPELINE_TASK",
    "format_prompts",
    "validate_class_names",
]
