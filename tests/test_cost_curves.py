"""benchmarks/cost_curves.py: interleaved DiSa / CAT-Seg pairs, ratios, FLOPs, sanity checks, outputs, resuming and
the README row (no timing is asserted: only what the script computes from the times it is given)."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent


def load_script(monkeypatch, name):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def curves(monkeypatch):
    return load_script(monkeypatch, "cost_curves")


def tiny_flops(disa: bool, classes: int) -> float:
    """FLOPs of one 128-pixel view of the tiny preset (DiSa: SDM and HRM on), counted here, on the script's inputs
    (DiSa's FLOPs depend on them through SDM's count of foreground tokens)."""
    from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation

    config = DiSaConfig.from_pretrained(REPO / "configuration" / "models" / "disa-tiny")
    config.use_sdm = config.use_hrm = disa
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(config).eval()
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(classes, config.num_prompts, config.projection_dim, generator=g)
    embeds = torch.nn.functional.normalize(embeds, dim=-1)
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(pixel_values=pixels, text_embeds=embeds)
    return counter.get_total_flops()


def run(output, *extra):
    cmd = [sys.executable, str(REPO / "benchmarks" / "cost_curves.py"), "--quick", "--threads", "1"]
    cmd += ["--output", str(output), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_quick_run_end_to_end_and_resume(tmp_path):
    """The smoke run: one round of each model per point, each in its own interpreter (4 runs)."""
    output = tmp_path / "curves.json"
    proc = run(output, "--classes", "24", "--sides", "160", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(output.read_text())
    assert data["schema"] == 2 and data["threads"] == 1 and data["machine"]["torch"]
    # the code beside the script is measured, not an installed modeling_disa
    assert data["code"]["modeling_disa"] == str(REPO / "modeling_disa")
    assert data["pair"]["disa"] == {"preset": "disa-tiny", "settings": {"use_sdm": True, "use_hrm": True}}
    points = {p["key"]: p for p in data["points"]}
    assert set(points) == {"classes/24", "sides/160"}
    view, window = points["classes/24"], points["sides/160"]
    assert (view["height"], view["width"], view["views"], view["class_cap"]) == (128, 128, 1, 16)
    assert window["views"] == 5  # 2x2 windows of 128 (stride 85) over 160, plus the global view
    for p in points.values():
        for model in ("disa", "catseg"):
            assert len(p[model]["times_s"]) == len(p[model]["cpu_times_s"]) == 1 and p[model]["median_s"] > 0
        assert p["ratio"] == pytest.approx(p["disa"]["times_s"][0] / p["catseg"]["times_s"][0], rel=1e-3)
    # FLOPs of the single view against a count made here; the sliding window: 5 model calls on 128-pixel views
    assert view["disa"]["gflops"] * 1e9 == pytest.approx(tiny_flops(True, 24), rel=1e-9)
    assert view["catseg"]["gflops"] * 1e9 == pytest.approx(tiny_flops(False, 24), rel=1e-9)
    assert window["catseg"]["gflops"] * 1e9 == pytest.approx(5 * tiny_flops(False, 8), rel=1e-9)
    assert data["sanity"]["passed"] is False  # one round per point is not a result
    assert sum("fewer than 3" in flag for flag in data["sanity"]["flags"]) == 2
    table = output.with_suffix(".md").read_text()
    assert "\n| classes | 24 | 128x128 | 1 |" in table and "\n| sides | 8 | 160x160 | 5 |" in table
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = output.read_text()
    proc = run(output, "--classes", "24", "--sides", "160", "--repeats", "1")  # nothing re-measured
    assert proc.returncode == 0 and proc.stdout.count("kept from") == 2 and output.read_text() == before
    proc = run(output, "--classes", "24", "--sides", "--threads", "2")  # another setting: refused, not mixed in
    assert proc.returncode != 0 and "thread(s)" in proc.stderr and output.read_text() == before


def fake_run(times: dict, calls: list):
    """A `run_worker` stand-in: times[(key, model)] per round, in the order the script asks for them."""
    rounds = {}

    def run_worker(spec):
        model = "disa" if spec["settings"].get("use_sdm") else "catseg"
        index = rounds.setdefault((spec["key"], model), 0)
        rounds[(spec["key"], model)] = index + 1
        calls.append((spec["key"], model, spec["count_flops"]))
        seconds = times[(spec["key"], model)][index]
        side = spec["height"] or 128
        return {
            "time_s": seconds,
            "cpu_time_s": seconds / 2,
            "peak_memory_mib": 110.0 if model == "disa" else 100.0,
            "gflops": (2.0 if model == "disa" else 1.0) if spec["count_flops"] else None,
            "height": side,
            "width": spec["width"] or 128,
            "views": 1 if spec["curve"] == "classes" else 5,
            "warp": None if spec["curve"] == "classes" else min(side, spec["width"]),
            "mode": "DiSa" if model == "disa" else "CAT-Seg",
            "class_cap": 16,
            "threads": 1,
            "load_1min_before": 1.0,
            "load_1min_after": 1.5,
        }

    return run_worker


def test_rounds_interleave_and_the_ratio_is_the_median_per_round_ratio(curves, monkeypatch, tmp_path):
    # the load triples between rounds: the absolute times swing, the ratio within a round does not
    times = {("classes/24", "disa"): [1.1, 3.6, 3.3], ("classes/24", "catseg"): [1.0, 3.0, 3.0]}
    calls = []
    monkeypatch.setattr(curves, "run_worker", fake_run(times, calls))
    output = tmp_path / "curves.json"
    assert curves.main(["--quick", "--classes", "24", "--sides", "--threads", "1", "--output", str(output)]) == 0
    assert calls == [
        ("classes/24", "disa", True),
        ("classes/24", "catseg", True),
        ("classes/24", "catseg", False),
        ("classes/24", "disa", False),
        ("classes/24", "disa", False),
        ("classes/24", "catseg", False),
    ]
    (point,) = json.loads(output.read_text())["points"]
    per_round = [d / c for d, c in zip(times[("classes/24", "disa")], times[("classes/24", "catseg")])]
    assert point["ratio"] == pytest.approx(statistics.median(per_round), abs=1e-4)
    assert (point["ratio_min"], point["ratio_max"]) == pytest.approx((min(per_round), max(per_round)), abs=1e-4)
    assert point["disa"]["median_s"] == 3.3 and point["disa"]["spread"] == pytest.approx((3.6 - 1.1) / 3.3, abs=1e-4)
    assert point["memory_ratio"] == pytest.approx(1.1) and point["flop_ratio"] == pytest.approx(2.0)
    assert point["orders"] == [["disa", "catseg"], ["catseg", "disa"], ["disa", "catseg"]]
    # the README row reads the ratios from this layout
    readme = load_script(monkeypatch, "update_readme")
    ((_, command, text),) = readme.cost_curve_rows(json.loads(output.read_text()))
    assert "--classes 24" in command
    assert f"latency {statistics.median(per_round):.2f}, peak memory 1.10, FLOPs 2.000" in text
    assert "memory not met (max 1.10)" in text


def synthetic(curves, key, curve, classes, side, views, disa, catseg, gflops=(1.0, 1.0), cap=16):
    def runs(times, g):
        return [
            {
                "time_s": t,
                "cpu_time_s": t,
                "peak_memory_mib": 100.0,
                "gflops": g if i == 0 else None,
                "views": views,
                "warp": None,
                "class_cap": cap,
                "threads": 1,
                "load_1min_after": 1.0,
            }
            for i, t in enumerate(times)
        ]

    base = {"key": key, "curve": curve, "classes": classes, "height": side[0], "width": side[1]}
    return curves.pair_point(base, {"disa": runs(disa, gflops[0]), "catseg": runs(catseg, gflops[1])}, [])


def test_sanity_checks_flag_points_that_cannot_be_right(curves):
    def point(key, classes, times, gflops, curve="classes", side=(128, 128), views=1):
        return synthetic(curves, key, curve, classes, side, views, times, times, (gflops, gflops))

    good = [
        point("classes/8", 8, [1.0, 1.05, 1.1], 1.0),
        point("classes/16", 16, [2.0, 2.1, 2.2], 2.0),
        point("classes/24", 24, [2.1, 2.2, 2.3], 2.1),
        point("sides/128", 8, [2.0, 2.0, 2.1], 2.0, "sides", (128, 128), 2),
        point("sides/160", 8, [5.0, 5.1, 5.2], 5.0, "sides", (160, 160), 5),
        point("sides/160x213", 8, [5.1, 5.1, 5.2], 5.0, "sides", (160, 213), 5),
    ]
    assert curves.sanity(good) == {"passed": True, "flags": []}

    def flags(replace):
        points = [replace.get(p["key"], p) for p in good]
        return curves.sanity(points)["flags"]

    # the time at 16 classes (the cap) below the time at 8 classes, while the FLOPs double
    flagged = flags({"classes/16": point("classes/16", 16, [0.9, 0.9, 0.95], 2.0)})
    assert any(f.startswith("classes/16 DiSa: time 0.9 does not grow") for f in flagged)
    # above the cap only the cost volume grows: 1.74x the time at the cap is not load-free
    flagged = flags({"classes/24": point("classes/24", 24, [3.4, 3.5, 3.6], 2.1)})
    assert any(f.startswith("classes/24 CAT-Seg: time 1.67x that at the class cap") for f in flagged)
    # 2 views taking longer than 5 (the committed curve's 106 s vs 97 s)
    flagged = flags({"sides/128": point("sides/128", 8, [5.3, 5.4, 5.5], 2.0, "sides", (128, 128), 2)})
    assert any(
        f.startswith("sides/160 DiSa: time 5.1 s below sides/128's 5.4 s although it has more views") for f in flagged
    )
    # noisy rounds; a point whose seconds per GFLOP is 3x the others'
    flagged = flags({"classes/8": point("classes/8", 8, [1.0, 1.05, 1.5], 1.0)})
    assert any(f.startswith("classes/8 DiSa: spread") for f in flagged)
    flagged = flags({"sides/160x213": point("sides/160x213", 8, [15.0, 15.1, 15.2], 5.0, "sides", (160, 213), 5)})
    assert any(f.startswith("sides/160x213 DiSa:") and "ms per GFLOP" in f for f in flagged)
    # fewer than 3 rounds
    flagged = flags({"classes/8": point("classes/8", 8, [1.0, 1.05], 1.0)})
    assert "classes/8: 2 round(s), fewer than 3" in flagged


def test_the_pair_must_be_one_disa_and_one_catseg_model(curves, tmp_path):
    out = str(tmp_path / "x.json")
    with pytest.raises(SystemExit, match="is a CAT-Seg model, not DiSa"):
        curves.main(["--quick", "--disa_set", "--output", out])
    with pytest.raises(ValueError, match="no config setting 'use_sdmm'"):
        curves.main(["--quick", "--disa_set", "use_sdmm=true", "--output", out])
    with pytest.raises(SystemExit):
        curves.parse(["--quick", "--sides", "640x"])


def test_the_single_run_layout_still_renders(monkeypatch):
    """The first layout (no `schema`, one unpaired run per model and point) keeps its README row."""
    readme = load_script(monkeypatch, "update_readme")
    row = dict(curve="classes", side=384, views=1, class_cap=256, latency_per_view_s=1.0, latency_s=1.0)
    data = {
        "threads": 1,
        "rows": [
            {**row, "mode": "DiSa", "classes": 10, "peak_memory_mib": 110.0},
            {**row, "mode": "CAT-Seg", "classes": 10, "peak_memory_mib": 100.0},
        ],
    }
    ((_, _, text),) = readme.cost_curve_rows(data)
    assert "DiSa: T = 10: 1.0 s per view, 110 MiB" in text and "not reliable" in text
