"""Serialisation: safetensors round trip, Auto classes, remote code without the package, shape mismatches."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, AutoProcessor

from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation, DiSaImageProcessor, DiSaProcessor


@pytest.fixture
def saved(tmp_path, tiny_model, tiny_processor):
    folder = tmp_path / "disa"
    tiny_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


def test_save_writes_safetensors_config_auto_map_and_code(saved, tiny_model):
    files = {p.name for p in saved.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    for module in (
        "configuration_disa.py",
        "modeling_disa.py",
        "cost_volume.py",
        "spatial_aggregation.py",
        "class_aggregation.py",
        "decoder.py",
        "clip_dense_features.py",
        "losses.py",
        "processing_disa.py",
        "image_processing_disa.py",
    ):
        assert module in files, module
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_disa.DiSaConfig",
        "AutoModel": "modeling_disa.DiSaForOpenVocabSegmentation",
        "AutoModelForSemanticSegmentation": "modeling_disa.DiSaForOpenVocabSegmentation",
    }
    stored = load_file(saved / "model.safetensors")
    state = tiny_model.state_dict()
    assert stored.keys() == state.keys()
    assert all(torch.equal(stored[k], state[k]) for k in state)


def test_round_trip_is_bit_identical(saved, tiny_model, pixel_values):
    again = DiSaForOpenVocabSegmentation.from_pretrained(saved, dtype=torch.float32)
    assert not again.training
    a, b = tiny_model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, p in again.named_parameters() if p.requires_grad] == [
        n for n, p in tiny_model.named_parameters() if p.requires_grad
    ]
    with torch.no_grad():
        # BLAS results can depend on the alignment of the memory-mapped loaded tensors: last-bit tolerance only
        torch.testing.assert_close(
            again(pixel_values=pixel_values).logits, tiny_model(pixel_values=pixel_values).logits, rtol=0, atol=1e-5
        )


def test_auto_classes_resolve_the_folder(saved, tiny_model, pixel_values):
    assert isinstance(AutoConfig.from_pretrained(saved), DiSaConfig)
    for auto in (AutoModel, AutoModelForSemanticSegmentation):
        model = auto.from_pretrained(saved, dtype=torch.float32)
        assert isinstance(model, DiSaForOpenVocabSegmentation)
    assert isinstance(AutoImageProcessor.from_pretrained(saved), DiSaImageProcessor)
    processor = AutoProcessor.from_pretrained(saved)
    assert isinstance(processor, DiSaProcessor)
    inputs = processor(images=torch.zeros(3, 60, 60, dtype=torch.uint8), text=["cat", "sky"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, tiny_model(**inputs).logits)


def test_remote_code_loads_without_the_package(saved, tiny_model, tiny_processor, tmp_path):
    inputs = tiny_processor(images=torch.zeros(3, 60, 60, dtype=torch.uint8), text=["cat", "sky"])
    with torch.no_grad():
        expected = tiny_model(**inputs).logits
    torch.save({"expected": expected, **dict(inputs)}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_disa"] = None  # make `import modeling_disa` fail in this process
        try:
            import modeling_disa
        except ImportError:
            pass
        else:
            raise SystemExit("the package is importable")
        import torch
        from transformers import AutoModel, AutoProcessor, AutoModelForSemanticSegmentation
        folder = {str(saved)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        data = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        inputs = processor(images=torch.zeros(3, 60, 60, dtype=torch.uint8), text=["cat", "sky"])
        assert torch.equal(inputs["input_ids"], data["input_ids"])
        with torch.no_grad():
            logits = model(**inputs).logits
        torch.testing.assert_close(logits, data["expected"])
        print("REMOTE", type(model).__module__)
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE transformers_modules" in result.stdout


def test_mismatched_shapes_name_the_keys(saved, tiny_config):
    values = tiny_config.to_dict()
    for key in ("model_type", "transformers_version"):
        values.pop(key, None)
    values["hidden_dim"] = 48
    with pytest.raises(
        ValueError,
        match=r"aggregator\.layers\.0\.class_aggregation\.attention\.k\.bias: checkpoint \(32,\) vs model \(48,\)",
    ):
        DiSaForOpenVocabSegmentation.from_pretrained(saved, config=DiSaConfig(**values))
