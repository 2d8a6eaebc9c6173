"""DiSa's SDM and HRM: closed-form saliency, foreground/background split, ablation switches, gradients, outputs."""

import itertools
import json
import re

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import PRESETS, REPO

from modeling_disa import PAPER_SDM_SETTINGS, DiSaConfig, DiSaForOpenVocabSegmentation
from modeling_disa.model.losses import itm_loss
from modeling_disa.model.routing import TokenRoute
from modeling_disa.model.saliency_disentanglement import DiSaITMCrossAttention, foreground_split

NAMES = ["cat", "dog", "grass", "sky", "road", "tree"]


def tiny(**overrides):
    values = DiSaConfig.from_pretrained(PRESETS / "disa-tiny").to_dict()
    for key in ("model_type", "transformers_version"):
        values.pop(key, None)
    values.update(overrides)
    return DiSaConfig(**values)


def build(**overrides):
    torch.manual_seed(0)
    return DiSaForOpenVocabSegmentation(tiny(**overrides))


def test_closed_form_gradient_equals_autograd_gradcam():
    torch.manual_seed(0)
    config = tiny(use_sdm=True, saliency_source="gradcam")
    block = DiSaITMCrossAttention(config).double()
    queries = torch.randn(2, 5, config.projection_dim, dtype=torch.double)
    tokens = torch.randn(2, 64, config.vision_config.hidden_size, dtype=torch.double)
    query, attention, values = block.attention(queries, tokens)
    leaf = attention.detach().requires_grad_(True)
    logits, intermediates = block.itm_from_attention(leaf, values.detach(), query.detach())
    # s_t depends on A_t only, so the gradient of the sum gives every d s_t / d A_t at once
    (autograd,) = torch.autograd.grad(logits.sum(), leaf)
    closed = block.itm_gradient_wrt_attention(values.detach(), intermediates)
    torch.testing.assert_close(closed, autograd, rtol=1e-9, atol=1e-12)
    gradcam_reference = (leaf * autograd.clamp_min(0)).mean(dim=1)
    gradcam_closed = (attention * closed.clamp_min(0)).mean(dim=1)
    torch.testing.assert_close(gradcam_closed, gradcam_reference)


