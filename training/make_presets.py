"""Writes the model presets in configuration/models/ (`python training/make_presets.py`).

- `disa-vit-b-16`: openai/clip-vit-base-patch16 geometry, CLIP input 384, DiSa (SDM + HRM on).
- `disa-vit-l-14-336`: openai/clip-vit-large-patch14-336 geometry, CLIP input 336, DiSa (SDM + HRM on).
- `disa-paper-vit-b-16`, `disa-paper-vit-l-14-336`: the same with the literal reading of the paper's SDM
  (`PAPER_SDM_SETTINGS`: ITM cross-attention over CLIP tokens with Grad-CAM saliency, fixed k = 96 of 576, weighted
  fusion of the two branches).
- `catseg-vit-b-16`, `catseg-vit-l-14-336`: the same with every DiSa switch off, i.e. exactly CAT-Seg.
- `disa-toy`, `catseg-toy`: the head of the offline toy world (the `training/toy_world` package, recipe
  `configuration/training/toy_world.yaml`); the CLIP towers come from the pretrained toy CLIP.
- `disa-tiny`: a tiny CLIP for tests and the offline demo, with a character-level CLIP tokenizer built locally and
  a processor saved beside the config, so `DiSaProcessor.from_pretrained` works offline. A copy goes to the
  package data `modeling_disa/presets/disa-tiny/` for `python -m modeling_disa.demo`, which must work from an
  installed wheel (no repository around it); tests/test_configuration.py checks that the copy equals this preset.

The presets hold configurations only; weights come from `DiSaForOpenVocabSegmentation.from_clip_pretrained` (or
random initialisation). The files are committed, this script documents and reproduces them.
"""

import json
import shutil
from pathlib import Path

from transformers import CLIPTokenizer

from modeling_disa import (
    PAPER_SDM_SETTINGS,
    DiSaConfig,
    DiSaForOpenVocabSegmentation,
    DiSaImageProcessor,
    DiSaProcessor,
)

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "configuration" / "models"
# The tiny preset as package data: the offline demo reads it from the installed package.
PACKAGED_PRESETS = REPO / "modeling_disa" / "presets"
PACKAGED = ("disa-tiny",)

OPENAI_TEXT_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=49408, max_position_embeddings=77)

VIT_B_16 = dict(
    text_config=dict(
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_hidden_layers=12,
        projection_dim=512,
        **OPENAI_TEXT_IDS,
    ),
    vision_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        image_size=224,
        patch_size=16,
        projection_dim=512,
    ),
    projection_dim=512,
    clip_resolution=384,
    guidance_layers=[3, 7],
)

VIT_L_14_336 = dict(
    text_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        **OPENAI_TEXT_IDS,
    ),
    vision_config=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=24,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    ),
    projection_dim=768,
    clip_resolution=336,
    guidance_layers=[7, 15],
)

TINY_VOCABULARY = ["cat", "dog", "grass", "sky", "road", "building, edifice"]


def char_level_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with an empty merge list: every character is a token (514 tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    base = [chr(c) for c in codes]
    tokens = base + [b + "</w>" for b in base] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


# The small head shared by the tiny test preset and the toy world (a 4-layer, 32/64-wide CLIP with an 8x8 grid).
SMALL_HEAD = dict(
    guidance_layers=[1, 2],
    window_size=4,
    hidden_dim=32,
    appearance_guidance_dim=32,
    text_guidance_dim=32,
    decoder_dims=[32, 16],
    decoder_guidance_dims=[32, 16],
    decoder_guidance_proj_dims=[8, 4],
    decoder_group_norm_channels=8,
)


def tiny_config(tokenizer: CLIPTokenizer) -> DiSaConfig:
    return DiSaConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=128,
            patch_size=16,
            projection_dim=32,
        ),
        projection_dim=32,
        clip_resolution=128,
        class_cap=16,
        **SMALL_HEAD,
    )


def toy_config(use_disa: bool) -> DiSaConfig:
    """Head for the toy world's tiny CLIP (64 px, patch 8: an 8x8 grid, 64-d towers; the tower configs below are
    placeholders replaced by `from_clip_pretrained`). No class cap: the toy vocabulary has 16 / 24 classes."""
    from toy_world import build_tokenizer

    tokenizer = build_tokenizer()
    return DiSaConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            projection_dim=64,
        ),
        projection_dim=64,
        clip_resolution=64,
        class_cap=0,
        **SMALL_HEAD,
        use_sdm=use_disa,
        use_hrm=use_disa,
    )


def strip_remote_code(folder: Path) -> None:
    """Presets are read through the installed package, so they carry no copies of its code (which would go
    stale) and no `auto_map` pointing at such copies."""
    for path in folder.glob("*.py"):
        path.unlink()
    for path in folder.glob("*config.json"):
        data = json.loads(path.read_text())
        data.pop("auto_map", None)
        if isinstance(data.get("image_processor"), dict):
            data["image_processor"].pop("auto_map", None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main() -> None:
    for name, values in (("vit-b-16", VIT_B_16), ("vit-l-14-336", VIT_L_14_336)):
        DiSaConfig(**values).save_pretrained(PRESETS / f"catseg-{name}")
        DiSaConfig(**values, use_sdm=True, use_hrm=True).save_pretrained(PRESETS / f"disa-{name}")
        DiSaConfig(**values, use_sdm=True, use_hrm=True, **PAPER_SDM_SETTINGS).save_pretrained(
            PRESETS / f"disa-paper-{name}"
        )

    toy_config(True).save_pretrained(PRESETS / "disa-toy")
    toy_config(False).save_pretrained(PRESETS / "catseg-toy")

    tokenizer = char_level_clip_tokenizer()
    config = tiny_config(tokenizer)
    # The default vocabulary's prompt tokens live in the config; the model is built on the meta device only
    # to reuse `set_default_vocabulary` and is not saved.
    import torch

    with torch.device("meta"):
        model = DiSaForOpenVocabSegmentation(config)
    model.set_default_vocabulary(TINY_VOCABULARY, tokenizer)
    model.config.save_pretrained(PRESETS / "disa-tiny")
    processor = DiSaProcessor(
        image_processor=DiSaImageProcessor(size={"height": 128, "width": 128}, patch_size=16),
        tokenizer=tokenizer,
        prompt_templates=list(config.prompt_templates),
    )
    processor.save_pretrained(PRESETS / "disa-tiny")
    for folder in (
        "catseg-vit-b-16",
        "catseg-vit-l-14-336",
        "disa-vit-b-16",
        "disa-vit-l-14-336",
        "disa-paper-vit-b-16",
        "disa-paper-vit-l-14-336",
        "disa-tiny",
        "disa-toy",
        "catseg-toy",
    ):
        strip_remote_code(PRESETS / folder)
    for name in PACKAGED:
        shutil.rmtree(PACKAGED_PRESETS / name, ignore_errors=True)
        shutil.copytree(PRESETS / name, PACKAGED_PRESETS / name)


if __name__ == "__main__":
    main()
