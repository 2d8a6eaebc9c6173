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

from . import model
from .model import (  # importing the pipeline module registers the pipeline task
    DEFAULT_PROMPT_TEMPLATE,
    PAPER_SDM_SETTINGS,
    PIPELINE_TASK,
    DenseCLIPFeatures,
    DiSaConfig,
    DiSaForOpenVocabSegmentation,
    DiSaImageProcessor,
    DiSaOpenVocabSegmentationPipeline,
    DiSaPreTrainedModel,
    DiSaProcessor,
    DiSaSegmentationOutput,
    check_inference_dtype,
    compile_for_inference,
    compile_settings,
    cosine_cost_volume,
    cpu_supports_dtype,
    dense_clip_features,
    format_prompts,
    validate_class_names,
)

AutoConfig.register(DiSaConfig.model_type, DiSaConfig, exist_ok=True)
AutoModel.register(DiSaConfig, DiSaForOpenVocabSegmentation, exist_ok=True)
AutoModelForSemanticSegmentation.register(DiSaConfig, DiSaForOpenVocabSegmentation, exist_ok=True)
AutoImageProcessor.register(DiSaConfig, slow_image_processor_class=DiSaImageProcessor, exist_ok=True)
AutoProcessor.register(DiSaConfig, DiSaProcessor, exist_ok=True)

# the public API is the model folder's (the registrations above are the only thing this level adds)
__all__ = list(model.__all__)
