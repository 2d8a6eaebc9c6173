import json

import pytest
from huggingface_hub.errors import StrictDataclassError
from tiny_configs import PRESETS

from modeling_disa import DiSaConfig


@pytest.mark.parametrize(
    "name, resolution, patch, guidance, proj",
    [
        ("catseg-vit-b-16", 384, 16, [3, 7], 512),
        ("catseg-vit-l-14-336", 336, 14, [7, 15], 768),
        ("disa-vit-b-16", 384, 16, [3, 7], 512),
        ("disa-vit-l-14-336", 336, 14, [7, 15], 768),
        ("disa-paper-vit-b-16", 384, 16, [3, 7], 512),
        ("disa-paper-vit-l-14-336", 336, 14, [7, 15], 768),
        ("disa-tiny", 128, 16, [1, 2], 32),
    ],
)
def test_presets_load_with_catseg_geometry(name, resolution, patch, guidance, proj):
    config = DiSaConfig.from_pretrained(PRESETS / name)
    assert config.model_type == "disa"
    assert config.clip_resolution == resolution
    assert config.vision_config.patch_size == patch
    assert list(config.guidance_layers) == guidance
    assert config.projection_dim == proj
    if name != "disa-tiny":
        assert config.grid_size == 24
        head = (config.hidden_dim, config.window_size, config.num_aggregation_layers, config.class_cap)
        assert head == (128, 12, 2, 256)
        assert list(config.prompt_templates) == ["A photo of a {} in the scene"]
        disa = name.startswith("disa-")
        assert config.use_sdm == disa and config.use_hrm == disa


@pytest.mark.parametrize("name", ["disa-paper-vit-b-16", "disa-paper-vit-l-14-336"])
def test_paper_presets_hold_the_literal_reading_of_sdm(name):
    """The paper's SDM: ITM cross-attention over CLIP tokens with Grad-CAM saliency, k = 96 foreground tokens of 576
    for every class (reviewer R4: "k=96 is a fixed value"), a weighted aggregation of the two branches; the rest of
    the config is the shipped preset's."""
    config = DiSaConfig.from_pretrained(PRESETS / name)
    assert config.use_sdm and config.use_hrm
    assert config.saliency_source == "gradcam" and config.fusion == "weighted"
    assert config.foreground_topk_mode == "fixed" and config.presence_threshold is None
    assert config.grid_size**2 == 576 and config.foreground_k(576) == 96
    shipped = DiSaConfig.from_pretrained(PRESETS / name.replace("disa-paper-", "disa-")).to_dict()
    paper = config.to_dict()
    differing = {key for key in shipped if shipped[key] != paper[key]}
    assert differing == {"saliency_source", "foreground_topk_mode", "presence_threshold", "fusion"}


