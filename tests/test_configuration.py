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
        ({"foreground_topk": 0}, "foreground_topk"),
        ({"foreground_topk": 64}, "foreground_topk"),
        ({"hrm_stages": ["pixel", "spectral"]}, "hrm_stages"),
        ({"loss_ignore_mode": "drop"}, "loss_ignore_mode"),
        ({"clip_finetune": "qk"}, "clip_finetune"),
        ({"prompt_templates": ["no placeholder"]}, "prompt_templates"),
        ({"class_pooling_train": [3, 3]}, "class_pooling_train"),
        ({"branch_mode": "parallel"}, "branch_mode"),
        ({"saliency_source": "cam"}, "saliency_source"),
        ({"foreground_topk_mode": "auto"}, "foreground_topk_mode"),
        ({"adaptive_min_ratio": 0.6, "adaptive_max_ratio": 0.5}, "adaptive_min_ratio"),
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
    with pytest.raises(StrictDataclassError, match="did you mean `branch_mode`"):
        AutoConfig.from_pretrained(PRESETS / "disa-tiny", branchmode="masked")
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
