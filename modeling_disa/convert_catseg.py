"""Convert an official CAT-Seg checkpoint (detectron2 `.pth`, e.g. `model_base.pth` / `model_large.pth`) into a DiSa
model in CAT-Seg mode (`use_sdm=False`, `use_hrm=False`, `class_residual="catseg"`), saved as safetensors.

    python -m modeling_disa.convert_catseg --checkpoint model_base.pth \
        --preset configuration/models/disa-vit-b-16 --output_dir disa-catseg-vitb \
        [--tokenizer openai/clip-vit-base-patch16]

Key layout of the official checkpoint (detectron2 stores `{"model": state_dict, ...}`):

- `sem_seg_head.predictor.clip_model.*`: OpenAI CLIP names (CAT-Seg's vendored copy). Attention projections are
  split (`attn.q_proj_weight`, `attn.k_proj_weight`, `attn.v_proj_weight`) or fused (`attn.in_proj_weight`), the
  bias is always fused (`attn.in_proj_bias`); `visual.proj` and `text_projection` are `(in, out)` matrices and are
  transposed into HF's `nn.Linear` weights. The name mapping is `_BLOCK_NAMES` / `_CLIP_NAMES` / `_AGGREGATOR_RULES`
  below.
- `sem_seg_head.predictor.transformer.*`: the aggregator (`conv1`, `guidance_projection.0`,
  `text_guidance_projection.0`, `decoder_guidance_projection.{0,1}.0`, `layers.i.swin_block.*`,
  `layers.i.attention.*`, `decoder1`, `decoder2`, `head`).
- `upsample1` / `upsample2`: the meta-architecture's transposed convolutions on the guidance features.

The checkpoint is read with `torch.load(weights_only=True)` (no code execution). Every checkpoint key is either
converted, or consumed as a known non-weight buffer (the Swin shift masks, checked against the model's own), or
reported as unmatched; every model key must be filled (otherwise the conversion fails, naming the keys).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

CLIP_PREFIX = "sem_seg_head.predictor.clip_model."
AGGREGATOR_PREFIX = "sem_seg_head.predictor.transformer."
UPSAMPLE_PREFIXES = ("upsample1.", "upsample2.")
# Buffers of the detectron2 meta-architecture / CLIP wrapper that carry no weights.
NON_WEIGHT_KEYS = {"pixel_mean", "pixel_std", "clip_pixel_mean", "clip_pixel_std"}

# OpenAI residual-block sub-names -> HF CLIPEncoderLayer sub-names (projection weights handled separately).
_BLOCK_NAMES = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_CLIP_NAMES = {
    "visual.conv1.weight": "clip.vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "clip.vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "clip.vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "clip.vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "clip.vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "clip.vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "clip.vision_model.post_layernorm.bias",
    "token_embedding.weight": "clip.text_model.embeddings.token_embedding.weight",
    "positional_embedding": "clip.text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "clip.text_model.final_layer_norm.weight",
    "ln_final.bias": "clip.text_model.final_layer_norm.bias",
    "logit_scale": "clip.logit_scale",
}
_CLIP_TRANSPOSED = {"visual.proj": "clip.visual_projection.weight", "text_projection": "clip.text_projection.weight"}

# Aggregator: (regex on the name after `sem_seg_head.predictor.transformer.`, DiSa name template).
_AGGREGATOR_RULES = [
    (r"conv1\.(weight|bias)", "cost_embedding.conv.{0}"),
    (r"guidance_projection\.0\.(weight|bias)", "appearance_guidance.0.{0}"),
    (r"text_guidance_projection\.0\.(weight|bias)", "text_guidance.0.{0}"),
    (r"decoder_guidance_projection\.(\d+)\.0\.(weight|bias)", "guidance_upsampler.projection.{0}.0.{1}"),
    (
        r"layers\.(\d+)\.swin_block\.(block_[12])\.((?:norm1|norm2)\.(?:weight|bias))",
        "aggregator.layers.{0}.spatial.{1}.{2}",
    ),
    (
        r"layers\.(\d+)\.swin_block\.(block_[12])\.attn\.(q|k|v|proj)\.(weight|bias)",
        "aggregator.layers.{0}.spatial.{1}.attn.{2}.{3}",
    ),
    (
        r"layers\.(\d+)\.swin_block\.(block_[12])\.mlp\.(fc1|fc2)\.(weight|bias)",
        "aggregator.layers.{0}.spatial.{1}.mlp.{2}.{3}",
    ),
    (r"layers\.(\d+)\.swin_block\.guidance_norm\.(weight|bias)", "aggregator.layers.{0}.spatial.guidance_norm.{1}"),
    (r"layers\.(\d+)\.attention\.(norm1|norm2)\.(weight|bias)", "aggregator.layers.{0}.class_aggregation.{1}.{2}"),
    (
        r"layers\.(\d+)\.attention\.attention\.(q|k|v)\.(weight|bias)",
        "aggregator.layers.{0}.class_aggregation.attention.{1}.{2}",
    ),
    (r"layers\.(\d+)\.attention\.MLP\.(0|2)\.(weight|bias)", "aggregator.layers.{0}.class_aggregation.mlp.{1}.{2}"),
    (r"layers\.(\d+)\.attention\.(padding_tokens|padding_guidance)", "aggregator.layers.{0}.class_aggregation.{1}"),
    (r"decoder([12])\.up\.(weight|bias)", "decoder.up{0}.up.{1}"),
    (r"decoder([12])\.conv\.double_conv\.([0134])\.(weight|bias)", "decoder.up{0}.conv.block.{1}.{2}"),
    (r"head\.(weight|bias)", "decoder.head.{0}"),
]
_SHIFT_MASK = re.compile(r"layers\.(\d+)\.swin_block\.(block_[12])\.attn_mask")


class NotACatSegCheckpointError(ValueError):
    """The file or state dict does not have CAT-Seg's key layout."""


