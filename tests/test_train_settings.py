"""training/train.py takes every model and data setting as given, or refuses it: recipe fields that are model config
values keep the model's when unset, `model_config_overrides` apply to presets and saved models alike, settings that
cannot apply are errors, and the processor built for a pretrained CLIP follows the model config (CPU, seconds)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPE = os.path.join(REPO, "configuration", "training", "tiny_test.yaml")
TINY_PRESET = os.path.join(REPO, "configuration", "models", "disa-tiny")

import datasets  # noqa: E402
from test_train_script import CLASSES, make_split  # noqa: E402


def parse(tmp_path, *args):
    import train

    return train.parse_args(["--config", TINY_RECIPE, "--output_dir", str(tmp_path / "out"), *args])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A saved tiny model whose config differs from the recipe defaults: CLIP frozen, 16-bit ignore value."""
    from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation, DiSaProcessor

    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    config = DiSaConfig.from_pretrained(TINY_PRESET, clip_finetune="none", ignore_index=65535)
    DiSaForOpenVocabSegmentation(config).save_pretrained(folder)
    DiSaProcessor.from_pretrained(TINY_PRESET).save_pretrained(folder)
    return str(folder)


def test_saved_model_keeps_its_settings_and_takes_the_overrides(saved_model, tmp_path):
    import train

    from_saved = ("--model_name_or_path", saved_model, "--model_preset", "")
    model, _ = train.build_model_and_processor(parse(tmp_path, *from_saved))
    # settings the recipe does not give stay the saved model's
    assert model.config.clip_finetune == "none" and model.config.ignore_index == 65535
    assert not any(p.requires_grad for p in model.clip.parameters())
    # model_config_overrides apply to a saved model as to a preset
    model, _ = train.build_model_and_processor(
        parse(tmp_path, *from_saved, "--model_config_overrides", "{foreground_ratio: 0.25, clip_finetune: qv}")
    )
    assert model.config.foreground_ratio == 0.25 and model.config.clip_finetune == "qv"
    trainable = {name for name, p in model.clip.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in trainable)
    # the recipe field, when given, replaces the model's value
    model, _ = train.build_model_and_processor(parse(tmp_path, *from_saved, "--ignore_index", "255"))
    assert model.config.ignore_index == 255


def test_ignore_index_override_reaches_the_data_and_the_saved_model(tmp_path):
    import train

    labels16 = make_split(4, 6, label_dtype=np.uint16, ignore=65535)  # 16-bit maps, 65535 = unlabelled
    argv = [
        "--config",
        TINY_RECIPE,
        "--output_dir",
        str(tmp_path / "out"),
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "0",
        "--class_names",
        *CLASSES,
        "--model_config_overrides",
        "{ignore_index: 65535}",
    ]
    res = train.main(argv, train_dataset=labels16)
    assert res["completed_steps"] == 2
    with open(tmp_path / "out" / "config.json") as handle:
        assert json.load(handle)["ignore_index"] == 65535


REFUSED_RECIPES = {
    # a saved model brings its config and weights: a preset (the tiny recipe sets one) or a CLIP cannot apply
    "saved model and preset": (["--model_name_or_path", "{saved}"], "model_preset .* cannot apply"),
    "no model": (["--model_preset", ""], "set model_preset .* or model_name_or_path"),
    # one setting in two places
    "given twice": (
        ["--clip_finetune", "none", "--model_config_overrides", "{{clip_finetune: full}}"],
        "clip_finetune is given twice",
    ),
    # the CLIP checkpoint sets the tower configs
    "tower override": (
        ["--clip_model_name_or_path", "some/clip", "--model_config_overrides", "{{projection_dim: 8}}"],
        r"\['projection_dim'\] cannot apply",
    ),
    # epochs next to a step count (the tiny recipe sets max_train_steps)
    "epochs and steps": (["--num_train_epochs", "1"], "set only one of max_train_steps"),
    # a validation fraction where it cannot carve anything
    "fraction of a stream": (
        ["--validation_fraction", "0.2", "--streaming", "--dataset_name", "x"],
        "validation_fraction carves",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_RECIPES))
def test_recipe_settings_that_cannot_apply_are_refused(case, saved_model, tmp_path):
    args, match = REFUSED_RECIPES[case]
    with pytest.raises(SystemExit, match=match):
        parse(tmp_path, *[arg.format(saved=saved_model) for arg in args])


def test_misspelt_model_config_override_is_refused(tmp_path):
    import train

    # a name close to a setting: DiSaConfig itself refuses it and names the setting meant
    with pytest.raises(
        StrictDataclassClassValidationError, match=r"`fusoin` is not a DiSaConfig setting \(did you mean `fusion`\?\)"
    ):
        train.build_model_and_processor(parse(tmp_path, "--model_config_overrides", "{fusoin: own}"))
    # any other unknown name: transformers would drop it as an unused keyword; the script refuses it
    with pytest.raises(SystemExit, match=r"DiSaConfig has no setting\(s\) \['branch_fusion_style'\]"):
        train.build_model_and_processor(parse(tmp_path, "--model_config_overrides", "{branch_fusion_style: own}"))


