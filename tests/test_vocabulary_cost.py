"""DiSa costs what CAT-Seg mode costs at any vocabulary size: above `class_cap`, what DiSa adds (SDM's presence /
saliency head, the background branch, HRM) works on the capped classes only, so neither its FLOPs nor its operator
count grow with the full vocabulary, and its peak memory stays within CAT-Seg mode's. (The class aggregation runs
its background branch on every token and overwrites the foreground rows, so its FLOPs include the background layers
on the foreground rows too: a count of at most `class_cap` classes per pooled pixel, set by SDM's split, not by
the vocabulary; the test counts those rows and takes their FLOPs out.) All three are counted, not
timed: FLOPs with `torch.utils.flop_counter.FlopCounterMode`, operators with a dispatch-mode counter, memory as the
peak of live tensor bytes recorded by `torch.profiler` (allocation sizes, the same on any machine and load)."""

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from modeling_disa import PAPER_SDM_SETTINGS, DiSaConfig, DiSaForOpenVocabSegmentation
from modeling_disa.model.routing import TokenRoute

TINY = Path(__file__).resolve().parents[1] / "configuration" / "models" / "disa-tiny"


def tiny(disa: bool, **settings) -> DiSaForOpenVocabSegmentation:
    config = DiSaConfig.from_pretrained(TINY)
    config.use_sdm = config.use_hrm = disa
    for key, value in settings.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return DiSaForOpenVocabSegmentation(config).eval()


def inputs(model, classes: int):
    g = torch.Generator().manual_seed(0)
    config = model.config
    embeds = torch.randn(classes, config.num_prompts, config.projection_dim, generator=g)
    pixels = torch.randn(1, 3, config.clip_resolution, config.clip_resolution, generator=g)
    return {"pixel_values": pixels, "text_embeds": torch.nn.functional.normalize(embeds, dim=-1)}


class OperatorCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def flops_and_operators(model, classes: int, monkeypatch=None) -> tuple[int, int, int]:
    """-> (FLOPs, operators, foreground rows that the class aggregation's background branch also computed)."""
    overwritten = []
    if monkeypatch is not None:
        overwrite = TokenRoute.overwrite

        def counting(route, full, foreground):
            overwritten.append(foreground.shape[0])
            return overwrite(route, full, foreground)

        monkeypatch.setattr(TokenRoute, "overwrite", counting)
    counter, operators = FlopCounterMode(display=False), OperatorCount()
    with torch.inference_mode(), counter, operators:
        model(**inputs(model, classes))
    if monkeypatch is not None:
        monkeypatch.setattr(TokenRoute, "overwrite", overwrite)
    # four overwrites per class-aggregation layer (q, k, v, the update), each of the layer's foreground rows
    assert len(overwritten) % 4 == 0 and all(n == overwritten[i - i % 4] for i, n in enumerate(overwritten))
    return counter.get_total_flops(), operators.count, sum(overwritten) // 4


def background_row_flops(model) -> int:
    """FLOPs of one token through a class-aggregation layer's background per-token layers (q, k, v, the update)."""
    config = model.config
    layers = model.aggregator.layers[0].class_aggregation.background
    x, guidance = torch.zeros(1, config.hidden_dim), torch.zeros(1, config.text_guidance_dim)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        layers.project(x, guidance)
        layers.update(x, x)
    return counter.get_total_flops()


def peak_live_bytes(model, classes: int) -> int:
    """Peak of the bytes held by tensors allocated during one forward (above what was live before it)."""
    batch = inputs(model, classes)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**batch)
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("settings", [{}, PAPER_SDM_SETTINGS], ids=["shipped", "paper-sdm"])
def test_what_disa_adds_does_not_grow_with_the_vocabulary(settings, monkeypatch):
    disa, catseg = tiny(True, **settings), tiny(False)
    cap = disa.config.class_cap
    costs = {
        t: (flops_and_operators(disa, t, monkeypatch), flops_and_operators(catseg, t)) for t in (cap + 8, 4 * cap, 847)
    }
    row = background_row_flops(disa)
    assert any(d[2] for d, _ in costs.values())  # some foreground rows: the term taken out below is not always 0
    extra_flops = {t: d[0] - c[0] - d[2] * row for t, (d, c) in costs.items()}
    extra_operators = {t: d[1] - c[1] for t, (d, c) in costs.items()}
    assert min(extra_flops.values()) > 0  # DiSa's modules ran
    assert len(set(extra_flops.values())) == 1, extra_flops  # the same at 24, 64 and 847 classes
    assert len(set(extra_operators.values())) == 1, extra_operators  # no loop over the full vocabulary
    (disa_847, catseg_847) = costs[847]
    assert disa_847[0] / catseg_847[0] <= 1.05


@pytest.mark.parametrize("sdm", [{}, PAPER_SDM_SETTINGS], ids=["shipped", "paper-sdm"])
def test_disa_peak_memory_is_within_catseg_modes(sdm):
    # a wide head on the tiny CLIP (hidden 128, the ViT-B head's width): the class aggregation's MLP, not CLIP or
    # the 4x decoder, holds the peak, as in the ViT-B presets
    settings = {"hidden_dim": 128, "appearance_guidance_dim": 128, "text_guidance_dim": 128}
    disa, catseg = tiny(True, **settings, **sdm), tiny(False, **settings)
    for classes in (12, 24):  # below and above the class cap (16)
        ratio = peak_live_bytes(disa, classes) / peak_live_bytes(catseg, classes)
        assert ratio <= 1.05, (classes, ratio)
