"""Optimiser parameter groups (training/optimization.py) against CAT-Seg's `build_optimizer` rule, written out, and
against transformers' weight-decay rule, which the recipe deliberately does not follow."""

import pytest
import torch
from tiny_configs import PRESETS, tiny_config, tiny_variant
from torch import nn
from transformers import Trainer

from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation
from optimization import optimizer_param_groups

LR, CLIP_MULTIPLIER, WEIGHT_DECAY, WEIGHT_DECAY_NORM = 2e-4, 0.01, 1e-4, 0.0

# detectron2's `get_default_optimizer_params` / CAT-Seg's `train_net.py::build_optimizer` norm types
DETECTRON2_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def catseg_build_optimizer_hyperparams(model, lr, clip_multiplier, weight_decay, weight_decay_norm):
    """CAT-Seg's `build_optimizer` loop: modules in order, their own parameters, each parameter once; CLIP modules
    at `lr * clip_multiplier`; norm layers at `weight_decay_norm`, embeddings at `WEIGHT_DECAY_EMBED` (0 in
    CAT-Seg's configs, the recipe's `weight_decay_norm` here); every other parameter (biases included) at
    `weight_decay`. Returns {parameter name: (lr, weight decay)} of the trainable parameters."""
    out, memo = {}, set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in memo:
                continue
            memo.add(param)
            hyper = {"lr": lr, "weight_decay": weight_decay}
            if module_name == "clip" or module_name.startswith("clip."):  # CAT-Seg: "clip_model" in module_name
                hyper["lr"] = lr * clip_multiplier
            if isinstance(module, DETECTRON2_NORM_TYPES):
                hyper["weight_decay"] = weight_decay_norm
            if isinstance(module, nn.Embedding):
                hyper["weight_decay"] = weight_decay_norm
            out[f"{module_name}.{param_name}" if module_name else param_name] = (hyper["lr"], hyper["weight_decay"])
    return out


def our_hyperparams(model):
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer_param_groups(model, LR, CLIP_MULTIPLIER, WEIGHT_DECAY, WEIGHT_DECAY_NORM)
    out = {}
    for group in groups:
        for param in group["params"]:
            assert names[id(param)] not in out, "a parameter in two groups"
            out[names[id(param)]] = (group["lr"], group["weight_decay"])
    return out


def full_size(preset):
    with torch.device("meta"):
        return DiSaForOpenVocabSegmentation(DiSaConfig.from_pretrained(PRESETS / preset))


MODELS = {
    "disa-tiny": lambda: DiSaForOpenVocabSegmentation(tiny_config()),
    # the ViT-B preset's switches (SDM, HRM, ...) on tiny towers, all of CLIP trainable (embeddings and norms too)
    "tiny disa-vit-b-16, full CLIP": lambda: DiSaForOpenVocabSegmentation(
        tiny_variant("disa-vit-b-16", clip_finetune="full")
    ),
    "disa-vit-b-16 (meta)": lambda: full_size("disa-vit-b-16"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_param_groups_follow_catseg_build_optimizer(name):
    model = MODELS[name]()
    ours = our_hyperparams(model)
    reference = catseg_build_optimizer_hyperparams(model, LR, CLIP_MULTIPLIER, WEIGHT_DECAY, WEIGHT_DECAY_NORM)
    assert ours.keys() == reference.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert ours == {key: pytest.approx(value) for key, value in reference.items()}
    kinds = {(lr == pytest.approx(LR * CLIP_MULTIPLIER), wd == WEIGHT_DECAY) for lr, wd in ours.values()}
    assert kinds >= {(True, True), (False, True), (False, False)}  # CLIP, head, head norms
    if "full CLIP" in name:
        assert (True, False) in kinds  # CLIP's norms and embeddings


def test_transformers_decay_rule_differs_from_the_recipe():
    """Why the groups are not built with `Trainer.get_decay_parameter_names`: transformers exempts every bias and
    decays embeddings; CAT-Seg (detectron2) decays biases and exempts embeddings and norm layers (by type) at a
    separate `weight_decay_norm`."""
    model = MODELS["tiny disa-vit-b-16, full CLIP"]()
    ours = our_hyperparams(model)
    transformers_decayed = set(Trainer.get_decay_parameter_names(None, model)) & ours.keys()
    ours_decayed = {name for name, (_, wd) in ours.items() if wd == WEIGHT_DECAY}
    layers = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    biases = {n for n in ours if n.endswith(".bias") and isinstance(model.get_submodule(n.rsplit(".", 1)[0]), layers)}
    embeddings = {n for n in ours if isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.Embedding)}
    assert biases and biases <= ours_decayed and not biases & transformers_decayed
    assert embeddings and not embeddings & ours_decayed and embeddings <= transformers_decayed