@dataclass
class ConversionReport:
    converted: dict[str, list[str]] = field(default_factory=dict)  # checkpoint key -> DiSa keys
    consumed: list[str] = field(default_factory=list)  # non-weight buffers, checked or ignored
    unmatched: list[str] = field(default_factory=list)  # checkpoint keys with no DiSa counterpart
    missing: list[str] = field(default_factory=list)  # DiSa keys the checkpoint did not fill

    def to_dict(self) -> dict:
        return {
            "converted": len(self.converted),
            "consumed": self.consumed,
            "unmatched": self.unmatched,
            "missing": self.missing,
        }


def extract_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """The tensor dict of a detectron2 checkpoint (`{"model": ...}`), a `{"state_dict": ...}` one or a bare one;
    a DistributedDataParallel `module.` prefix is removed."""
    if not isinstance(checkpoint, dict):
        raise NotACatSegCheckpointError(f"expected a dict checkpoint, got {type(checkpoint).__name__}.")
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in checkpoint.items()}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _clip_targets(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """DiSa keys and tensors for one OpenAI-CLIP key (without the CLIP prefix), or None if unknown."""
    if name in _CLIP_NAMES:
        return [(_CLIP_NAMES[name], tensor)]
    if name in _CLIP_TRANSPOSED:
        return [(_CLIP_TRANSPOSED[name], tensor.t().contiguous())]
    match = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", name)
    if match is None:
        return None
    tower = "vision_model" if match.group(1) else "text_model"
    base = f"clip.{tower}.encoder.layers.{match.group(2)}."
    sub = match.group(3)
    if sub in _BLOCK_NAMES:
        return [(base + _BLOCK_NAMES[sub], tensor)]
    split = re.fullmatch(r"attn\.([qkv])_proj_weight", sub)
    if split:
        return [(base + f"self_attn.{split.group(1)}_proj.weight", tensor)]
    if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
        if tensor.shape[0] % 3:
            raise ValueError(f"{name}: fused projection of shape {tuple(tensor.shape)} is not divisible by 3.")
        kind = "weight" if sub.endswith("weight") else "bias"
        return [
            (base + f"self_attn.{p}_proj.{kind}", part.contiguous()) for p, part in zip("qkv", tensor.chunk(3, dim=0))
        ]
    return None


def _aggregator_target(name: str) -> str | None:
    for pattern, template in _AGGREGATOR_RULES:
        match = re.fullmatch(pattern, name)
        if match:
            return template.format(*match.groups())
    return None


def convert_catseg_state_dict(checkpoint, model) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """
    Map a CAT-Seg state dict (or a detectron2 checkpoint dict) onto `model`'s state-dict keys.

    Returns the converted tensors (cast to the model's dtypes) and a `ConversionReport`. Raises
    `NotACatSegCheckpointError` when the layout is not CAT-Seg's, and `ValueError` naming the keys when tensor shapes
    differ from the model's (wrong preset) or model keys stay unfilled.
    """
    state = extract_state_dict(checkpoint)
    has_clip = any(k.startswith(CLIP_PREFIX) for k in state)
    has_aggregator = any(k.startswith(AGGREGATOR_PREFIX) for k in state)
    if not (has_clip and has_aggregator):
        sample = ", ".join(sorted(state)[:5]) or "no tensors"
        raise NotACatSegCheckpointError(
            f"not a CAT-Seg checkpoint: expected keys under {CLIP_PREFIX!r} and {AGGREGATOR_PREFIX!r} (found: "
            f"{sample}{', ...' if len(state) > 5 else ''})."
        )
    config = model.config
    if getattr(config, "use_sdm", False) or getattr(config, "use_hrm", False) or config.class_residual != "catseg":
        raise ValueError(
            "CAT-Seg weights need the model in CAT-Seg mode: use_sdm=False, use_hrm=False, class_residual='catseg'."
        )
    model_state = model.state_dict()
    report = ConversionReport()
    converted: dict[str, torch.Tensor] = {}
    mismatched = []

    def put(source: str, targets: list[tuple[str, torch.Tensor]]):
        report.converted[source] = [t for t, _ in targets]
        for target, tensor in targets:
            if target not in model_state:
                report.converted.pop(source, None)
                report.unmatched.append(source)
                return
            expected = model_state[target]
            if tensor.shape != expected.shape:
                if tensor.numel() == expected.numel() and target.endswith(("padding_tokens", "padding_guidance")):
                    tensor = tensor.reshape(expected.shape)
                else:
                    mismatched.append(
                        f"{source} -> {target}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected.shape)}"
                    )
                    continue
            converted[target] = tensor.to(expected.dtype)

    buffers = dict(model.named_buffers())
    for key, tensor in sorted(state.items()):
        if key.startswith(CLIP_PREFIX):
            targets = _clip_targets(key[len(CLIP_PREFIX) :], tensor)
        elif key.startswith(AGGREGATOR_PREFIX):
            name = key[len(AGGREGATOR_PREFIX) :]
            mask = _SHIFT_MASK.fullmatch(name)
            if mask:
                own = buffers.get(f"aggregator.layers.{mask.group(1)}.spatial.{mask.group(2)}.attn_mask")
                if own is None or own.shape != tensor.shape or not torch.equal(own.to(tensor.dtype), tensor):
                    raise ValueError(
                        f"{key}: the checkpoint's shifted-window mask does not match the model's (window_size / "
                        "clip_resolution of the preset differ from the checkpoint's)."
                    )
                report.consumed.append(key)
                continue
            target = _aggregator_target(name)
            targets = None if target is None else [(target, tensor)]
        elif key.startswith(UPSAMPLE_PREFIXES):
            index = int(key[len("upsample")]) - 1
            targets = [(f"guidance_upsampler.upsample.{index}.{key.split('.', 1)[1]}", tensor)]
        elif key in NON_WEIGHT_KEYS or key.rsplit(".", 1)[-1] in NON_WEIGHT_KEYS:
            report.consumed.append(key)
            continue
        else:
            targets = None
        if targets is None:
            report.unmatched.append(key)
        else:
            put(key, targets)

    if mismatched:
        raise ValueError(
            f"{len(mismatched)} CAT-Seg tensors do not fit the model (is the preset right for this checkpoint?): "
            + "; ".join(mismatched[:10])
        )
    report.missing = sorted(set(model_state) - set(converted))
    return converted, report


def load_catseg_checkpoint(path) -> dict[str, torch.Tensor]:
    """`torch.load(path, weights_only=True)` with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling fails in many ways (KeyError, UnpicklingError, ...)
        raise NotACatSegCheckpointError(
            f"could not read {str(path)!r} with torch.load(weights_only=True): it is not a plain tensor checkpoint "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})."
        ) from error
    return extract_state_dict(checkpoint)


def convert_catseg_checkpoint(
    checkpoint_path,
    preset,
    output_dir=None,
    *,
    tokenizer: str | None = None,
    strict: bool = False,
):
    """
    Build a DiSa model from `preset` (a config folder or a `DiSaConfig`), fill it from the CAT-Seg checkpoint and,
    with `output_dir`, save it (safetensors + config, plus the processor when the preset folder has one or
    `tokenizer` names a CLIP tokenizer) with `conversion_report.json`.

    `strict=True` also fails on unmatched checkpoint keys (they are only reported otherwise).
    Returns `(model, report)`.
    """
    from .model.configuration_disa import DiSaConfig
    from .model.modeling_disa import DiSaForOpenVocabSegmentation

    state = load_catseg_checkpoint(checkpoint_path)
    config = preset if isinstance(preset, DiSaConfig) else DiSaConfig.from_pretrained(preset)
    model = DiSaForOpenVocabSegmentation(config)
    converted, report = convert_catseg_state_dict(state, model)
    if report.missing:
        raise ValueError(
            f"the checkpoint leaves {len(report.missing)} model tensors unset: {', '.join(report.missing[:10])}"
            f"{', ...' if len(report.missing) > 10 else ''}"
        )
    if strict and report.unmatched:
        raise ValueError(f"unmatched checkpoint keys (strict): {', '.join(report.unmatched[:20])}")
    model.load_state_dict(converted, strict=True)
    model.configure_clip_finetuning(model.config.clip_finetune)
    model.eval()
    if output_dir is not None:
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir)
        processor = _processor_for(preset, tokenizer, config)
        if processor is not None:
            processor.save_pretrained(output_dir)
        (output_dir / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=1))
    return model, report


def _processor_for(preset, tokenizer, config):
    from .model.image_processing_disa import DiSaImageProcessor
    from .model.processing_disa import DiSaProcessor

    if tokenizer is not None:
        from transformers import AutoTokenizer

        size = {"height": config.clip_resolution, "width": config.clip_resolution}
        image_processor = DiSaImageProcessor(size=size, patch_size=config.vision_config.patch_size)
        return DiSaProcessor(
            image_processor, AutoTokenizer.from_pretrained(tokenizer), prompt_templates=list(config.prompt_templates)
        )
    if isinstance(preset, (str, Path)) and (Path(preset) / "processor_config.json").is_file():
        return DiSaProcessor.from_pretrained(preset)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="CAT-Seg .pth (detectron2 format)")
    parser.add_argument("--preset", required=True, help="DiSa config folder, e.g. configuration/models/disa-vit-b-16")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--tokenizer", default=None, help="CLIP tokenizer to save beside (e.g. openai/clip-vit-base-patch16)"
    )
    parser.add_argument("--strict", action="store_true", help="fail on unmatched checkpoint keys")
    args = parser.parse_args(argv)
    try:
        _, report = convert_catseg_checkpoint(
            args.checkpoint, args.preset, args.output_dir, tokenizer=args.tokenizer, strict=args.strict
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}")
        return 1
    print(f"converted {len(report.converted)} checkpoint tensors into {args.output_dir}")
    for key in report.consumed:
        print(f"consumed (not a weight): {key}")
    for key in report.unmatched:
        print(f"UNMATCHED checkpoint key: {key}")
    return 0


__all__ = [
    "ConversionReport",
    "NotACatSegCheckpointError",
    "convert_catseg_checkpoint",
    "convert_catseg_state_dict",
    "extract_state_dict",
    "load_catseg_checkpoint",
]

if __name__ == "__main__":
    raise SystemExit(main())
