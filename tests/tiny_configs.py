"""Paths of the model presets and tiny DiSa configurations built in code for unit tests (a plain module: tests import
it as `from tiny_configs import ...`; fixtures live in conftest.py)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configuration" / "models"
TINY = PRESETS / "disa-tiny"
PRESET_NAMES = sorted(p.name for p in PRESETS.iterdir() if (p / "config.json").is_file())


def tiny_config(**overrides):
    """The tiny preset's configuration (2-layer 32-wide CLIP towers, 128 px input) with `overrides` applied."""
    from modeling_disa import DiSaConfig

    return DiSaConfig.from_pretrained(TINY, **overrides)


def tiny_variant(preset: str, **overrides):
    """The `preset`'s architecture switches (SDM, HRM, saliency source, foreground split, fusion, residual and
    fine-tuning modes, prompt templates, whether the class axis is padded) on the tiny preset's CLIP towers and
    widths, so that every preset's code paths run in a CPU test."""
    from modeling_disa import DiSaConfig

    def values(config):
        out = config.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "auto_map"):
            out.pop(key, None)
        return out

    tiny, source = values(DiSaConfig.from_pretrained(TINY)), values(DiSaConfig.from_pretrained(PRESETS / preset))
    listed = ("hrm_stages", "prompt_templates", "presence_threshold", "foreground_ratio")
    switches = {k: v for k, v in source.items() if isinstance(v, (bool, str)) or k in listed}
    tiny.update(switches)
    tiny["class_cap"] = tiny["class_cap"] if source["class_cap"] > 0 else 0
    if len(source["prompt_templates"]) != 1:
        tiny.pop("label_token_ids", None)
    tiny.update(overrides)
    return DiSaConfig(**tiny)
