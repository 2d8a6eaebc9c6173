import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TINY = REPO / "configuration" / "models" / "disa-tiny"
PRESETS = REPO / "configuration" / "models"


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
