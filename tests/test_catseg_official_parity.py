"""Parity with the official CAT-Seg code.

The fixture `catseg_official_tiny` (beside the repository: `<repo>/../shared/fixtures/`) holds a tiny random-weight
CAT-Seg model saved by the official code (cvlab-kaist/CAT-Seg, detectron2 checkpoint layout), the two images and five
class names it was run on, the official `clip.tokenize` ids and the official outputs (logits and four intermediate
stages). Here the checkpoint goes through the converter's command line (`--strict`), the converted folder through
`from_pretrained`, and both images as one batch through the processor and the model's forward, as a user would.

Pass rule (the fixture's): identical token ids; for every tensor `max|d| <= 1e-4 * max(1, max|official|)`; and every
argmax flip of the logits is a near-tie, i.e. the official top-1/top-2 margin there is `<= 2 max|d logits|`.
Three perturbed copies of the converted model must fail that rule (negative controls), so the rule can fail.
"""

import copy
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from modeling_disa import DiSaForOpenVocabSegmentation, DiSaProcessor
from modeling_disa.convert_catseg import main as convert_main

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "catseg_official_tiny"
RELATIVE_TOLERANCE = 1e-4
# the fixture's checkpoint: 314 weights and the two Swin shift masks of the second block of each aggregation layer
CHECKPOINT_WEIGHTS = 314
SHIFT_MASKS = [f"sem_seg_head.predictor.transformer.layers.{i}.swin_block.block_2.attn_mask" for i in range(2)]


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    if not (FIXTURE / "checkpoint.pth").is_file():
        pytest.fail(
            f"the official CAT-Seg parity fixture is missing: expected {FIXTURE} (with checkpoint.pth). The "
            "repository's tests read it from shared/fixtures/catseg_official_tiny beside the clone; place a copy "
            "of shared/ there.",
            pytrace=False,
        )
    return FIXTURE


@pytest.fixture(scope="module")
def official(fixture_dir) -> dict:
    return load_file(fixture_dir / "official_outputs.safetensors")


@pytest.fixture(scope="module")
def converted(fixture_dir, tmp_path_factory):
    """The checkpoint converted by the command line in strict mode: `(folder, conversion report)`."""
    output = tmp_path_factory.mktemp("catseg_official_tiny")
    args = ["--checkpoint", str(fixture_dir / "checkpoint.pth"), "--preset", str(fixture_dir / "preset")]
    assert convert_main([*args, "--output_dir", str(output), "--strict"]) == 0
    return output, json.loads((output / "conversion_report.json").read_text())


@pytest.fixture(scope="module")
def model(converted):
    return DiSaForOpenVocabSegmentation.from_pretrained(converted[0]).eval()


@pytest.fixture(scope="module")
def inputs(fixture_dir):
    meta = json.loads((fixture_dir / "official_outputs.json").read_text())
    paths = [fixture_dir / name for name in meta["images"]]
    # the images the official outputs belong to (a re-encoded PNG would shift every number below)
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths] == meta["image_sha256"]
    class_names = json.loads((fixture_dir / "classes.json").read_text())
    assert class_names == meta["class_names"]
    processor = DiSaProcessor.from_pretrained(fixture_dir / "preset")
    images = [Image.open(p).convert("RGB") for p in paths]
    return processor, processor(images=images, text=class_names, return_tensors="pt")


def run(model, batch) -> dict:
    """Outputs of one forward pass, with the cost volume (input of the public `cost_embedding`) and the aggregated
    volume (output of the public `aggregator`) caught by forward hooks."""
    caught = {}
    hooks = [
        model.cost_embedding.register_forward_hook(lambda _m, args, _o: caught.__setitem__("cost_volume", args[0])),
        model.aggregator.register_forward_hook(lambda _m, _a, out: caught.__setitem__("aggregated", out)),
    ]
    try:
        with torch.no_grad():
            outputs = model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        "logits": outputs.logits,
        "text_embeds": outputs.text_embeds,
        "image_embeds": outputs.image_embeds,
        "cost_volume": caught["cost_volume"],
        "aggregated_image0": caught["aggregated"][:1],
        "outputs": outputs,
    }


@pytest.fixture(scope="module")
def project(model, inputs):
    return run(model, inputs[1])


