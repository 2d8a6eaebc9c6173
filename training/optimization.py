"""Optimiser recipe of CAT-Seg training: AdamW parameter groups (CLIP at a reduced learning rate, no weight decay on
normalisation layers and embeddings)."""

from __future__ import annotations

from torch import nn

# The groups follow CAT-Seg's `build_optimizer` (detectron2's rule), not transformers' `Trainer` rule
# (`get_parameter_names` / `Trainer.get_decay_parameter_names`): transformers exempts every bias from weight decay
# and decays embeddings, while CAT-Seg decays the biases of linear and conv layers, exempts normalisation layers and
# embeddings by module type, and gives them their own value (`weight_decay_norm`, WEIGHT_DECAY_NORM /
# WEIGHT_DECAY_EMBED there). Using transformers' rule would change which parameters decay, so the grouping stays
# written out; tests/test_optimization.py pins it against CAT-Seg's loop.
NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding)


def optimizer_param_groups(
    model: nn.Module,
    learning_rate: float,
    clip_lr_multiplier: float = 0.01,
    weight_decay: float = 1e-4,
    weight_decay_norm: float = 0.0,
) -> list[dict]:
    """AdamW parameter groups of the CAT-Seg recipe for a DiSa model.

    Args:
        model: a `DiSaForOpenVocabSegmentation` (its CLIP parameters are named `clip.*`).
        learning_rate: learning rate of the head (every non-CLIP parameter).
        clip_lr_multiplier: CLIP learning rate = `learning_rate * clip_lr_multiplier`.
        weight_decay: decay of the other trainable parameters.
        weight_decay_norm: decay of LayerNorm / GroupNorm / Embedding parameters.

    Returns:
        Up to four groups named `clip`, `clip_no_decay`, `head`, `head_no_decay` (frozen parameters are left out).
    """
    no_decay = {id(p) for m in model.modules() if isinstance(m, NO_DECAY_TYPES) for p in m.parameters(recurse=False)}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "clip" if name.startswith("clip.") else "head"
        decay = id(param) not in no_decay
        key = part if decay else f"{part}_no_decay"
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": learning_rate * (clip_lr_multiplier if part == "clip" else 1.0),
                "weight_decay": weight_decay if decay else weight_decay_norm,
            },
        )
        group["params"].append(param)
    return list(groups.values())