def test_model_saliency_equals_autograd_gradcam_and_runs_in_inference_mode(tiny_processor):
    model = build(use_sdm=True, use_hrm=True, saliency_source="gradcam").eval()
    inputs = dict(tiny_processor(images=torch.zeros(3, 128, 128, dtype=torch.uint8), text=NAMES))
    with torch.inference_mode():
        out = model(**inputs, output_saliency=True)
    assert out.saliency.shape == (1, len(NAMES), 8, 8)
    # reference Grad-CAM with autograd on the same model
    with torch.no_grad():
        text = model.get_text_embeddings(inputs["input_ids"], inputs["attention_mask"])
        from modeling_disa.model.clip_dense_features import dense_clip_features

        feats = dense_clip_features(model.clip, inputs["pixel_values"], 128, [1, 2])
        queries = F.normalize(F.normalize(text, dim=-1).mean(dim=1), dim=-1).unsqueeze(0)
        query, attention, values = model.sdm.itm.attention(queries, feats.dense_tokens)
    leaf = attention.clone().requires_grad_(True)
    logits, _ = model.sdm.itm.itm_from_attention(leaf, values, query)
    (grad,) = torch.autograd.grad(logits.sum(), leaf)
    expected = (leaf * grad.clamp_min(0)).mean(dim=1).view(1, len(NAMES), 8, 8)
    torch.testing.assert_close(out.saliency.clone(), expected.detach(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.itm_logits.clone(), logits.detach(), rtol=1e-5, atol=1e-6)


def test_fixed_split_has_k_tokens_and_partitions_the_grid():
    config = tiny(use_sdm=True, foreground_topk_mode="fixed")
    saliency = torch.rand(3, 4, 64)
    mask, k = foreground_split(saliency, config)
    expected_k = round(64 * 96 / 576)
    assert torch.all(k == expected_k) and torch.all(mask.sum(-1) == expected_k)
    # foreground = the k most salient tokens: every foreground value >= every background value
    fg_min = torch.where(mask, saliency, torch.inf).amin(-1)
    bg_max = torch.where(~mask, saliency, -torch.inf).amax(-1)
    assert torch.all(fg_min >= bg_max)
    assert torch.all(mask.sum(-1) + (~mask).sum(-1) == 64)


def test_explicit_k_of_96_on_the_full_grid():
    config = DiSaConfig.from_pretrained(PRESETS / "disa-vit-b-16", foreground_topk_mode="fixed")
    mask, k = foreground_split(torch.rand(1, 2, 576), config)
    assert torch.all(mask.sum(-1) == 96)


def test_adaptive_k_matches_the_mass_rule_and_stays_in_bounds():
    """Adaptive k: the smallest k holding half of the class's saliency mass, clamped to 1/24 - 1/2 of the grid (3 to
    32 tokens of 64)."""
    config = tiny(use_sdm=True, foreground_topk_mode="adaptive")
    torch.manual_seed(0)
    peaked = torch.rand(2, 3, 64) ** 8  # a few dominant tokens
    flat = torch.ones(1, 1, 64)
    concentrated = torch.zeros(1, 1, 64)
    concentrated[..., 0] = 1.0
    for saliency in (peaked, flat, concentrated):
        mask, k = foreground_split(saliency, config)
        assert torch.all((k >= 3) & (k <= 32)) and torch.equal(mask.sum(-1), k)
        for index in itertools.product(*(range(n) for n in k.shape)):
            values = saliency[index].sort(descending=True).values
            share = values.cumsum(0) / values.sum()
            unclamped = int((share < 0.5).sum()) + 1  # smallest k holding half of the mass
            assert int(k[index]) == min(max(unclamped, 3), 32)
    assert int(foreground_split(flat, config)[1]) == 32
    assert int(foreground_split(concentrated, config)[1]) == 3


def test_route_split_and_merge_are_inverse_and_keep_token_order():
    torch.manual_seed(0)
    mask = torch.rand(2, 5) > 0.5
    x = torch.randn(2, 5, 3)
    route = TokenRoute(mask)
    fg, bg = route.split(x)
    assert torch.equal(fg, x[mask]) and torch.equal(bg, x[~mask])
    assert torch.equal(route.merge(fg, bg), x)
    flat = route.view(10)  # a reshaped route reuses the indices
    assert flat.foreground is route.foreground and torch.equal(flat.split(x.reshape(10, 3))[0], fg)
    order = torch.randperm(5)  # tokens of every row reordered: split returns the same rows, merge the new layout
    permuted = route.permute_rows(order)
    assert torch.equal(permuted.mask, mask[:, order])
    assert all(torch.equal(a, b) for a, b in zip(permuted.split(x[:, order]), (fg, bg)))
    assert torch.equal(permuted.merge(fg, bg), x[:, order])


def test_routed_swin_block_equals_per_token_selection_of_both_branches():
    from modeling_disa.model.spatial_aggregation import DiSaSwinBlock

    config = tiny(use_sdm=True)
    torch.manual_seed(0)
    block = DiSaSwinBlock(config, shift=config.window_size // 2).eval()
    for parameter in block.background.parameters():  # a background branch unlike the foreground one
        torch.nn.init.normal_(parameter, std=0.2)
    tokens = config.grid_size**2
    x = torch.randn(3, tokens, config.hidden_dim)
    guidance = torch.randn(3, tokens, config.appearance_guidance_dim)
    mask = torch.rand(3, tokens) > 0.7
    route = TokenRoute(mask)
    with torch.no_grad():
        fg, bg = block.forward_routed(*route.split(x), *route.split(guidance), route)
        fast = route.merge(fg, bg)
        # reference: both branches on every token, selected per token, attention over every token
        pick = lambda a, b: torch.where(mask[..., None], a, b)  # noqa: E731
        q, k, v = (pick(a, b) for a, b in zip(block.project(x, guidance), block.background.project(x, guidance)))
        attended = block._attend(q, k, v)
        reference = pick(block.update(x, attended), block.background.update(x, attended))
    torch.testing.assert_close(fast, reference)


@pytest.mark.parametrize("batch", [2, 1])  # one image: the class layout without padding is a non-contiguous view
@pytest.mark.parametrize("class_cap", [16, 0])
def test_routed_spatial_and_class_aggregation_equal_per_token_selection(class_cap, batch):
    from modeling_disa.model.class_aggregation import DiSaClassAggregation
    from modeling_disa.model.spatial_aggregation import DiSaSpatialAggregation

    config = tiny(use_sdm=True, class_cap=class_cap)
    torch.manual_seed(0)
    spatial, classes = DiSaSpatialAggregation(config).eval(), DiSaClassAggregation(config).eval()
    for module in (spatial, classes):
        for name, parameter in module.named_parameters():
            if "background" in name:
                torch.nn.init.normal_(parameter, std=0.2)
    g = config.grid_size
    x = torch.randn(batch, config.hidden_dim, 5, g, g)
    appearance = torch.randn(batch, config.appearance_guidance_dim, g, g)
    text = torch.randn(batch, 5, config.text_guidance_dim)
    mask = torch.rand(batch, 5, g, g) > 0.6
    with torch.no_grad():
        fast_spatial = spatial(x, appearance, TokenRoute(mask))
        # reference: per token, both blocks' branches evaluated on every token and selected by the mask, with the
        # guidance normalised by the token's branch
        flat = mask.reshape(batch * 5, g * g)
        pick = lambda a, b: torch.where(flat[..., None], a, b)  # noqa: E731
        tokens = x.permute(0, 2, 3, 4, 1).reshape(batch * 5, g * g, -1)
        guidance = appearance.flatten(2).transpose(1, 2)
        normalised = pick(
            spatial.guidance_norm(guidance).repeat_interleave(5, dim=0),
            spatial.background_guidance_norm(guidance).repeat_interleave(5, dim=0),
        )
        for block in (spatial.block_1, spatial.block_2):
            q, k, v = (
                pick(a, b)
                for a, b in zip(block.project(tokens, normalised), block.background.project(tokens, normalised))
            )
            attended = block._attend(q, k, v)
            tokens = pick(block.update(tokens, attended), block.background.update(tokens, attended))
        reference = tokens.view(batch, 5, g, g, -1).permute(0, 4, 1, 2, 3)
        torch.testing.assert_close(fast_spatial, reference)

        pooling = (1, 1)
        fast_class = classes(x, text, pooling, TokenRoute(mask))
        route = TokenRoute(mask).class_layout(pooling, config.class_cap)
        layout = route.mask
        pick = lambda a, b: torch.where(layout[..., None], a, b)  # noqa: E731
        from modeling_disa.model.class_aggregation import _pad_classes

        tokens = x.flatten(3).permute(0, 3, 2, 1)  # (B, pixels, T, D)
        guidance = text.unsqueeze(1).expand(-1, g * g, -1, -1)
        if class_cap:
            tokens = _pad_classes(tokens, classes.background.padding_tokens, class_cap)
            guidance = _pad_classes(guidance, classes.background.padding_guidance, class_cap)
        tokens, guidance = tokens.flatten(0, 1), guidance.flatten(0, 1)
        q, k, v = (
            pick(a, b) for a, b in zip(classes.project(tokens, guidance), classes.background.project(tokens, guidance))
        )
        attended = classes.attention.attend(q, k, v)
        updated = pick(classes.update(tokens, attended), classes.background.update(tokens, attended))
        delta = updated.view(batch, g, g, class_cap or 5, -1)[..., :5, :].permute(0, 4, 3, 1, 2)
        torch.testing.assert_close(fast_class, x + delta)


def test_class_layout_route_pools_and_pads_as_the_reference():
    torch.manual_seed(0)
    mask = torch.rand(2, 3, 4, 4) > 0.5
    route = TokenRoute(mask).class_layout((2, 2), 5)
    share = mask.float().unflatten(-1, (2, 2)).unflatten(-3, (2, 2)).mean(dim=(-3, -1))  # (2, 3, 2, 2)
    expected = torch.zeros(2, 4, 5, dtype=torch.bool)
    expected[..., :3] = (share >= 0.5).flatten(-2).transpose(1, 2)
    assert torch.equal(route.mask, expected.flatten(0, 1))
    assert TokenRoute(mask).class_layout((2, 2), 5) is not route  # per route object
    assert TokenRoute(mask).class_layout((2, 2), 5).mask.shape == (8, 5)


# background-branch parameters: children of the aggregation blocks that own their foreground twins
BACKGROUND = (
    r"^aggregator\.layers\.\d+\."
    r"(spatial\.block_\d\.background\.|spatial\.background_guidance_norm\.|class_aggregation\.background\.)"
)

AGGREGATION_LAYERS, DECODER_STAGES = ("aggregator.layers.0", "aggregator.layers.1"), ("decoder.up1", "decoder.up2")


def parameter_names(model):
    return {n: p.shape for n, p in model.named_parameters()}


def test_all_switches_off_is_exactly_the_catseg_core():
    base = parameter_names(build())
    off = parameter_names(build(use_sdm=False, use_hrm=False, fusion="concat", hrm_stages=["pixel"]))
    assert base == off


@pytest.mark.parametrize(
    "overrides, prefix",
    [
        (dict(use_sdm=True), ("sdm.cost_saliency.", BACKGROUND)),
        (dict(use_sdm=True, saliency_source="gradcam", fusion="sum"), ("sdm.itm.", BACKGROUND)),
        (
            dict(use_sdm=True, saliency_source="gradcam", fusion="weighted"),
            ("sdm.itm.", BACKGROUND, "sdm.fusion.gate."),
        ),
        (
            dict(use_sdm=True, saliency_source="gradcam", fusion="concat"),
            ("sdm.itm.", BACKGROUND, "sdm.fusion.projection."),
        ),
        (
            dict(use_hrm=True, hrm_stages=["pixel"]),
            tuple(f"{stage}.refinement.pixel." for stage in (*AGGREGATION_LAYERS, *DECODER_STAGES)),
        ),
        (
            dict(use_hrm=True, hrm_stages=["category"]),
            tuple(f"{stage}.refinement.category." for stage in (*AGGREGATION_LAYERS, *DECODER_STAGES)),
        ),
        (
            dict(use_hrm=True, hrm_stages=["channel"]),
            tuple(f"{stage}.refinement.channel." for stage in (*AGGREGATION_LAYERS, *DECODER_STAGES)),
        ),
    ],
)
def test_switches_add_exactly_the_intended_parameters(overrides, prefix):
    base = parameter_names(build())
    switched = parameter_names(build(**overrides))
    assert {n: s for n, s in switched.items() if n in base} == base  # the host is untouched
    added = set(switched) - set(base)

    def matches(name, p):
        return re.search(p, name) is not None if p == BACKGROUND else name.startswith(p)

    assert added and all(any(matches(n, p) for p in prefix) for n in added)
    assert {p for p in prefix if any(matches(n, p) for n in added)} == set(prefix)
    if BACKGROUND in prefix:  # the background branch mirrors the host aggregator, block by block
        background = {n for n in added if re.search(BACKGROUND, n)}
        mirrored = {n.replace(".background.", ".").replace(".background_", ".") for n in background}
        assert mirrored == {n for n in base if n.startswith("aggregator.")}
        assert all(
            switched[n] == base[m]
            for n in background
            for m in [n.replace(".background.", ".").replace(".background_", ".")]
        )


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_sdm=True, use_hrm=True),
        dict(
            use_sdm=True,
            use_hrm=True,
            fusion="concat",
            saliency_source="gradcam",
            foreground_topk_mode="fixed",
            presence_threshold=None,
        ),
        dict(use_sdm=True, use_hrm=True, **PAPER_SDM_SETTINGS),
        dict(use_sdm=True, foreground_topk_mode="adaptive", saliency_source="attention", fusion="sum"),
    ],
)
def test_every_new_parameter_gets_a_gradient(tiny_processor, overrides):
    model = build(**overrides).train()
    # HRM's stages start as the identity (zero last layer), so their hidden layers get a zero gradient until that
    # layer has moved: move it as one optimiser step would (and check the start below)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "zero_init", False):
                assert not module.weight.any() and not module.bias.any()
                module.weight.normal_(0, 0.01)
    inputs = dict(tiny_processor(images=[torch.rand(3, 128, 128) for _ in range(2)], text=NAMES))
    labels = torch.randint(0, len(NAMES), (2, 128, 128))
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, out.segmentation_loss + model.config.itm_loss_weight * out.itm_loss)
    out.loss.backward()
    new = [
        n
        for n, p in model.named_parameters()
        if (n.startswith("sdm.") or ".refinement." in n or re.search(BACKGROUND, n)) and p.requires_grad
    ]
    missing = [n for n in new if model.get_parameter(n).grad is None or model.get_parameter(n).grad.abs().sum() == 0]
    assert new and not missing, missing


