"""transformers conventions on DiSaForOpenVocabSegmentation: attention dispatch, gradients of every trainable
parameter on every preset, weight initialisation on the from_pretrained path, torch.export, forward arguments and
outputs, and clear errors for bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import PRESET_NAMES, tiny_variant
from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation
from modeling_disa.spatial_aggregation import DiSaWindowAttention
from transformers.models.clip.modeling_clip import CLIPAttention

NAMES = ["cat", "dog", "grass", "sky", "road", "tree"]


@pytest.fixture
def saved_tiny(tmp_path, tiny_config):
    torch.manual_seed(0)
    DiSaForOpenVocabSegmentation(tiny_config).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


class SDPACalls:
    """Counts calls of torch's scaled_dot_product_attention (what transformers' "sdpa" implementation runs)."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = F.scaled_dot_product_attention

        def counting(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)


# ---------------------------------------------------------------------------------------------- 1. attention
def test_attn_implementation_reaches_the_clip_towers_and_the_window_attention(saved_tiny, monkeypatch, pixel_values):
    calls = SDPACalls(monkeypatch)
    config = DiSaConfig.from_pretrained(saved_tiny)
    text_layers, vision_layers = config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers
    swin_blocks = 2 * config.num_aggregation_layers
    # attention calls per forward: every text layer, every vision block but the dense last one, every Swin block
    expected = {
        "eager": 0,
        "sdpa": text_layers + (vision_layers - 1) + swin_blocks,
        "per-tower": text_layers + swin_blocks,  # vision tower eager, the rest SDPA
    }
    outputs = {}
    for name, implementation in (
        ("eager", "eager"),
        ("sdpa", "sdpa"),
        ("per-tower", {"vision_config": "eager", "text_config": "sdpa"}),
    ):
        model = DiSaForOpenVocabSegmentation.from_pretrained(saved_tiny, attn_implementation=implementation)
        clip_attention = [m for m in model.clip.vision_model.modules() if isinstance(m, CLIPAttention)]
        assert {m.config._attn_implementation for m in clip_attention} == {"sdpa" if name == "sdpa" else "eager"}
        calls.count = 0
        with torch.no_grad():
            outputs[name] = model(pixel_values=pixel_values).logits
        assert calls.count == expected[name], name
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["per-tower"], outputs["sdpa"], rtol=1e-4, atol=1e-5)

    # switching after loading reaches the window attention too (it dispatches at every call)
    model = DiSaForOpenVocabSegmentation.from_pretrained(saved_tiny, attn_implementation="eager")
    model.set_attn_implementation("sdpa")
    calls.count = 0
    with torch.no_grad():
        model(pixel_values=pixel_values)
    assert calls.count == expected["sdpa"]
    window = [m for m in model.modules() if isinstance(m, DiSaWindowAttention)]
    assert window and all(m.config._attn_implementation == "sdpa" for m in window)


# ---------------------------------------------------------------------------------------------- 2. gradients
@pytest.mark.parametrize(
    "preset, overrides",
    [(name, {}) for name in PRESET_NAMES]
    + [("disa-vit-b-16", {"clip_finetune": "full"}), ("catseg-vit-b-16", {"clip_finetune": "full"}),
       ("disa-vit-b-16", {"branch_mode": "masked"}), ("disa-vit-b-16", {"fusion": "concat"})],
)
def test_every_trainable_parameter_gets_a_gradient(preset, overrides, tiny_processor):
    """DDP with find_unused_parameters=False (accelerate's default) needs a gradient for every trainable parameter
    in every step: the preset's code paths on tiny CLIP towers, one training step on a tiny batch."""
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(tiny_variant(preset, **overrides)).train()
    inputs = tiny_processor(images=[torch.zeros(3, 128, 128, dtype=torch.uint8)] * 2, text=NAMES)
    labels = torch.randint(0, len(NAMES), (2, 128, 128))
    model(**inputs, labels=labels).loss.backward()
    without = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    assert not without
    assert sum(param.requires_grad for param in model.parameters()) > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in model.unused_parameter_names())


# ---------------------------------------------------------------------------------------------- 3. init
def test_clip_tensors_missing_from_a_checkpoint_get_clips_initialisation(saved_tiny, tiny_config):
    weights = load_file(saved_tiny / "model.safetensors")
    missing = [
        "clip.logit_scale",
        "clip.vision_model.encoder.layers.0.mlp.fc1.weight",
        "clip.vision_model.encoder.layers.1.self_attn.q_proj.weight",
        "clip.text_model.encoder.layers.0.self_attn.out_proj.weight",
        "clip.text_projection.weight",
    ]
    for key in missing:
        weights.pop(key)
    save_file(weights, saved_tiny / "model.safetensors", metadata={"format": "pt"})
    torch.manual_seed(1)
    model = DiSaForOpenVocabSegmentation.from_pretrained(saved_tiny)
    loaded = dict(model.named_parameters())
    assert loaded["clip.logit_scale"].item() == pytest.approx(tiny_config.logit_scale_init_value)
    # CLIPPreTrainedModel._init_weights (models/clip/modeling_clip.py), factor 1
    vision, text = tiny_config.vision_config, tiny_config.text_config
    expected_std = {
        "clip.vision_model.encoder.layers.0.mlp.fc1.weight": (2 * vision.hidden_size) ** -0.5,
        "clip.vision_model.encoder.layers.1.self_attn.q_proj.weight":
            vision.hidden_size**-0.5 * (2 * vision.num_hidden_layers) ** -0.5,
        "clip.text_model.encoder.layers.0.self_attn.out_proj.weight": text.hidden_size**-0.5,
        "clip.text_projection.weight": text.hidden_size**-0.5,
    }
    for key, std in expected_std.items():
        assert loaded[key].std().item() == pytest.approx(std, rel=0.15), key
    # tensors present in the checkpoint are untouched
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key
