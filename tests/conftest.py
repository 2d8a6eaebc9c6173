import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TINY = REPO / "configuration" / "models" / "disa-tiny"
PRESETS = REPO / "configuration" / "models"
PRESET_NAMES = sorted(p.name for p in PRESETS.iterdir() if (p / "config.json").is_file())


def tiny_variant(preset: str, **overrides):
    """The `preset`'s architecture switches (SDM, HRM, branch mode, fusion, residual and fine-tuning modes, prompt
    templates, whether the class axis is padded) on the tiny preset's CLIP towers and widths, so that every preset's
    code paths run in a CPU test."""
    from modeling_disa import DiSaConfig

    def values(config):
        out = config.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "auto_map"):
            out.pop(key, None)
        return out

    tiny, source = values(DiSaConfig.from_pretrained(TINY)), values(DiSaConfig.from_pretrained(PRESETS / preset))
    switches = {k: v for k, v in source.items() if isinstance(v, (bool, str)) or k in ("hrm_stages", "prompt_templates")}
    tiny.update(switches)
    tiny["class_cap"] = tiny["class_cap"] if source["class_cap"] > 0 else 0
    if len(source["prompt_templates"]) != 1:
        tiny.pop("label_token_ids", None)
    tiny.update(overrides)
    return DiSaConfig(**tiny)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return TINY


@pytest.fixture
def tiny_config():
    from modeling_disa import DiSaConfig

    return DiSaConfig.from_pretrained(TINY)


@pytest.fixture
def tiny_model(tiny_config):
    from modeling_disa import DiSaForOpenVocabSegmentation

    torch.manual_seed(0)
    return DiSaForOpenVocabSegmentation(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_processor():
    from modeling_disa import DiSaProcessor

    return DiSaProcessor.from_pretrained(TINY)


@pytest.fixture
def pixel_values():
    torch.manual_seed(1)
    return torch.randn(2, 3, 128, 128)
