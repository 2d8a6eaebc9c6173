"""transformers conventions on DiSaForOpenVocabSegmentation: attention dispatch, gradients of every trainable
parameter on every preset, weight initialisation on the from_pretrained path, torch.export, forward arguments and
outputs, and clear errors for bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_configs import PRESET_NAMES, tiny_variant
from transformers.models.clip.modeling_clip import CLIPAttention

from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation
from modeling_disa.model.spatial_aggregation import DiSaWindowAttention

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
    + [
        ("disa-vit-b-16", {"clip_finetune": "full"}),
        ("catseg-vit-b-16", {"clip_finetune": "full"}),
        ("disa-vit-b-16", {"fusion": "concat"}),
    ],
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
        "clip.vision_model.encoder.layers.1.self_attn.q_proj.weight": vision.hidden_size**-0.5
        * (2 * vision.num_hidden_layers) ** -0.5,
        "clip.text_model.encoder.layers.0.self_attn.out_proj.weight": text.hidden_size**-0.5,
        "clip.text_projection.weight": text.hidden_size**-0.5,
    }
    for key, std in expected_std.items():
        assert loaded[key].std().item() == pytest.approx(std, rel=0.15), key
    # tensors present in the checkpoint are untouched
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------- 4. export
def test_tiny_preset_exports_with_a_dynamic_number_of_classes(tiny_model, tiny_processor):
    pixels = torch.randn(1, 3, 128, 128)
    cap = tiny_model.config.class_cap

    def embeds(count, seed):
        generator = torch.Generator().manual_seed(seed)
        return F.normalize(torch.randn(count, 1, tiny_model.config.projection_dim, generator=generator), dim=-1)

    classes = torch.export.Dim("classes", min=1, max=cap)
    exported = torch.export.export(
        tiny_model,
        (),
        kwargs={"pixel_values": pixels, "text_embeds": embeds(5, 0)},
        dynamic_shapes={"pixel_values": None, "text_embeds": {0: classes}},
    )
    module = exported.module()
    for count in (1, 3, 7, cap):
        text = embeds(count, count)
        with torch.no_grad():
            eager = tiny_model(pixel_values=pixels, text_embeds=text).logits
        got = module(pixel_values=pixels, text_embeds=text).logits
        assert got.shape == (1, count, 32, 32)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)

    # prompt tokens in, with a dynamic number of prompt rows
    def tokens_of(names):  # fixed length: only the number of rows is dynamic
        prompts = [f"A photo of a {name} in the scene" for name in names]
        return dict(tiny_processor.tokenizer(prompts, padding="max_length", max_length=40, return_tensors="pt"))

    tokens = tokens_of(NAMES[:4])
    rows = torch.export.Dim("rows", min=1, max=cap)
    exported = torch.export.export(
        tiny_model,
        (),
        kwargs={"pixel_values": pixels, **tokens},
        dynamic_shapes={"pixel_values": None, "input_ids": {0: rows}, "attention_mask": {0: rows}},
    )
    other = tokens_of(NAMES)
    with torch.no_grad():
        eager = tiny_model(pixel_values=pixels, **other).logits
    torch.testing.assert_close(exported.module()(pixel_values=pixels, **other).logits, eager, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- 5. arguments
def test_unknown_forward_arguments_are_refused(tiny_model, pixel_values):
    labels = torch.zeros(2, 128, 128, dtype=torch.long)
    with pytest.raises(TypeError, match="lables"):
        tiny_model(pixel_values=pixel_values, lables=labels)
    with pytest.raises(TypeError, match="return_loss"):
        tiny_model(pixel_values=pixel_values, return_loss=True)


def test_hidden_states_and_attentions_are_clips_own(saved_tiny, pixel_values):
    model = DiSaForOpenVocabSegmentation.from_pretrained(saved_tiny, attn_implementation="eager")
    vision = model.clip.vision_model
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_hidden_states=True, output_attentions=True)
        reference = vision(
            pixel_values=pixel_values, output_hidden_states=True, output_attentions=True, interpolate_pos_encoding=True
        )
    layers = model.config.vision_config.num_hidden_layers
    states, attentions = out.vision_model_output.hidden_states, out.vision_model_output.attentions
    assert len(states) == layers + 1 and len(attentions) == layers - 1  # the dense last block mixes no tokens
    for got, expected in zip(states[:-1], reference.hidden_states[:-1]):
        torch.testing.assert_close(got, expected)
    for got, expected in zip(attentions, reference.attentions[:-1]):
        torch.testing.assert_close(got, expected)
    assert torch.equal(states[-1], out.vision_model_output.last_hidden_state)
    # the dense block's output projected and post-normalised is the image embedding map
    projected = model.clip.visual_projection(vision.post_layernorm(states[-1]))[:, 1:]
    grid = model.config.grid_size
    torch.testing.assert_close(projected.transpose(1, 2).reshape(2, -1, grid, grid), out.image_embeds)
    # by default nothing extra; as a tuple the nested output becomes a tuple too
    assert model(pixel_values=pixel_values).vision_model_output is None
    as_tuple = model(pixel_values=pixel_values, output_hidden_states=True, return_dict=False)
    # (last_hidden_state, pooler_output, hidden_states), as CLIP's BaseModelOutputWithPooling
    assert isinstance(as_tuple[-1], tuple) and len(as_tuple[-1][2]) == layers + 1
    # hidden states selected by index, as transformers' output recording allows: the others are None
    with torch.no_grad():
        picked = model(pixel_values=pixel_values, output_hidden_states=[0, -1]).vision_model_output.hidden_states
    assert [state is not None for state in picked] == [True] + [False] * (layers - 1) + [True]
    torch.testing.assert_close(picked[0], states[0])
    torch.testing.assert_close(picked[-1], states[-1])
    with pytest.raises(ValueError, match="out of range"):
        model(pixel_values=pixel_values, output_hidden_states=[layers + 1])


def test_output_attentions_under_sdpa_behaves_as_clip(saved_tiny, pixel_values):
    """The default SDPA attention computes no weights: as CLIP's tower, the model runs (no error), returns no
    attention maps, and its outputs are those of eager attention."""
    sdpa = DiSaForOpenVocabSegmentation.from_pretrained(saved_tiny)
    eager = DiSaForOpenVocabSegmentation.from_pretrained(saved_tiny, attn_implementation="eager")
    assert sdpa.clip.vision_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        out = sdpa(pixel_values=pixel_values, output_attentions=True)
        clip_own = sdpa.clip.vision_model(pixel_values=pixel_values, output_attentions=True)
        reference = eager(pixel_values=pixel_values)
    assert out.vision_model_output.attentions == clip_own.attentions == ()
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- 15. bad input
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"labels": torch.zeros(128, 128, dtype=torch.long)}, r"\(batch, height, width\).*unsqueeze\(0\)"),
        ({"labels": torch.zeros(2, 128, 128)}, r"integer class ids.*labels.long\(\)"),
        ({"labels": torch.zeros(1, 128, 128, dtype=torch.long)}, "1 maps but pixel_values holds 2 images"),
        ({"text_embeds": torch.randn(3, 1, 16)}, "width 16 .*projection_dim=32"),
        ({"text_embeds": torch.full((3, 1, 32), float("nan"))}, "NaN"),
        ({"pixel_values": torch.zeros(0, 3, 128, 128)}, "no images"),
        ({"text_embeds": torch.randn(3, 1, 32), "input_ids": torch.ones(3, 5, dtype=torch.long)}, "not both"),
    ],
)
def test_bad_inputs_get_errors_that_name_them(tiny_model, pixel_values, overrides, message):
    inputs = {"pixel_values": pixel_values, "text_embeds": F.normalize(torch.randn(3, 1, 32), dim=-1)}
    inputs.update(overrides)
    with pytest.raises(ValueError, match=message):
        tiny_model(**inputs)


# ---------------------------------------------------------------------------------------------- 16. pickle weights
def test_pickle_only_checkpoint_loads_with_a_warning(saved_tiny, tiny_model):
    weights = load_file(saved_tiny / "model.safetensors")
    torch.save(weights, saved_tiny / "pytorch_model.bin")
    (saved_tiny / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"pickle checkpoint pytorch_model.bin.*save_pretrained"):
        model = DiSaForOpenVocabSegmentation.from_pretrained(saved_tiny)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    # a safetensors folder loads silently
    model.save_pretrained(saved_tiny)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        DiSaForOpenVocabSegmentation.from_pretrained(saved_tiny)
