"""benchmarks/cost_curves.py on disa-tiny (class cap 16): rows, summary, Markdown, PNG, and resuming (no timing)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(output, *extra):
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "cost_curves.py"),
        "--presets",
        "disa-tiny",
        "--classes",
        "8",
        "16",
        "24",
        "--sides",
        "160",
        "--side_classes",
        "8",
        "--threads",
        "1",
        "--output",
        str(output),
        *extra,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cost_curves_rows_outputs_and_resume(tmp_path):
    output = tmp_path / "curves.json"
    run(output)
    data = json.loads(output.read_text())
    rows = {(r["curve"], r["classes"], r["side"]): r for r in data["rows"]}
    assert set(rows) == {("classes", 8, 128), ("classes", 16, 128), ("classes", 24, 128), ("sides", 8, 160)}
    assert rows[("sides", 8, 160)]["views"] == 5  # 2x2 windows of 128 (stride 85) over 160, plus the global view
    for row in rows.values():
        assert row["mode"] == "CAT-Seg" and row["class_cap"] == 16
        assert row["latency_s"] > 0 and row["peak_memory_mib"] >= 0 and len(row["times_s"]) == 1
    summary = data["summary"]["disa-tiny"]
    assert summary["class_cap"] == 16
    assert set(summary) == {"class_cap", "latency_ratio_24_vs_16", "memory_ratio_24_vs_16", "latency_ratio_16_vs_8"}
    assert all(summary[key] > 0 for key in summary)  # the values themselves: test_summary_ratios_on_known_rows
    assert "memory_method" in data and data["threads"] == 1 and data["machine"]["torch"]
    assert output.with_suffix(".md").read_text().count("| CAT-Seg |") == 4
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = output.read_text()
    stdout = run(output)  # every row is already there: nothing re-measured
    assert stdout.count("kept from") == 4 and output.read_text() == before


def row(preset, mode, curve, classes, side, latency, memory=100.0):
    return dict(
        preset=preset,
        mode=mode,
        curve=curve,
        classes=classes,
        side=side,
        class_cap=16,
        latency_s=latency,
        peak_memory_mib=memory,
    )


def test_summary_ratios_on_known_rows(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("cost_curves", REPO / "benchmarks" / "cost_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [
        row("catseg", "CAT-Seg", "classes", 8, 384, 1.0, 50.0),
        row("catseg", "CAT-Seg", "classes", 16, 384, 2.0, 100.0),
        row("catseg", "CAT-Seg", "classes", 24, 384, 3.0, 150.0),
        row("catseg", "CAT-Seg", "classes", 32, 384, 5.0, 400.0),
        row("catseg", "CAT-Seg", "sides", 32, 640, 50.0, 4000.0),  # another curve: not a classes point
        row("disa", "DiSa", "classes", 16, 384, 2.2),
        row("disa", "DiSa", "classes", 32, 384, 5.5),
        row("disa", "DiSa", "sides", 32, 640, 60.0),
    ]
    summary = module.summary(rows)
    assert summary["catseg"] == {
        "class_cap": 16,
        "latency_ratio_32_vs_16": 2.5,
        "memory_ratio_32_vs_16": 4.0,
        "latency_ratio_16_vs_8": 2.0,
    }
    assert summary["disa"]["latency_ratio_32_vs_16"] == 2.5
    assert summary["latency_ratio_disa_vs_catseg"] == {
        "classes/16": pytest.approx(1.1),
        "classes/32": pytest.approx(1.1),
        "sides/640": pytest.approx(1.2),
    }
