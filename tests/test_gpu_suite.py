"""`benchmarks/gpu_suite.py --smoke` (CPU, disa-tiny) runs every section and writes a well-formed JSON, so the GPU
suite cannot rot between the times a GPU is available."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = {"view_latency", "sliding_window", "train_step", "miou"}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu_suite") / "smoke.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--smoke", "--output", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(output.read_text())


def test_header_names_the_device_and_versions(report):
    assert report["smoke"] is True and report["device"] == "cpu"
    assert report["device_name"] and report["machine"]["torch"] and report["machine"]["transformers"]
    assert set(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["ok"], f"{name}: {section.get('error')}\n{section.get('traceback')}"
        assert positive(section["seconds"])
    assert positive(report["elapsed_s"])


def test_view_latency_rows(report):
    rows = report["sections"]["view_latency"]["results"]
    settings = report["settings"]
    expected = {(t, d) for t in settings["classes"] for d in ("fp32", "bf16")}
    assert {(r["classes"], r["dtype"]) for r in rows} == expected
    for row in rows:
        assert "error" not in row, row
        assert positive(row["latency_per_view_s"]) and positive(row["views_per_s"])
    compiled = [r for r in rows if r["compile"]]
    assert len(compiled) == 1 and positive(compiled[0]["compile_s"])
    assert compiled[0]["compile_backend"] == settings["compile_backend"]
    for key in ("graph_breaks", "unique_graphs", "guard_failures"):
        assert isinstance(compiled[0][key], int) and compiled[0][key] >= 0
    assert compiled[0]["unique_graphs"] >= 1


def test_sliding_window_rows(report):
    rows = report["sections"]["sliding_window"]["results"]
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    for row in rows:
        assert row["image_hw"] == report["settings"]["image_hw"] and row["views_per_image"] == 5
        assert positive(row["images_per_s"]) and math.isclose(row["images_per_s"] * row["seconds_per_image"], 1)


def test_train_step_rows(report):
    rows = report["sections"]["train_step"]["results"]
    assert [r["gradient_checkpointing"] for r in rows] == [False, True]
    for row in rows:
        assert row["dtype"] == "bf16"
        for key in (
            "step_time_s",
            "peak_memory_gib",
            "flops_per_step",
            "achieved_tflops",
            "final_loss",
            "trainable_params",
            "total_params",
        ):
            assert positive(row[key]), key
        assert row["trainable_params"] < row["total_params"]
        assert row["mfu"] is None and "cpu" in row["mfu_note"]  # MFU is defined against a CUDA bf16 peak
    assert rows[0]["flops_per_step"] == rows[1]["flops_per_step"]  # model FLOPs, counted once


def test_miou_matches_the_reference(report):
    miou = report["sections"]["miou"]["results"]
    assert miou["classes"] == 847 and miou["matches_cpu_reference"] is True
    assert positive(miou["maps_per_s"]) and 0 < miou["mean_iou"] <= 1


def test_mfu_peak_table():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "bench_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.bf16_peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert module.bf16_peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert module.bf16_peak_flops("NVIDIA L40S")[0] == 362e12
    assert module.bf16_peak_flops("NVIDIA L4")[0] == 121e12
    assert module.bf16_peak_flops("NVIDIA A10")[0] == 125e12
    assert module.bf16_peak_flops("NVIDIA GeForce RTX 4090")[0] == 165e12
    peak, note = module.bf16_peak_flops("Some Future GPU")
    assert peak is None and "unknown device" in note