def test_itm_loss_matches_presence_computed_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 4)
    labels = torch.tensor([[[0, 0], [2, 255]], [[3, 3], [3, 3]]])
    presence = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    manual = -(
        presence * torch.log(torch.sigmoid(logits)) + (1 - presence) * torch.log(1 - torch.sigmoid(logits))
    ).mean()
    torch.testing.assert_close(itm_loss(logits, labels, 255), manual)


def test_saliency_outputs_have_documented_shapes(tiny_processor):
    model = build(use_sdm=True).eval()
    inputs = dict(tiny_processor(images=[torch.rand(3, 128, 128) for _ in range(2)], text=NAMES))
    with torch.no_grad():
        plain = model(**inputs)
        out = model(**inputs, output_saliency=True)
    assert plain.saliency is None and plain.foreground_mask is None and plain.itm_logits.shape == (2, len(NAMES))
    assert out.saliency.shape == (2, len(NAMES), 8, 8) and out.saliency.dtype == torch.float32
    assert out.foreground_mask.shape == (2, len(NAMES), 8, 8) and out.foreground_mask.dtype == torch.bool
    # presence-aware routing (the default): classes predicted absent get no foreground token, the others top-k
    present = out.itm_logits.sigmoid() >= model.config.presence_threshold
    _, adaptive_k = foreground_split(out.saliency.flatten(2), model.config)  # the k of every class, ungated
    expected = torch.where(present, adaptive_k, 0)
    assert torch.equal(out.foreground_mask.sum((-2, -1)), expected)
    torch.testing.assert_close(out.logits, plain.logits)
    unrouted = build(use_sdm=True, presence_threshold=None, foreground_topk_mode="fixed").eval()
    with torch.no_grad():
        out = unrouted(**inputs, output_saliency=True)
    assert torch.all(out.foreground_mask.sum((-2, -1)) == round(64 / 6))