def test_toy_world_settings_without_the_toy_world_are_refused(tmp_path):
    import train

    with pytest.raises(SystemExit, match="toy_world settings apply only with dataset_name toy-world"):
        train.main(["--config", TINY_RECIPE, "--output_dir", str(tmp_path / "out"), "--toy_world", "{seed: 1}"])


@pytest.fixture
def disk_dataset(tmp_path):
    folder = str(tmp_path / "disk")
    datasets.DatasetDict({"train": make_split(4, 0), "validation": make_split(2, 1)}).save_to_disk(folder)
    return folder


def test_validation_fraction_next_to_a_validation_split_is_refused(disk_dataset):
    import data as D

    with pytest.raises(D.DataError, match="has the split 'validation'"):
        D.load_raw_splits(disk_dataset, validation_fraction=0.2)


def test_config_name_of_a_save_to_disk_folder_is_refused(disk_dataset):
    import data as D

    with pytest.raises(D.DataError, match="save_to_disk folder, which has no configs"):
        D.load_raw_splits(disk_dataset, dataset_config_name="full")


def test_recipe_data_source_next_to_in_memory_datasets_is_refused(disk_dataset, tmp_path):
    """In-memory datasets replace the recipe's data source, which must then be empty."""
    import train

    with pytest.raises(SystemExit, match="dataset_name / validation_fraction cannot apply"):
        train.main(
            ["--config", TINY_RECIPE, "--output_dir", str(tmp_path / "out"), "--dataset_name", disk_dataset],
            train_dataset=make_split(4, 0),
        )
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def clip_with_patch_14(tmp_path_factory):
    """A tiny pretrained-CLIP folder with ViT-L/14's patch size, its own image statistics and the tiny tokenizer, and a
    preset for it with two prompt templates and no processor (the CAT-Seg presets have none either)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from modeling_disa import DiSaConfig

    tiny = DiSaConfig.from_pretrained(TINY_PRESET)
    vision = {**tiny.vision_config.to_dict(), "patch_size": 14, "image_size": 112}
    clip_dir = tmp_path_factory.mktemp("clip14")
    torch.manual_seed(0)
    clip_config = CLIPConfig(
        text_config=tiny.text_config.to_dict(), vision_config=vision, projection_dim=tiny.projection_dim
    )
    CLIPModel(clip_config).save_pretrained(clip_dir)
    AutoTokenizer.from_pretrained(TINY_PRESET).save_pretrained(clip_dir)
    statistics = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    CLIPImageProcessor(**statistics).save_pretrained(clip_dir)

    values = tiny.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "label_token_ids"):
        values.pop(key, None)
    values.update(vision_config=vision, clip_resolution=112, prompt_templates=["a photo of a {}", "a {} in a scene"])
    preset = tmp_path_factory.mktemp("preset14")
    DiSaConfig(**values).save_pretrained(preset)
    return str(clip_dir), str(preset), statistics


def test_processor_for_a_pretrained_clip_follows_the_model_config(clip_with_patch_14, tmp_path):
    import train

    clip_dir, preset, statistics = clip_with_patch_14
    model, processor = train.build_model_and_processor(
        parse(tmp_path, "--model_preset", preset, "--clip_model_name_or_path", clip_dir)
    )
    config = model.config
    assert processor.prompt_templates == list(config.prompt_templates) == ["a photo of a {}", "a {} in a scene"]
    image_processor = processor.image_processor
    assert image_processor.patch_size == config.vision_config.patch_size == 14
    assert (image_processor.size["height"], image_processor.size["width"]) == (112, 112)
    assert list(image_processor.image_mean) == statistics["image_mean"]
    assert list(image_processor.image_std) == statistics["image_std"]
    # one prompt row per class and template, as the model's text tower expects them
    assert processor(text=["cat", "dog", "sky"])["input_ids"].shape[0] == 3 * 2
    # an image of 15 px is larger than one /14 patch (the /16 default would refuse it)
    assert processor(images=np.zeros((15, 15, 3), np.uint8))["pixel_values"].shape == (1, 3, 112, 112)
    # what the config fixes cannot be passed beside it
    from modeling_disa import DiSaImageProcessor

    with pytest.raises(ValueError, match="come from the model config"):
        DiSaImageProcessor.from_model_config(config, patch_size=16)


MIXED_PRECISION_PROBE = """
import sys
import accelerate
import train

class Probe(Exception):
    pass

