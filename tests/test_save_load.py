"""Serialisation: safetensors round trip, Auto classes, remote code without the package, shape mismatches."""

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_configs import tiny_config
from torch import nn
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


# Upgrading a CAT-Seg-mode checkpoint to DiSa. Background-branch tensors: the `background` twins of the aggregation
# blocks' per-token layers and the spatial layers' background guidance norms; the host twin drops the prefix.
BACKGROUND = re.compile(
    r"^aggregator\.layers\.\d+\."
    r"(spatial\.block_\d\.background\.|spatial\.background_guidance_norm\.|class_aggregation\.background\.)"
)


def host_twin(name: str) -> str:
    return name.replace(".background.", ".").replace(".background_", ".")


def test_catseg_checkpoint_loaded_with_sdm_copies_the_host_into_the_background_branch(saved):
    stored = load_file(saved / "model.safetensors")  # a CAT-Seg-mode checkpoint (use_sdm=False)
    model, info = DiSaForOpenVocabSegmentation.from_pretrained(saved, use_sdm=True, output_loading_info=True)
    state = model.state_dict()
    background = [key for key in state if BACKGROUND.search(key)]
    assert background and set(background) <= set(info["missing_keys"])
    for key in background:
        assert torch.equal(state[key], stored[host_twin(key)]), key
    assert all(torch.equal(state[key], value) for key, value in stored.items())  # the host is the checkpoint's


@pytest.mark.parametrize("overrides", [{}, {"presence_threshold": None}, {"use_hrm": True}])
def test_catseg_checkpoint_loaded_with_sdm_starts_as_catseg(saved, tiny_model, tiny_processor, overrides):
    """The copied background branch with attention over both branches and `fusion="own"` routes tokens between
    two identical branches, and HRM's stages start as the identity, so the upgraded model computes the CAT-Seg
    model's logits at initialisation."""
    torch.manual_seed(0)
    inputs = dict(
        tiny_processor(images=[torch.rand(3, 128, 128) for _ in range(2)], text=["cat", "dog", "sky", "road"])
    )
    disa = DiSaForOpenVocabSegmentation.from_pretrained(saved, use_sdm=True, **overrides)
    assert disa.config.fusion == "own"
    with torch.no_grad():
        out = disa(**inputs, output_saliency=True)
        assert out.foreground_mask.any() and not out.foreground_mask.all()  # tokens do take both branches
        # last-bit tolerance: BLAS results can depend on the alignment of the memory-mapped loaded tensors
        torch.testing.assert_close(out.logits, tiny_model(**inputs).logits, rtol=0, atol=1e-5)


def test_disa_checkpoint_keeps_its_background_branch(tmp_path):
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(tiny_config(use_sdm=True))
    with torch.no_grad():  # a trained background branch differs from its host
        for name, param in model.named_parameters():
            if BACKGROUND.search(name):
                param.add_(torch.randn_like(param))
    model.save_pretrained(tmp_path / "disa")
    stored = load_file(tmp_path / "disa" / "model.safetensors")
    loaded = DiSaForOpenVocabSegmentation.from_pretrained(tmp_path / "disa").state_dict()
    assert loaded.keys() == stored.keys() and all(torch.equal(loaded[k], stored[k]) for k in stored)

    # a checkpoint that lacks part of the branch: only the missing tensors are copied from their hosts
    dropped = {key for key in stored if BACKGROUND.search(key) and key.startswith("aggregator.layers.1.")}
    assert dropped
    (tmp_path / "partial").mkdir()
    shutil.copy(tmp_path / "disa" / "config.json", tmp_path / "partial" / "config.json")
    save_file(
        {k: v for k, v in stored.items() if k not in dropped},
        tmp_path / "partial" / "model.safetensors",
        metadata={"format": "pt"},
    )
    partial = DiSaForOpenVocabSegmentation.from_pretrained(tmp_path / "partial").state_dict()
    for key in stored:
        assert torch.equal(partial[key], stored[host_twin(key)] if key in dropped else stored[key]), key


def test_copying_into_an_offloaded_background_branch_is_refused(saved, tmp_path):
    """Weights offloaded to disk sit on the meta device, where a copy would silently do nothing."""
    top = ("clip", "cost_embedding", "appearance_guidance", "text_guidance", "guidance_upsampler", "decoder", "sdm")
    device_map = {**dict.fromkeys(top, "cpu"), "aggregator": "disk"}
    with pytest.raises(ValueError, match="meta device.*Load without offloading"):
        DiSaForOpenVocabSegmentation.from_pretrained(
            saved, use_sdm=True, device_map=device_map, offload_folder=tmp_path / "offload"
        )


def test_tensors_missing_from_the_checkpoint_follow_the_initialisation_rule(saved):
    """Tensors a CAT-Seg checkpoint lacks other than the background branch (copied from its host, tested above),
    i.e. SDM's presence head, get the model's initialisation, as in a direct build: deterministic ones exactly, drawn
    ones from PyTorch's default range."""
    model, info = DiSaForOpenVocabSegmentation.from_pretrained(saved, use_sdm=True, output_loading_info=True)
    direct = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        direct.append(DiSaForOpenVocabSegmentation(model.config))
    references = [m.state_dict() for m in direct]
    state, modules = model.state_dict(), dict(model.named_modules())
    missing = sorted(key for key in info["missing_keys"] if not BACKGROUND.search(key))
    assert any(key.startswith("sdm.") for key in missing)
    for key in missing:
        value = state[key]
        assert torch.isfinite(value).all(), key
        if torch.equal(references[0][key], references[1][key]):  # not drawn: ones, zeros, ...
            assert torch.equal(value, references[0][key]), key
            continue
        owner = modules[key.rsplit(".", 1)[0]]
        assert isinstance(owner, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)), key
        # kaiming_uniform(a=sqrt(5)) weights and the matching biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1 / math.sqrt(owner.weight[0].numel())
        assert value.abs().max() <= bound and value.ne(0).all(), key
        if value.numel() >= 256:
            assert 0.8 < value.std() / (bound / math.sqrt(3)) < 1.2, key
    # non-persistent buffers are rebuilt, not loaded
    buffers = dict(direct[0].named_buffers())
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in model.named_buffers())