def test_saliency_with_class_cap_scatters_back(tiny_processor):
    model = build(use_sdm=True).eval()
    names = [f"class {i}" for i in range(model.config.class_cap + 4)]
    inputs = dict(tiny_processor(images=torch.rand(3, 128, 128), text=names))
    with torch.no_grad():
        out = model(**inputs, output_saliency=True)
    dropped = sorted(set(range(len(names))) - set(out.class_indices[0].tolist()))
    assert len(dropped) == 4
    assert torch.all(out.itm_logits[0, dropped] == model.config.pruned_class_logit)
    assert not out.foreground_mask[0, dropped].any() and torch.all(out.saliency[0, dropped] == 0)


def test_save_load_round_trip_with_every_module(tmp_path, tiny_processor):
    model = build(use_sdm=True, use_hrm=True, foreground_topk_mode="adaptive").eval()
    model.save_pretrained(tmp_path)
    again = DiSaForOpenVocabSegmentation.from_pretrained(tmp_path, dtype=torch.float32)
    inputs = dict(tiny_processor(images=torch.rand(3, 128, 128), text=NAMES))
    with torch.no_grad():
        a, b = model(**inputs, output_saliency=True), again(**inputs, output_saliency=True)
    state, reloaded = model.state_dict(), again.state_dict()
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)
    # weights are bit-identical; outputs may differ in the last bits because BLAS kernels depend on the
    # alignment of the (memory-mapped) loaded tensors
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.saliency, b.saliency, rtol=0, atol=1e-6)
    assert torch.equal(a.foreground_mask, b.foreground_mask)