class Recorder(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        print("MIXED_PRECISION", self.mixed_precision)
        raise Probe()

accelerate.Accelerator = Recorder
try:
    train.main(sys.argv[1:])
except Probe:
    pass
"""


@pytest.mark.parametrize("recipe_value,expected", [(None, "bf16"), ("no", "no")])
def test_mixed_precision_is_the_launchers_unless_the_recipe_sets_it(tmp_path, recipe_value, expected):
    """`accelerate launch --mixed_precision bf16` (or an accelerate config saying bf16) exports this variable."""
    probe = tmp_path / "probe.py"
    probe.write_text(MIXED_PRECISION_PROBE)
    env = dict(
        os.environ,
        ACCELERATE_MIXED_PRECISION="bf16",
        PYTHONPATH=os.pathsep.join([os.path.join(REPO, "training"), REPO]),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    args = ["--config", TINY_RECIPE, "--output_dir", str(tmp_path / "out")]
    if recipe_value:
        args += ["--mixed_precision", recipe_value]
    proc = subprocess.run(
        [sys.executable, str(probe), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"MIXED_PRECISION {expected}" in proc.stdout


UPGRADE_RECIPE = os.path.join(REPO, "configuration", "training", "upgrade_catseg_to_disa.yaml")


@pytest.fixture(scope="module")
def catseg_model(tmp_path_factory):
    """A saved tiny CAT-Seg-mode model (use_sdm off), as converted official CAT-Seg weights would be."""
    from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation, DiSaProcessor

    folder = tmp_path_factory.mktemp("catseg")
    torch.manual_seed(0)
    DiSaForOpenVocabSegmentation(DiSaConfig.from_pretrained(TINY_PRESET, use_sdm=False)).save_pretrained(folder)
    DiSaProcessor.from_pretrained(TINY_PRESET).save_pretrained(folder)
    return str(folder)


def test_upgrade_trains_only_what_disa_adds(catseg_model, tmp_path):
    """The upgrade path: a CAT-Seg-mode model loaded with use_sdm, only DiSa's parameters trained; the host and CLIP
    leave the run exactly as they came, the new parts move."""
    from safetensors.torch import load_file

    import train
    from modeling_disa import DiSaForOpenVocabSegmentation

    argv = ["--config", TINY_RECIPE, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2"]
    argv += ["--checkpointing_steps", "0", "--class_names", *CLASSES, "--model_name_or_path", catseg_model]
    argv += ["--model_preset", "", "--model_config_overrides", "{use_sdm: true}", "--trainable_parameters", "disa"]
    train.main(argv, train_dataset=make_split(4, 0))
    host = load_file(os.path.join(catseg_model, "model.safetensors"))
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    start = DiSaForOpenVocabSegmentation.from_pretrained(catseg_model, use_sdm=True)
    new = set(start.disa_parameter_names())
    assert new and new.isdisjoint(host)
    for name, tensor in host.items():  # every CAT-Seg tensor, CLIP included, unchanged
        assert torch.equal(trained[name], tensor), name
    started = start.state_dict()
    moved = [name for name in new if not torch.equal(trained[name], started[name])]
    assert len(moved) > len(new) // 2  # the new parts trained (a few can get no gradient in 2 steps)


def test_upgrade_settings_that_cannot_apply_are_refused(catseg_model, tmp_path):
    import train

    from_saved = ("--model_name_or_path", catseg_model, "--model_preset", "", "--trainable_parameters", "disa")
    with pytest.raises(SystemExit, match="this model has none"):  # CAT-Seg mode: nothing DiSa adds to train
        train.build_model_and_processor(parse(tmp_path, *from_saved))
    with pytest.raises(SystemExit, match="clip_finetune 'qv' cannot apply with trainable_parameters 'disa'"):
        train.check_recipe(parse(tmp_path, *from_saved, "--clip_finetune", "qv"))


def test_upgrade_recipe_file_is_the_upgrade_path(catseg_model, tmp_path):
    import train
    from modeling_disa import DiSaForOpenVocabSegmentation

    r = train.parse_args(
        ["--config", UPGRADE_RECIPE, "--model_name_or_path", catseg_model, "--output_dir", str(tmp_path / "o")]
    )
    train.check_recipe(r)
    assert r.trainable_parameters == "all" and r.model_config_overrides == {"use_sdm": True, "use_hrm": True}
    model, _ = train.build_model_and_processor(r)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert model.config.use_sdm and model.config.use_hrm
    # DiSa's parts train, and what CAT-Seg mode trains (its head, CLIP's q/v): the toy world's dev split chose it
    host = DiSaForOpenVocabSegmentation.from_pretrained(catseg_model)
    host_trainable = {n for n, p in host.named_parameters() if p.requires_grad}
    unused = set(model.unused_parameter_names())  # frozen in every mode: no output depends on them
    assert set(model.disa_parameter_names()) - unused <= trainable and host_trainable - unused <= trainable
    assert any(".q_proj." in n for n in trainable) and not any(".k_proj." in n for n in trainable)
