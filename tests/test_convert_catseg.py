"""CAT-Seg checkpoint import, tested with a synthetic checkpoint that has the official key names and shapes for the
tiny preset. Where the layouts differ (OpenAI fused/split attention, (in, out) projection matrices), the converted HF
layers are compared with reference computations written here from the OpenAI layout."""

import json

import pytest
import torch
import torch.nn.functional as F

from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation
from modeling_disa.convert_catseg import (
    NotACatSegCheckpointError,
    convert_catseg_checkpoint,
    convert_catseg_state_dict,
    main,
)

CLIP = "sem_seg_head.predictor.clip_model."
AGG = "sem_seg_head.predictor.transformer."


def shift_mask(grid, window, shift):
    """Swin's shifted-window mask, written out independently (-100 across regions)."""
    region = torch.zeros(grid, grid)
    bounds = [(0, grid - window), (grid - window, grid - shift), (grid - shift, grid)]
    count = 0
    for r0, r1 in bounds:
        for c0, c1 in bounds:
            region[r0:r1, c0:c1] = count
            count += 1
    windows = (
        region.view(grid // window, window, grid // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    )
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def catseg_state_dict(config: DiSaConfig, fused: bool = False, seed: int = 0) -> dict:
    """A CAT-Seg `model` state dict (official names and shapes) for `config`, filled with random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name, *shape):
        sd[name] = torch.randn(*shape, generator=g) * 0.2

    v, t = config.vision_config, config.text_config
    D, W, C = v.hidden_size, t.hidden_size, config.projection_dim
    positions = (v.image_size // v.patch_size) ** 2 + 1
    add(CLIP + "visual.conv1.weight", D, 3, v.patch_size, v.patch_size)
    add(CLIP + "visual.class_embedding", D)
    add(CLIP + "visual.positional_embedding", positions, D)
    add(CLIP + "token_embedding.weight", t.vocab_size, W)
    add(CLIP + "positional_embedding", t.max_position_embeddings, W)
    for prefix, width, layers, inter in (
        ("visual.", D, v.num_hidden_layers, v.intermediate_size),
        ("", W, t.num_hidden_layers, t.intermediate_size),
    ):
        for name in ("ln_pre", "ln_post") if prefix else ("ln_final",):
            sd[CLIP + prefix + name + ".weight"] = 1 + 0.1 * torch.randn(width, generator=g)
            add(CLIP + prefix + name + ".bias", width)
        for i in range(layers):
            b = f"{CLIP}{prefix}transformer.resblocks.{i}."
            if fused:
                add(b + "attn.in_proj_weight", 3 * width, width)
            else:
                for p in "qkv":
                    add(b + f"attn.{p}_proj_weight", width, width)
            add(b + "attn.in_proj_bias", 3 * width)
            add(b + "attn.out_proj.weight", width, width)
            add(b + "attn.out_proj.bias", width)
            for ln in ("ln_1", "ln_2"):
                sd[b + ln + ".weight"] = 1 + 0.1 * torch.randn(width, generator=g)
                add(b + ln + ".bias", width)
            add(b + "mlp.c_fc.weight", inter, width)
            add(b + "mlp.c_fc.bias", inter)
            add(b + "mlp.c_proj.weight", width, inter)
            add(b + "mlp.c_proj.bias", width)
    add(CLIP + "visual.proj", D, C)
    add(CLIP + "text_projection", W, C)
    sd[CLIP + "logit_scale"] = torch.tensor(4.6052)

    h, G, TG, P = config.hidden_dim, config.appearance_guidance_dim, config.text_guidance_dim, config.num_prompts
    (d0, d1), (g0, g1), (p0, p1) = config.decoder_dims, config.decoder_guidance_dims, config.decoder_guidance_proj_dims
    k, r = config.cost_embed_kernel_size, config.mlp_ratio
    add(AGG + "conv1.weight", h, P, k, k)
    add(AGG + "conv1.bias", h)
    add(AGG + "guidance_projection.0.weight", G, C, 3, 3)
    add(AGG + "guidance_projection.0.bias", G)
    add(AGG + "text_guidance_projection.0.weight", TG, C)
    add(AGG + "text_guidance_projection.0.bias", TG)
    for i, (gd, pd) in enumerate(((g0, p0), (g1, p1))):
        add(AGG + f"decoder_guidance_projection.{i}.0.weight", pd, gd, 3, 3)
        add(AGG + f"decoder_guidance_projection.{i}.0.bias", pd)
    grid, window = config.grid_size, config.window_size
    for i in range(config.num_aggregation_layers):
        for block in ("block_1", "block_2"):
            b = f"{AGG}layers.{i}.swin_block.{block}."
            for name, shape in (("norm1", (h,)), ("norm2", (h,))):
                add(b + name + ".weight", *shape)
                add(b + name + ".bias", *shape)
            add(b + "attn.q.weight", h, h + G)
            add(b + "attn.q.bias", h)
            add(b + "attn.k.weight", h, h + G)
            add(b + "attn.k.bias", h)
            add(b + "attn.v.weight", h, h)
            add(b + "attn.v.bias", h)
            add(b + "attn.proj.weight", h, h)
            add(b + "attn.proj.bias", h)
            add(b + "mlp.fc1.weight", h * r, h)
            add(b + "mlp.fc1.bias", h * r)
            add(b + "mlp.fc2.weight", h, h * r)
            add(b + "mlp.fc2.bias", h)
        if grid > window:  # a persistent buffer in CAT-Seg's Swin block (None, so absent, for block_1)
            sd[f"{AGG}layers.{i}.swin_block.block_2.attn_mask"] = shift_mask(grid, window, window // 2)
        add(f"{AGG}layers.{i}.swin_block.guidance_norm.weight", G)
        add(f"{AGG}layers.{i}.swin_block.guidance_norm.bias", G)
        a = f"{AGG}layers.{i}.attention."
        for name in ("norm1", "norm2"):
            add(a + name + ".weight", h)
            add(a + name + ".bias", h)
        add(a + "attention.q.weight", h, h + TG)
        add(a + "attention.q.bias", h)
        add(a + "attention.k.weight", h, h + TG)
        add(a + "attention.k.bias", h)
        add(a + "attention.v.weight", h, h)
        add(a + "attention.v.bias", h)
        add(a + "MLP.0.weight", 4 * h, h)
        add(a + "MLP.0.bias", 4 * h)
        add(a + "MLP.2.weight", h, 4 * h)
        add(a + "MLP.2.bias", h)
        add(a + "padding_tokens", 1, 1, h)
        add(a + "padding_guidance", 1, 1, TG)
    for n, (cin, cout, gp) in ((1, (h, d0, p0)), (2, (d0, d1, p1))):
        u = f"{AGG}decoder{n}."
        add(u + "up.weight", cin, cin - gp, 2, 2)
        add(u + "up.bias", cin - gp)
        add(u + "conv.double_conv.0.weight", cout, cin, 3, 3)
        add(u + "conv.double_conv.1.weight", cout)
        add(u + "conv.double_conv.1.bias", cout)
        add(u + "conv.double_conv.3.weight", cout, cout, 3, 3)
        add(u + "conv.double_conv.4.weight", cout)
        add(u + "conv.double_conv.4.bias", cout)
    add(AGG + "head.weight", 1, d1, 3, 3)
    add(AGG + "head.bias", 1)
    add("upsample1.weight", D, g0, 2, 2)
    add("upsample1.bias", g0)
    add("upsample2.weight", D, g1, 4, 4)
    add("upsample2.bias", g1)
    return sd


# Independent table (from the brief / CAT-Seg's module names) for the aggregator: official -> DiSa, layer 0 / 1.
AGGREGATOR_PAIRS = [
    ("conv1.weight", "cost_embedding.conv.weight"),
    ("guidance_projection.0.bias", "appearance_guidance.0.bias"),
    ("text_guidance_projection.0.weight", "text_guidance.0.weight"),
    ("decoder_guidance_projection.1.0.weight", "guidance_upsampler.projection.1.0.weight"),
    ("layers.0.swin_block.block_1.attn.q.weight", "aggregator.layers.0.spatial.block_1.attn.q.weight"),
    ("layers.1.swin_block.block_2.attn.proj.bias", "aggregator.layers.1.spatial.block_2.attn.proj.bias"),
    ("layers.0.swin_block.block_2.mlp.fc2.weight", "aggregator.layers.0.spatial.block_2.mlp.fc2.weight"),
    ("layers.1.swin_block.block_1.norm2.weight", "aggregator.layers.1.spatial.block_1.norm2.weight"),
    ("layers.0.swin_block.guidance_norm.bias", "aggregator.layers.0.spatial.guidance_norm.bias"),
    ("layers.1.attention.norm1.weight", "aggregator.layers.1.class_aggregation.norm1.weight"),
    ("layers.0.attention.attention.k.weight", "aggregator.layers.0.class_aggregation.attention.k.weight"),
    ("layers.1.attention.MLP.2.weight", "aggregator.layers.1.class_aggregation.mlp.2.weight"),
    ("layers.0.attention.padding_tokens", "aggregator.layers.0.class_aggregation.padding_tokens"),
    ("layers.1.attention.padding_guidance", "aggregator.layers.1.class_aggregation.padding_guidance"),
    ("decoder1.up.weight", "decoder.up1.up.weight"),
    ("decoder2.conv.double_conv.0.weight", "decoder.up2.conv.block.0.weight"),
    ("decoder1.conv.double_conv.4.bias", "decoder.up1.conv.block.4.bias"),
    ("head.weight", "decoder.head.weight"),
]


@pytest.fixture
def converted_model(tiny_config):
    sd = catseg_state_dict(tiny_config)
    model = DiSaForOpenVocabSegmentation(tiny_config).eval()
    converted, report = convert_catseg_state_dict({"model": sd, "iteration": 1}, model)
    model.load_state_dict(converted, strict=True)
    return model, sd, report


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def openai_block(x, sd, prefix, heads, causal):
    """OpenAI CLIP ResidualAttentionBlock from the checkpoint layout. x: (batch, length, width)."""
    width = x.shape[-1]
    if prefix + "attn.in_proj_weight" in sd:
        in_proj = sd[prefix + "attn.in_proj_weight"]
    else:
        in_proj = torch.cat([sd[prefix + f"attn.{p}_proj_weight"] for p in "qkv"])
    h = F.layer_norm(x, (width,), sd[prefix + "ln_1.weight"], sd[prefix + "ln_1.bias"], eps=1e-5)
    length = x.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1) if causal else None
    attn, _ = F.multi_head_attention_forward(
        h.transpose(0, 1),
        h.transpose(0, 1),
        h.transpose(0, 1),
        width,
        heads,
        in_proj,
        sd[prefix + "attn.in_proj_bias"],
        None,
        None,
        False,
        0.0,
        sd[prefix + "attn.out_proj.weight"],
        sd[prefix + "attn.out_proj.bias"],
        training=False,
        need_weights=False,
        attn_mask=mask,
    )
    x = x + attn.transpose(0, 1)
    h = F.layer_norm(x, (width,), sd[prefix + "ln_2.weight"], sd[prefix + "ln_2.bias"], eps=1e-5)
    h = F.linear(
        quick_gelu(F.linear(h, sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"])),
        sd[prefix + "mlp.c_proj.weight"],
        sd[prefix + "mlp.c_proj.bias"],
    )
    return x + h


@pytest.mark.parametrize("fused", [False, True])
def test_attention_blocks_match_the_openai_layout(tiny_config, fused):
    sd = catseg_state_dict(tiny_config, fused=fused)
    model = DiSaForOpenVocabSegmentation(tiny_config).eval()
    converted, report = convert_catseg_state_dict(sd, model)
    assert not report.missing and not report.unmatched
    model.load_state_dict(converted, strict=True)
    torch.manual_seed(3)
    vision_heads = tiny_config.vision_config.num_attention_heads
    with torch.no_grad():
        for i, layer in enumerate(model.clip.vision_model.encoder.layers):
            x = torch.randn(2, 65, tiny_config.vision_config.hidden_size)
            expected = openai_block(x, sd, f"{CLIP}visual.transformer.resblocks.{i}.", vision_heads, causal=False)
            torch.testing.assert_close(layer(x, None), expected, rtol=1e-4, atol=1e-5)


def test_text_tower_matches_openai_encode_text(converted_model, tiny_processor, tiny_config):
    model, sd, _ = converted_model
    tokens = tiny_processor.tokenize_class_names(["cat", "building", "sky"])
    ids = tokens["input_ids"]
    with torch.no_grad():
        ours = model.get_text_embeddings(ids, tokens["attention_mask"])[:, 0]
        x = sd[CLIP + "token_embedding.weight"][ids] + sd[CLIP + "positional_embedding"][: ids.shape[1]]
        for i in range(tiny_config.text_config.num_hidden_layers):
            x = openai_block(
                x, sd, f"{CLIP}transformer.resblocks.{i}.", tiny_config.text_config.num_attention_heads, causal=True
            )
        x = F.layer_norm(x, (x.shape[-1],), sd[CLIP + "ln_final.weight"], sd[CLIP + "ln_final.bias"], eps=1e-5)
        eot = x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)]  # OpenAI: the EOT token has the largest id
        expected = F.normalize(eot @ sd[CLIP + "text_projection"], dim=-1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_image_tower_matches_openai_encode_image(converted_model, tiny_config):
    model, sd, _ = converted_model
    v = tiny_config.vision_config
    torch.manual_seed(4)
    pixels = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        pooled = model.clip.vision_model(pixel_values=pixels).pooler_output
        ours = model.clip.visual_projection(pooled)
        x = F.conv2d(pixels, sd[CLIP + "visual.conv1.weight"], stride=v.patch_size).flatten(2).transpose(1, 2)
        cls = sd[CLIP + "visual.class_embedding"].expand(2, 1, -1)
        x = torch.cat([cls, x], dim=1) + sd[CLIP + "visual.positional_embedding"]
        x = F.layer_norm(x, (v.hidden_size,), sd[CLIP + "visual.ln_pre.weight"], sd[CLIP + "visual.ln_pre.bias"])
        for i in range(v.num_hidden_layers):
            x = openai_block(x, sd, f"{CLIP}visual.transformer.resblocks.{i}.", v.num_attention_heads, causal=False)
        x = F.layer_norm(
            x[:, 0], (v.hidden_size,), sd[CLIP + "visual.ln_post.weight"], sd[CLIP + "visual.ln_post.bias"]
        )
        expected = x @ sd[CLIP + "visual.proj"]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_aggregator_and_upsample_names(converted_model):
    model, sd, report = converted_model
    state = model.state_dict()
    for official, ours in AGGREGATOR_PAIRS:
        assert torch.equal(state[ours], sd[AGG + official]), (official, ours)
    assert torch.equal(state["guidance_upsampler.upsample.0.weight"], sd["upsample1.weight"])
    assert torch.equal(state["guidance_upsampler.upsample.1.bias"], sd["upsample2.bias"])
    assert torch.equal(state["clip.logit_scale"], sd[CLIP + "logit_scale"])
    # every model tensor comes from exactly one checkpoint tensor (random values make accidental matches impossible)
    sources = [t for targets in report.converted.values() for t in targets]
    assert sorted(sources) == sorted(state)
    assert report.consumed == [f"{AGG}layers.{i}.swin_block.block_2.attn_mask" for i in range(2)]
    assert report.unmatched == [] and report.missing == []


def test_checkpoint_file_and_cli(tiny_config, tiny_path, tmp_path, capsys):
    sd = catseg_state_dict(tiny_config, seed=5)
    sd["sem_seg_head.predictor.clip_model.visual.transformer.extra_prompt"] = torch.zeros(2)
    sd["pixel_mean"] = torch.zeros(3, 1, 1)
    torch.save({"model": sd, "iteration": 80000, "__author__": "catseg"}, tmp_path / "model_base.pth")
    out = tmp_path / "converted"
    assert (
        main(["--checkpoint", str(tmp_path / "model_base.pth"), "--preset", str(tiny_path), "--output_dir", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "UNMATCHED checkpoint key: sem_seg_head.predictor.clip_model.visual.transformer.extra_prompt" in printed
    assert {"model.safetensors", "config.json", "processor_config.json", "conversion_report.json"} <= {
        p.name for p in out.iterdir()
    }
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["unmatched"] == ["sem_seg_head.predictor.clip_model.visual.transformer.extra_prompt"]
    assert "pixel_mean" in report["consumed"] and report["missing"] == []

    loaded = DiSaForOpenVocabSegmentation.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(loaded.state_dict()["decoder.head.weight"], sd[AGG + "head.weight"])
    assert torch.equal(loaded.state_dict()["clip.visual_projection.weight"], sd[CLIP + "visual.proj"].t())
    assert [n for n, p in loaded.named_parameters() if p.requires_grad and n.startswith("clip.")] == [
        n
        for n, p in loaded.named_parameters()
        if n.startswith("clip.")
        and ".encoder.layers." in n
        and n.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight"))
        and n not in loaded.unused_parameter_names()
    ]  # the dense last block's query projection stays frozen
    with pytest.raises(ValueError, match="strict"):
        convert_catseg_checkpoint(tmp_path / "model_base.pth", tiny_path, strict=True)


def test_not_a_catseg_checkpoint(tmp_path, tiny_path):
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(NotACatSegCheckpointError, match="not a CAT-Seg checkpoint"):
        convert_catseg_checkpoint(tmp_path / "other.pth", tiny_path)
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(NotACatSegCheckpointError, match="weights_only=True"):
        convert_catseg_checkpoint(tmp_path / "text.pth", tiny_path)
    torch.save({"model": {"a": torch.zeros(1)}, "opt": torch.optim.SGD}, tmp_path / "pickled.pth")
    with pytest.raises(NotACatSegCheckpointError, match="weights_only=True"):
        convert_catseg_checkpoint(tmp_path / "pickled.pth", tiny_path)
    with pytest.raises(FileNotFoundError):
        convert_catseg_checkpoint(tmp_path / "missing.pth", tiny_path)
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path / "other.pth"),
                "--preset",
                str(tiny_path),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )


def test_wrong_preset_or_incomplete_checkpoint(tiny_config, tmp_path, tiny_path):
    sd = catseg_state_dict(tiny_config)
    values = tiny_config.to_dict()
    for key in ("model_type", "transformers_version"):
        values.pop(key, None)
    values["hidden_dim"] = 48
    with pytest.raises(ValueError, match=r"conv1\.weight -> cost_embedding\.conv\.weight: checkpoint \(32, 1, 7, 7\)"):
        convert_catseg_state_dict(sd, DiSaForOpenVocabSegmentation(DiSaConfig(**values)))

    del sd[AGG + "head.bias"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"unset: decoder\.head\.bias"):
        convert_catseg_checkpoint(tmp_path / "partial.pth", tiny_path)

    sd = catseg_state_dict(tiny_config)
    sd[AGG + "layers.0.swin_block.block_2.attn_mask"] = torch.zeros_like(
        sd[AGG + "layers.0.swin_block.block_2.attn_mask"]
    )
    with pytest.raises(ValueError, match="shifted-window mask"):
        convert_catseg_state_dict(sd, DiSaForOpenVocabSegmentation(tiny_config))