def test_ablation_table_configs_build(tmp_path):
    table = json.loads((REPO / "configuration" / "ablations.json").read_text())
    assert table["rows"][0]["overrides"] == {}
    full = next(row["overrides"] for row in table["rows"] if row["name"].startswith("VII full"))
    assert full == {"use_sdm": True, "use_hrm": True, **PAPER_SDM_SETTINGS}
    counts = []
    for row in table["rows"]:
        counts.append(sum(p.numel() for p in build(**row["overrides"]).parameters()))
    assert counts[0] < counts[-1]


# ---------------------------------------------------------------------------------------------- SDM, second design
from modeling_disa.model.saliency_disentanglement import DiSaCostSaliency  # noqa: E402


def test_cost_saliency_closed_form_gradient_equals_autograd():
    torch.manual_seed(0)
    config = tiny(use_sdm=True, saliency_source="cost")
    head = DiSaCostSaliency(config).double()
    volume = torch.randn(2, config.hidden_dim, 5, 8, 8, dtype=torch.double)
    attention, values, logits, hidden = head(volume)
    assert attention.shape == (2, 5, 64) and logits.shape == (2, 5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 5, dtype=torch.double))
    leaf = attention.detach().requires_grad_(True)
    z = torch.einsum("btn,btnd->btd", leaf, values.detach())
    score = head.out(F.gelu(head.fc(z))).squeeze(-1)
    (autograd,) = torch.autograd.grad(score.sum(), leaf)
    closed = head.gradient_wrt_attention(values.detach(), hidden)
    torch.testing.assert_close(closed, autograd, rtol=1e-9, atol=1e-12)


