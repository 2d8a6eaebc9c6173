"""Pinned outputs of `disa-tiny` (seed-fixed weights and inputs) in CAT-Seg mode and in DiSa modes, as transformers'
integration tests pin an `expected_slice`: a refactor that changes what the model computes fails here.

This is a change detector only: the numbers are what the code computed when they were pinned, not values known to
be right, so a failure says that the computation moved, not which side is wrong, and no behaviour is checked only
here (the modules are checked against direct computations in test_disa_modules.py / test_modeling_core.py).
Every pinned mode is a valid configuration (`test_pinned_modes_are_valid_configurations`).

The values were produced by the code before the package was restructured. `disa-masked-concat` replaced a mode
that named the invalid `branch_mode="dual"`, which that code ran as `"masked"` (the value was only refused at
save time then); the current code with `"masked"` reproduces those numbers, so they were kept. The tolerance only
absorbs float differences between CPUs (summation order of vectorised kernels), far below what any real change
moves.
"""

from pathlib import Path

import pytest
import torch

from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation, DiSaProcessor

TINY = Path(__file__).resolve().parents[1] / "configuration" / "models" / "disa-tiny"
CLASS_NAMES = [f"class {i}" for i in range(20)]  # more than the tiny preset's class cap (16): the cap is exercised

# the first SDM design (CLIP-width ITM block with 4 heads, fixed k, restricted attention, independent background
# branch)
FIRST_DESIGN = {
    "use_sdm": True,
    "use_hrm": True,
    "saliency_source": "gradcam",
    "sdm_num_heads": 4,
    "sdm_input_gradient_scale": 1.0,
    "foreground_topk_mode": "fixed",
    "presence_threshold": None,
    "fusion": "weighted",
    "branch_attention": "restricted",
    "sdm_background_init": "independent",
}
MODES = {
    "catseg": {},
    "disa": {"use_sdm": True, "use_hrm": True},
    "disa-first": FIRST_DESIGN,
    # the two branches on their masked cost volumes, merged by concatenation + projection
    "disa-masked-concat": {**FIRST_DESIGN, "branch_mode": "masked", "fusion": "concat"},
    "disa-restricted-copy": {
        "use_sdm": True,
        "use_hrm": True,
        "branch_attention": "restricted",
        "presence_threshold": None,
    },
}

EXPECTED = {
    "catseg": {
        "loss": 1.5644052028656006,
        "eval_logits": [
            [0.6196965, 0.2295526, 1.0437399, -0.1520388],
            [0.6249466, 0.2260989, 1.0441195, -0.1507157],
            [0.5976886, 0.2478602, 1.0421697, -0.161618],
        ],
        "train_logits": [[0.6707357, 0.0326705, 0.5107861], [0.6739036, 0.031583, 0.5090324]],
    },
    "disa": {
        "loss": 2.053297519683838,
        "eval_logits": [
            [-0.3433511, 0.2020314, -0.0992055, -0.0070016],
            [-0.3440279, 0.2024616, -0.0999759, -0.0081107],
            [-0.3449839, 0.1978944, -0.0954401, -0.0048097],
        ],
        "train_logits": [[-0.0933503, -0.0024107, -0.0354644], [-0.0937496, -0.0034002, -0.0372866]],
    },
    "disa-first": {
        "loss": 2.496581792831421,
        "eval_logits": [
            [0.3826407, 0.7340258, 0.0122296, 0.7660391],
            [0.3816394, 0.7343925, 0.011877, 0.7673257],
            [0.3806166, 0.7301432, 0.0148048, 0.7638366],
        ],
        "train_logits": [[0.6652828, 0.6930259, 0.2802178], [0.662273, 0.6808072, 0.2880669]],
    },
    "disa-masked-concat": {
        "loss": 2.1636054515838623,
        "eval_logits": [
            [-0.0623974, -0.0996947, 0.5352862, -0.4863277],
            [-0.0605573, -0.0985003, 0.5314398, -0.4851353],
            [-0.0524631, -0.1045333, 0.5332356, -0.4627977],
        ],
        "train_logits": [[-0.5456349, -0.3490364, -0.4768173], [-0.5546421, -0.3482668, -0.468215]],
    },
    "disa-restricted-copy": {
        "loss": 2.0532922744750977,
        "eval_logits": [
            [-0.3456337, 0.2034073, -0.0970891, -0.0060782],
            [-0.3464464, 0.2038315, -0.09785, -0.0071065],
            [-0.34568, 0.1988525, -0.0946838, -0.0040498],
        ],
        "train_logits": [[-0.0874447, 0.0073668, -0.0313242], [-0.0869366, 0.0066319, -0.0323448]],
    },
}


def pinned_outputs(mode: str):
    config = DiSaConfig.from_pretrained(TINY, **MODES[mode])
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(config)
    text = DiSaProcessor.from_pretrained(TINY)(text=CLASS_NAMES, return_tensors="pt")
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 128, 128, generator=generator)
    labels = torch.randint(0, len(CLASS_NAMES), (2, 64, 64), generator=generator)
    labels[:, :8] = config.ignore_index
    inputs = {"pixel_values": pixel_values, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
    model.train()  # training-mode class pooling
    train = model(**inputs, labels=labels)
    model.eval()
    with torch.no_grad():
        evaluation = model(**inputs)
    return train, evaluation


@pytest.mark.parametrize("mode", sorted(MODES))
def test_pinned_modes_are_valid_configurations(mode):
    """A pinned mode must be a configuration the constructor accepts, with every override in effect."""
    values = DiSaConfig.from_pretrained(TINY).to_dict()
    for key in ("model_type", "transformers_version"):
        values.pop(key)
    config = DiSaConfig(**{**values, **MODES[mode]})
    config.validate()
    assert {key: getattr(config, key) for key in MODES[mode]} == MODES[mode]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_pinned_logits_and_loss(mode):
    train, evaluation = pinned_outputs(mode)
    expected = EXPECTED[mode]
    torch.testing.assert_close(train.loss.detach(), torch.tensor(expected["loss"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        evaluation.logits[0, [0, 7, 19], 10, 20:24], torch.tensor(expected["eval_logits"]), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        train.logits.detach()[1, [2, 11], 30, 28:31], torch.tensor(expected["train_logits"]), rtol=1e-4, atol=1e-5
    )