def test_round_trip_keeps_every_field(tmp_path):
    config = DiSaConfig.from_pretrained(PRESETS / "disa-tiny")
    config.save_pretrained(tmp_path)
    again = DiSaConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["text_config"]["model_type"] == "clip_text_model"
    assert saved["vision_config"]["model_type"] == "clip_vision_model"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"window_size": 5}, "window_size"),
        ({"guidance_layers": [1, 3]}, "guidance_layers"),
        ({"fusion": "average"}, "fusion"),
        ({"itm_loss_weight": -0.5}, "itm_loss_weight"),
        ({"foreground_ratio": 1.0}, "foreground_ratio"),
        ({"hrm_stages": ["pixel", "spectral"]}, "hrm_stages"),
        ({"loss_ignore_mode": "drop"}, "loss_ignore_mode"),
        ({"clip_finetune": "qk"}, "clip_finetune"),
        ({"prompt_templates": ["no placeholder"]}, "prompt_templates"),
        ({"class_pooling_train": [3, 3]}, "class_pooling_train"),
        ({"saliency_source": "cam"}, "saliency_source"),
        ({"foreground_topk_mode": "auto"}, "foreground_topk_mode"),
        ({"use_sdm": True, "fusion": "residual"}, "fusion='residual'.*retired"),
        ({"use_sdm": True, "sdm_num_heads": 5}, "sdm_num_heads"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(overrides, field):
    values = DiSaConfig.from_pretrained(PRESETS / "disa-tiny").to_dict()
    for key in ("model_type", "transformers_version"):
        values.pop(key, None)
    values.update(overrides)
    with pytest.raises(StrictDataclassError, match=field):
        DiSaConfig(**values)


def test_wrong_type_is_rejected():
    with pytest.raises(StrictDataclassError, match="hidden_dim"):
        DiSaConfig(hidden_dim="128")


def test_foreground_k_scales_with_grid():
    config = DiSaConfig.from_pretrained(PRESETS / "disa-vit-b-16")
    assert config.foreground_k(576) == 96
    assert config.foreground_k(64) == round(64 / 6)


def test_packaged_tiny_preset_is_the_configuration_preset():
    """modeling_disa/presets/disa-tiny (package data read by `python -m modeling_disa.demo`) is the copy that
    `python training/make_presets.py` writes of configuration/models/disa-tiny: the same files, byte for byte."""
    from importlib.resources import files

    packaged = files("modeling_disa").joinpath("presets", "disa-tiny")
    source = PRESETS / "disa-tiny"
    names = sorted(p.name for p in source.iterdir())
    assert sorted(p.name for p in packaged.iterdir()) == names and "config.json" in names
    for name in names:
        assert packaged.joinpath(name).read_bytes() == (source / name).read_bytes(), name


# ---------------------------------------------------------------------- every way of making a config validates
def _tiny_values():
    values = DiSaConfig.from_pretrained(PRESETS / "disa-tiny").to_dict()
    for key in ("model_type", "transformers_version"):
        values.pop(key)
    return values


INVALID_KEYWORDS = [
    ({"use_sdm": True, "fusion": "nonsense"}, "fusion"),
    ({"branch_mode": "dual"}, "branch_mode"),
    ({"branch_mode": "routed"}, "`branch_mode` was retired"),
    ({"window_size": 5}, "window_size"),
]


@pytest.mark.parametrize("overrides, field", INVALID_KEYWORDS)
def test_from_pretrained_keywords_are_validated(overrides, field):
    with pytest.raises(StrictDataclassError, match=field):
        DiSaConfig.from_pretrained(PRESETS / "disa-tiny", **overrides)
    # as `PreTrainedModel.from_pretrained` calls it
    with pytest.raises(StrictDataclassError, match=field):
        DiSaConfig.from_pretrained(PRESETS / "disa-tiny", return_unused_kwargs=True, **overrides)


@pytest.mark.parametrize("overrides, field", INVALID_KEYWORDS)
def test_from_dict_keywords_are_validated(overrides, field):
    with pytest.raises(StrictDataclassError, match=field):
        DiSaConfig.from_dict(_tiny_values(), **overrides)


@pytest.mark.parametrize("overrides, field", INVALID_KEYWORDS)
def test_auto_config_keywords_are_validated(overrides, field):
    from transformers import AutoConfig

    with pytest.raises(StrictDataclassError, match=field):
        AutoConfig.from_pretrained(PRESETS / "disa-tiny", **overrides)


def test_keywords_are_applied_together_with_the_stored_values(tmp_path):
    """A keyword is checked with the other keywords, not against the stored value it replaces: switching a stored
    cost-head config to the CLIP-width head with its own head count is one valid change."""
    config = DiSaConfig.from_pretrained(PRESETS / "disa-tiny", saliency_source="gradcam", sdm_num_heads=4)
    assert (config.saliency_source, config.sdm_num_heads) == ("gradcam", 4)
    config.save_pretrained(tmp_path)
    back = DiSaConfig.from_pretrained(tmp_path, saliency_source="cost", sdm_num_heads=8)
    assert (back.saliency_source, back.sdm_num_heads) == ("cost", 8)


@pytest.mark.parametrize("attribute, value", [("fusion", "nonsense"), ("branch_mode", "dual"), ("fuson", "sum")])
def test_attribute_assignment_is_validated_before_a_model_is_built(attribute, value):
    from modeling_disa import DiSaForOpenVocabSegmentation

    config = DiSaConfig.from_pretrained(PRESETS / "disa-tiny", use_sdm=True)
    setattr(config, attribute, value)
    with pytest.raises(StrictDataclassError, match=attribute):
        DiSaForOpenVocabSegmentation(config)


def test_misspelled_settings_are_refused_on_every_path():
    from transformers import AutoConfig

    with pytest.raises(StrictDataclassError, match="did you mean `fusion`"):
        DiSaConfig(fuson="sum")
    with pytest.raises(StrictDataclassError, match="did you mean `fusion`"):
        DiSaConfig.from_pretrained(PRESETS / "disa-tiny", fuson="sum")
    with pytest.raises(StrictDataclassError, match="did you mean `use_sdm`"):
        DiSaConfig.from_pretrained(PRESETS / "disa-tiny", use_sdn=True, return_unused_kwargs=True)
    with pytest.raises(StrictDataclassError, match="did you mean `sdm_num_heads`"):
        DiSaConfig.from_dict(_tiny_values(), sdm_heads=4)
    with pytest.raises(StrictDataclassError, match="`branchmode` is not a DiSaConfig setting"):
        AutoConfig.from_pretrained(PRESETS / "disa-tiny", branchmode="masked")  # close to a retired setting
    with pytest.raises(StrictDataclassError, match="sdm_temperature"):
        DiSaConfig(sdm_temperature=2.0)  # in DiSa's `sdm_` namespace without being a setting


def test_keywords_of_other_loaders_are_left_to_them():
    """`AutoTokenizer`, `AutoImageProcessor` and `PreTrainedModel.from_pretrained` pass their own keywords through
    the config's `from_pretrained`: those are returned unused (or dropped), as transformers does, not refused."""
    others = {
        "use_fast": True,
        "model_max_length": 77,
        "size": {"height": 128, "width": 128},
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "key_mapping": None,
        "something_else": 1,
    }
    config, unused = DiSaConfig.from_pretrained(PRESETS / "disa-tiny", return_unused_kwargs=True, **others)
    assert unused == others
    assert DiSaConfig.from_pretrained(PRESETS / "disa-tiny", **others).to_dict() == config.to_dict()
    # transformers' own config keywords are applied
    config = DiSaConfig.from_pretrained(PRESETS / "disa-tiny", attn_implementation="eager", output_hidden_states=True)
    assert config._attn_implementation == "eager" and config.output_hidden_states is True


# ---------------------------------------------------------------------- settings that never acted
def _old_config_file(folder, **extra):
    """The tiny preset's config.json as an older version saved it, with `extra` keys."""
    data = json.loads((PRESETS / "disa-tiny" / "config.json").read_text())
    data.update(extra)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("key, value", [("initializer_range", 0.02), ("initializer_factor", 1.0)])
def test_removed_initializer_settings_are_refused_when_given(key, value):
    assert key not in DiSaConfig().to_dict()
    with pytest.raises(StrictDataclassError, match=key):
        DiSaConfig(**{key: value})
    with pytest.raises(StrictDataclassError, match=key):
        DiSaConfig.from_pretrained(PRESETS / "disa-tiny", **{key: value})


def test_old_config_with_removed_settings_loads_with_a_warning(tmp_path, caplog):
    from transformers import AutoConfig

    old = _old_config_file(tmp_path / "old", initializer_range=0.02, initializer_factor=1.0)
    current = DiSaConfig.from_pretrained(PRESETS / "disa-tiny").to_diff_dict()
    loaders = {
        "from_pretrained": lambda: DiSaConfig.from_pretrained(old),
        "auto": lambda: AutoConfig.from_pretrained(old),
        "from_json_file": lambda: DiSaConfig.from_json_file(old / "config.json"),
    }
    for name, load in loaders.items():
        caplog.clear()
        with caplog.at_level("WARNING"):
            config = load()
        assert "initializer_range" in caplog.text and "initializer_factor" in caplog.text, name
        assert not hasattr(config, "initializer_range") and not hasattr(config, "initializer_factor"), name
        assert config.to_diff_dict() == current, name
    config.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "initializer_range" not in saved and "initializer_factor" not in saved
    # the CLIP towers' own initialisation settings are theirs and stay
    assert saved["vision_config"]["initializer_range"] == 0.02


@pytest.mark.parametrize("key, value", [("sdm_num_heads", 4), ("sdm_mlp_ratio", 2)])
def test_clip_width_sdm_settings_are_refused_with_the_cost_head(key, value):
    with pytest.raises(StrictDataclassError, match=rf"{key}={value}.*saliency_source"):
        DiSaConfig(**{key: value})
    with pytest.raises(StrictDataclassError, match=key):
        DiSaConfig.from_pretrained(PRESETS / "disa-tiny", use_sdm=True, **{key: value})
    for source in ("gradcam", "attention"):
        assert getattr(DiSaConfig(saliency_source=source, **{key: value}), key) == value


@pytest.mark.parametrize("heads, ratio", [(2, 1), (8, 3)])
def test_clip_width_sdm_settings_act_with_the_clip_width_head(heads, ratio):
    """sdm_num_heads splits the CLIP-width cross-attention into that many attention maps; sdm_mlp_ratio sets the
    width of its MLP."""
    import torch

    from modeling_disa import DiSaForOpenVocabSegmentation

    config = DiSaConfig.from_pretrained(
        PRESETS / "disa-tiny", use_sdm=True, saliency_source="gradcam", sdm_num_heads=heads, sdm_mlp_ratio=ratio
    )
    model = DiSaForOpenVocabSegmentation(config).eval()
    width = config.vision_config.hidden_size
    assert model.sdm.itm.fc1.weight.shape == (width * ratio, width)
    queries, tokens = torch.randn(2, 3, config.projection_dim), torch.randn(2, 64, width)
    _, attention, values = model.sdm.itm.attention(queries, tokens)
    assert attention.shape == (2, heads, 3, 64) and values.shape == (2, heads, 64, width // heads)


def test_old_cost_head_config_with_clip_width_settings_loads(tmp_path, caplog):
    """Older presets stored sdm_num_heads=4 with the cost head, where it never acted: such a file loads with a
    warning and the default; it keeps its value when the keywords switch to the head that reads it."""
    old = _old_config_file(tmp_path / "old", saliency_source="cost", sdm_num_heads=4)
    with caplog.at_level("WARNING"):
        config = DiSaConfig.from_pretrained(old)
    assert "sdm_num_heads=4" in caplog.text
    assert config.sdm_num_heads == 8
    assert DiSaConfig.from_pretrained(old, saliency_source="gradcam").sdm_num_heads == 4


def test_clip_finetuning_mode_is_checked_where_it_is_applied():
    """`configure_clip_finetuning` is the second door for `clip_finetune`: an unknown mode must not run as "qv"."""
    import torch

    from modeling_disa import DiSaForOpenVocabSegmentation

    with torch.device("meta"):
        model = DiSaForOpenVocabSegmentation(DiSaConfig.from_pretrained(PRESETS / "disa-tiny"))
    with pytest.raises(ValueError, match="clip_finetune.*'qk'"):
        model.configure_clip_finetuning("qk")
    assert model.config.clip_finetune == "qv"
    model.configure_clip_finetuning("none")
    assert model.config.clip_finetune == "none" and not any(p.requires_grad for p in model.clip.parameters())


# ---------------------------------------------------------------------- retired ablation settings
# Every retired setting at the value whose behaviour stayed (the defaults of the last version that had them).
RETIRED_AT_KEPT_VALUES = {
    "sdm_input_gradient_scale": 0.0,
    "saliency_target": "predicted_logit",
    "foreground_topk": None,
    "adaptive_saliency_mass": 0.5,
    "adaptive_min_ratio": 1 / 24,
    "adaptive_max_ratio": 0.5,
    "branch_mode": "routed",
    "branch_attention": "shared",
    "sdm_background_init": "copy",
    "hrm_after_aggregation": True,
    "hrm_at_decoder": True,
    "hrm_reduction": 4,
}
# A value of each that asked for a behaviour that was removed (the first SDM design and the ablation variants).
RETIRED_BEHAVIOURS = [
    ("sdm_input_gradient_scale", 1.0),
    ("saliency_target", "predicted_probability"),
    ("foreground_topk", 64),
    ("adaptive_saliency_mass", 0.9),
    ("adaptive_min_ratio", 0.1),
    ("adaptive_max_ratio", 0.9),
    ("branch_mode", "masked"),
    ("branch_attention", "restricted"),
    ("sdm_background_init", "independent"),
    ("hrm_after_aggregation", False),
    ("hrm_at_decoder", False),
    ("hrm_reduction", 2),
]


def _loaders(folder):
    from transformers import AutoConfig

    return {
        "from_pretrained": lambda **kw: DiSaConfig.from_pretrained(folder, **kw),
        "auto": lambda **kw: AutoConfig.from_pretrained(folder, **kw),
        "from_json_file": lambda **kw: DiSaConfig.from_json_file(folder / "config.json"),
    }


def test_old_config_with_retired_settings_at_the_kept_behaviour_loads_with_a_warning(tmp_path, caplog):
    """A config saved before the settings were retired, holding the values whose behaviour stayed, loads as today's
    config with the same switches, and the warning names every dropped key."""
    import torch

    from modeling_disa import DiSaForOpenVocabSegmentation

    old = _old_config_file(tmp_path / "old", use_sdm=True, use_hrm=True, **RETIRED_AT_KEPT_VALUES)
    current = DiSaConfig.from_pretrained(PRESETS / "disa-tiny", use_sdm=True, use_hrm=True)
    for name, load in _loaders(old).items():
        caplog.clear()
        with caplog.at_level("WARNING"):
            config = load()
        for key in RETIRED_AT_KEPT_VALUES:
            assert key in caplog.text, (name, key)
            assert not hasattr(config, key), (name, key)
        assert config.to_diff_dict() == current.to_diff_dict(), name
    # and it builds the same model: same weights from the same seed, same logits
    outputs = []
    for config in (DiSaConfig.from_pretrained(old), current):
        torch.manual_seed(0)
        model = DiSaForOpenVocabSegmentation(config).eval()
        generator = torch.Generator().manual_seed(1)
        pixels = torch.randn(1, 3, 128, 128, generator=generator)
        ids = torch.randint(3, 60, (3, 6), generator=generator)
        with torch.no_grad():
            outputs.append(model(pixel_values=pixels, input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    config.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert not set(RETIRED_AT_KEPT_VALUES) & set(saved)


@pytest.mark.parametrize("key, value", RETIRED_BEHAVIOURS)
def test_old_config_asking_for_a_retired_behaviour_is_refused(tmp_path, key, value):
    """A retired setting whose stored value asked for a behaviour that is gone is refused, naming the key and its
    value, on every loading path, never replaced by today's behaviour."""
    old = _old_config_file(
        tmp_path / "old", use_sdm=True, use_hrm=True, foreground_topk_mode="adaptive", **{key: value}
    )
    for name, load in _loaders(old).items():
        with pytest.raises(ValueError, match=rf"retired: `{key}={value!r}`"):
            load()


def test_old_config_asking_for_retired_fusion_is_refused(tmp_path):
    old = _old_config_file(tmp_path / "old", use_sdm=True, fusion="residual")
    for name, load in _loaders(old).items():
        with pytest.raises(StrictDataclassError, match="fusion='residual'.*retired"):
            load()


def test_retired_settings_that_could_not_act_load_and_act_again_only_where_refused(tmp_path, caplog):
    """A CAT-Seg-mode config saved when the first SDM design's switches were the defaults carries values that never
    acted without SDM / HRM (or, for the adaptive-k knobs, with fixed k): it loads with a warning. Switching SDM on
    at load would make them act, so that is refused."""
    catseg = _old_config_file(
        tmp_path / "catseg",
        use_sdm=False,
        use_hrm=False,
        sdm_input_gradient_scale=1.0,
        branch_attention="restricted",
        sdm_background_init="independent",
        hrm_reduction=2,
    )
    with caplog.at_level("WARNING"):
        config = DiSaConfig.from_pretrained(catseg)
    assert "branch_attention='restricted'" in caplog.text
    assert config.to_diff_dict() == DiSaConfig.from_pretrained(PRESETS / "disa-tiny").to_diff_dict()
    with pytest.raises(ValueError, match="retired: `sdm_input_gradient_scale=1.0`.*branch_attention='restricted'"):
        DiSaConfig.from_pretrained(catseg, use_sdm=True)
    with pytest.raises(ValueError, match="retired: `hrm_reduction=2`"):
        DiSaConfig.from_pretrained(catseg, use_hrm=True)
    fixed = _old_config_file(
        tmp_path / "fixed", use_sdm=True, foreground_topk_mode="fixed", adaptive_saliency_mass=0.9
    )
    assert DiSaConfig.from_pretrained(fixed).foreground_topk_mode == "fixed"
    with pytest.raises(ValueError, match="retired: `adaptive_saliency_mass=0.9`"):
        DiSaConfig.from_pretrained(fixed, foreground_topk_mode="adaptive")


@pytest.mark.parametrize("key", sorted(RETIRED_AT_KEPT_VALUES))
def test_retired_settings_are_refused_when_given_anew(key):
    """Only stored configs get the loading rule: a retired setting passed to the constructor or as a keyword is
    refused, even at the value whose behaviour stayed (it would be a setting with no effect)."""
    value = RETIRED_AT_KEPT_VALUES[key]
    with pytest.raises(StrictDataclassError, match=f"`{key}` was retired"):
        DiSaConfig(**{key: value})
    with pytest.raises(StrictDataclassError, match=f"`{key}` was retired"):
        DiSaConfig.from_pretrained(PRESETS / "disa-tiny", **{key: value})