def test_cost_saliency_is_class_agnostic_and_equivariant_in_the_class_order():
    model = build(use_sdm=True, saliency_source="cost").eval()
    volume = torch.randn(1, model.config.hidden_dim, 4, 8, 8)
    perm = torch.tensor([2, 0, 3, 1])
    a, _, logits, _ = model.sdm.cost_saliency(volume)
    b, _, logits_perm, _ = model.sdm.cost_saliency(volume[:, :, perm])
    torch.testing.assert_close(a[:, perm], b)
    torch.testing.assert_close(logits[:, perm], logits_perm)
    assert not hasattr(model.sdm, "itm")  # no CLIP-width block is built for the cost source


@pytest.mark.parametrize("source", ["gradcam", "cost"])
def test_detached_sdm_inputs_keep_the_presence_loss_out_of_clip(tiny_processor, source):
    model = build(use_sdm=True, saliency_source=source).train()
    inputs = dict(tiny_processor(images=[torch.rand(3, 128, 128) for _ in range(2)], text=NAMES))
    labels = torch.randint(0, len(NAMES), (2, 128, 128))
    out = model(**inputs, labels=labels)
    out.itm_loss.backward()
    trained_clip = [p for n, p in model.named_parameters() if n.startswith("clip.") and p.requires_grad]
    assert trained_clip and all(p.grad is None for p in trained_clip)
    assert all(p.grad is None for p in model.cost_embedding.parameters())
    head = model.sdm.cost_saliency if source == "cost" else model.sdm.itm
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    # the segmentation loss does reach CLIP and the cost embedding: only SDM's inputs are detached
    model.zero_grad()
    model(**inputs, labels=labels).segmentation_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained_clip)
    assert all(p.grad is not None for p in model.cost_embedding.parameters())


def test_presence_threshold_gives_absent_classes_no_foreground_tokens():
    config = tiny(use_sdm=True, presence_threshold=0.5, foreground_topk_mode="adaptive")
    saliency = torch.rand(2, 3, 64)
    presence = torch.tensor([[3.0, -3.0, 0.1], [-0.1, 2.0, -5.0]])
    mask, k = foreground_split(saliency, config, presence)
    expected_absent = torch.sigmoid(presence) < 0.5
    assert torch.equal(k == 0, expected_absent)
    assert torch.equal(mask.sum(-1), k)
    ungated, k_all = foreground_split(saliency, config)  # without presence logits: the adaptive k of every class
    assert torch.equal(k[~expected_absent], k_all[~expected_absent]) and (k_all > 0).all()


def test_own_fusion_gives_every_token_its_own_branch_output(tiny_processor):
    """fusion="own": the decoder reads the one routed aggregator run, which already holds each token's own
    branch's output."""
    model = build(use_sdm=True, saliency_source="cost", fusion="own").eval()
    inputs = dict(tiny_processor(images=[torch.rand(3, 128, 128) for _ in range(2)], text=NAMES))
    runs, decoded = [], []
    hooks = [
        model.aggregator.register_forward_hook(lambda _m, _a, out: runs.append(out)),
        model.decoder.register_forward_hook(lambda _m, args, _o: decoded.append(args[0])),
    ]
    with torch.no_grad():
        mask = model(**inputs, output_saliency=True).foreground_mask
    for hook in hooks:
        hook.remove()
    assert mask.any() and not mask.all()  # both branches hold tokens
    (expected,) = runs
    assert torch.equal(decoded[0], expected)