def tensor_violation(name: str, ours: torch.Tensor, reference: torch.Tensor) -> str | None:
    if ours.shape != reference.shape:
        return f"{name}: shape {tuple(ours.shape)} vs official {tuple(reference.shape)}"
    diff = (ours.double() - reference.double()).abs().max().item()
    bound = RELATIVE_TOLERANCE * max(1.0, reference.abs().max().item())
    return None if diff <= bound else f"{name}: max|d| {diff:.3g} > {bound:.3g}"


def logit_violations(ours: torch.Tensor, reference: torch.Tensor) -> list[str]:
    """The fixture's rule on `(B, T, h, w)` logits: the tolerance, and argmax flips only at official near-ties."""
    violation = tensor_violation("logits", ours, reference)
    if violation and "shape" in violation:
        return [violation]
    violations = [violation] if violation else []
    diff = (ours.double() - reference.double()).abs().max().item()
    top2 = reference.double().topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    flips = ours.argmax(dim=1) != reference.argmax(dim=1)
    decided = flips & (margin > 2 * diff)
    if decided.any():
        violations.append(
            f"logits: {int(decided.sum())} argmax flips where the official margin exceeds 2 max|d| = {2 * diff:.3g}"
        )
    return violations


def test_conversion_is_strict_and_complete(converted):
    report = converted[1]
    assert report["converted"] == CHECKPOINT_WEIGHTS
    assert sorted(report["consumed"]) == SHIFT_MASKS
    assert report["unmatched"] == [] and report["missing"] == []


def test_token_ids_equal_official_clip_tokenize(inputs, official):
    batch = inputs[1]
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    reference = official["token_ids"]
    assert ids.shape[0] == reference.shape[0] and ids.shape[1] <= reference.shape[1]
    assert torch.equal(ids[mask], reference[:, : ids.shape[1]][mask])
    # beyond each prompt, the official ids are the zero padding (so nothing the mask hides was a real token)
    official_padding = torch.ones_like(reference, dtype=torch.bool)
    official_padding[:, : ids.shape[1]] = ~mask
    assert (reference[official_padding] == 0).all()


@pytest.mark.parametrize("stage", ["text_embeds", "image_embeds", "cost_volume", "aggregated_image0"])
def test_intermediate_stage_matches_official(project, official, stage):
    assert tensor_violation(stage, project[stage], official[stage]) is None


def test_logits_match_official(project, official):
    assert project["logits"].dtype == torch.float32
    assert logit_violations(project["logits"], official["logits"]) == []


def test_label_map_matches_official(inputs, project, official, fixture_dir):
    """The processor's post-processing (sigmoid, bilinear to 384, argmax) against the official eval label map of
    image 0: on the official logits it must give that map exactly; on ours, a flip is allowed only where the
    official class probabilities tie within what the logit difference can move them (the sigmoid's slope is at most
    1/4 and bilinear weights sum to 1)."""
    processor = inputs[0]
    official_map = torch.from_numpy(np.array(Image.open(fixture_dir / "official_label_map_image0.png"))).long()
    from_official = processor.post_process_semantic_segmentation(
        SimpleNamespace(logits=official["logits"][:1]), target_sizes=[(384, 384)]
    )[0]
    assert torch.equal(from_official, official_map)

    ours = processor.post_process_semantic_segmentation(project["outputs"], target_sizes=[(384, 384)] * 2)[0]
    official_probabilities = F.interpolate(
        official["logits"][:1].double().sigmoid(), size=(384, 384), mode="bilinear", align_corners=False
    )[0]
    top2 = official_probabilities.topk(2, dim=0).values
    logit_diff = (project["logits"].double() - official["logits"].double()).abs().max().item()
    # float32 rounding of the official probabilities (2 ** -24 relative) also decides ties
    allowed = 2 * logit_diff / 4 + 2**-23
    assert not ((ours != official_map) & (top2[0] - top2[1] > allowed)).any()


def _vision_block5_fc1(model):
    model.clip.vision_model.encoder.layers[5].mlp.fc1.weight[0, 0] += 0.05


def _decoder_head(model):
    model.decoder.head.weight[0, 0, 1, 1] += 0.01


def _class_padding(model):
    for layer in model.aggregator.layers:
        layer.class_aggregation.padding_tokens.zero_()
        layer.class_aggregation.padding_guidance.zero_()


@pytest.mark.parametrize(
    "perturb", [_vision_block5_fc1, _decoder_head, _class_padding], ids=["vision-fc1", "decoder-head", "padding"]
)
def test_negative_control_fails_the_rule(model, inputs, official, perturb):
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturb(perturbed)
    assert logit_violations(run(perturbed, inputs[1])["logits"], official["logits"]) != []
