"""Fixtures shared by the tests (paths and config builders are in tiny_configs.py, a plain module)."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402 - after the offline switches, which the libraries read on import
import torch  # noqa: E402
from tiny_configs import TINY, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return TINY


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
    return tiny_config()


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


@pytest.fixture
def interpolate_sizes(monkeypatch):
    """The number of values of every `F.interpolate` output during the test (the blocks resized at once)."""
    sizes = []
    original = torch.nn.functional.interpolate

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch.nn.functional, "interpolate", recording)
    return sizes