def test_copied_background_branch_with_shared_attention_starts_as_catseg(tiny_processor):
    """The background branch starts as a copy of the foreground one, attention spans both branches, fusion="own":
    at initialisation the split routes tokens between two identical branches, so DiSa's logits are exactly CAT-Seg
    mode's with the same weights."""
    inputs = dict(tiny_processor(images=[torch.rand(3, 128, 128) for _ in range(2)], text=NAMES))
    disa = build(
        use_sdm=True,
        saliency_source="cost",
        fusion="own",
        presence_threshold=None,
    ).eval()
    state = disa.state_dict()
    twin = {
        k.replace(".background.", ".").replace(".background_", "."): v
        for k, v in state.items()
        if re.search(BACKGROUND, k)
    }
    host = {k: v for k, v in state.items() if k.startswith("aggregator.") and not re.search(BACKGROUND, k)}
    assert host.keys() == twin.keys() and all(torch.equal(host[k], twin[k]) for k in host)
    catseg = build().eval()
    catseg.load_state_dict({k: v for k, v in state.items() if not (k.startswith("sdm.") or re.search(BACKGROUND, k))})
    with torch.no_grad():
        out = disa(**inputs, output_saliency=True)
        assert out.foreground_mask.any() and not out.foreground_mask.all()  # the split is not trivial
        torch.testing.assert_close(out.logits, catseg(**inputs).logits, rtol=0, atol=0)
    # background weights unlike the foreground ones change the output: the test can tell the branches apart
    with torch.no_grad():
        for name, parameter in disa.named_parameters():
            if re.search(BACKGROUND, name):
                parameter.add_(0.05)
        assert not torch.equal(disa(**inputs).logits, out.logits)


def test_refinement_level_in_place_inference_equals_the_formula():
    from modeling_disa.model.hierarchical_refinement import DiSaRefinementLevel

    torch.manual_seed(0)
    level = DiSaRefinementLevel(8, ["pixel", "category", "channel"], 4)
    x = torch.randn(2, 3, 8, 5, 5)  # (B, T, C, h, w)
    # reference: the three re-weightings written out, out of place
    y = x.clone()
    pixel = level.pixel.conv(torch.stack([y.mean(2), y.amax(2)], dim=2).flatten(0, 1)).view(2, 3, 1, 5, 5)
    y = y * (1 + torch.tanh(pixel))
    y = y * (1 + torch.tanh(level.category.mlp(y.mean(dim=(-2, -1)))[..., None, None]))
    y = y * (1 + torch.tanh(level.channel.mlp(y.mean(dim=(1, 3, 4)))[:, None, :, None, None]))
    with torch.no_grad():
        in_place = level(x.clone())
    trained = level(x.clone().requires_grad_(True))
    assert torch.equal(in_place, trained.detach())
    torch.testing.assert_close(in_place, y.detach())
    trained.sum().backward()  # out of place with autograd: the backward pass works


def test_frozen_cost_saliency_key_bias_cannot_change_any_output(tiny_processor):
    """The one SDM parameter kept frozen (`unused_parameter_names`): a shift of the key bias moves every token's
    attention logit of a class equally, which the softmax cancels, so no output moves and no gradient can exist."""
    model = build(use_sdm=True, saliency_source="cost").eval()
    assert "sdm.cost_saliency.key.bias" in model.unused_parameter_names()
    assert not model.sdm.cost_saliency.key.bias.requires_grad
    inputs = dict(tiny_processor(images=[torch.rand(3, 128, 128)], text=NAMES))
    with torch.no_grad():
        before = model(**inputs, output_saliency=True)
        model.sdm.cost_saliency.key.bias += 3.0
        after = model(**inputs, output_saliency=True)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.itm_logits, before.itm_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(after.foreground_mask, before.foreground_mask)


@pytest.mark.parametrize(
    "overrides", [dict(use_sdm=True), dict(use_hrm=True), dict(use_sdm=True, use_hrm=True, **PAPER_SDM_SETTINGS)]
)
def test_disa_parameter_names_are_what_disa_adds_to_the_host(overrides):
    """The parameters DiSa adds = the DiSa model's parameters that the CAT-Seg-mode model of the same config lacks."""
    disa = build(**overrides)
    host = build(use_sdm=False, use_hrm=False)
    expected = {n for n, _ in disa.named_parameters()} - {n for n, _ in host.named_parameters()}
    assert expected and set(disa.disa_parameter_names()) == expected
    assert host.disa_parameter_names() == []
