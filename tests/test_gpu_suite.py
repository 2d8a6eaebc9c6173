"""`benchmarks/gpu_suite.py --smoke` (CPU, disa-tiny) runs every section and writes a well-formed JSON, so the GPU
suite cannot rot between the times a GPU is available."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_disa import cpu_supports_dtype

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
    expected = {(t, d) for t in settings["classes"] for d in ("fp32", "bf16", "bf16_weights")}
    assert {(r["classes"], r["dtype"]) for r in rows} == expected
    bf16_here = cpu_supports_dtype(torch.bfloat16)
    for row in rows:
        assert "error" not in row, row
        if row["dtype"] == "bf16_weights" and not bf16_here:  # refused with the reason, not run slowly
            assert "refused" in row and "bfloat16" in row["refused"] and "latency_per_view_s" not in row
            continue
        assert positive(row["latency_per_view_s"]) and positive(row["views_per_s"])
        base = next(r for r in rows if (r["classes"], r["dtype"], r["compile"]) == (row["classes"], "fp32", False))
        ratio = base["latency_per_view_s"] / row["latency_per_view_s"]
        assert row["speedup_vs_fp32_eager"] == pytest.approx(ratio)
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
        assert positive(row["images_per_s"]) and positive(row["seconds_per_image"])


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


def test_miou_section_ran(report):
    miou = report["sections"]["miou"]["results"]
    assert miou["classes"] == 847 and miou["maps"] == report["settings"]["miou_maps"]
    assert positive(miou["maps_per_s"]) and 0 < miou["mean_iou"] <= 1


def load_benchmark(name, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record_updates(monkeypatch, alter=None):
    """Record the (prediction, target) maps given to the confusion matrix; `alter` changes the prediction first."""
    from modeling_disa.evaluation.metrics import SegmentationConfusionMatrix

    seen, update = [], SegmentationConfusionMatrix.update

    def recording(self, pred, target, *args, **kwargs):
        pred = alter(pred) if alter else pred
        seen.append((pred.numpy().copy(), target.numpy().copy()))
        return update(self, pred, target, *args, **kwargs)

    monkeypatch.setattr(SegmentationConfusionMatrix, "update", recording)
    return seen


def test_miou_section_scores_the_maps_it_generates(monkeypatch):
    """The mIoU the section reports, against IoU computed here with NumPy from the maps it fed the metric."""
    suite = load_benchmark("gpu_suite", monkeypatch)
    seen = record_updates(monkeypatch)
    cfg = {"miou_maps": 2, "iterations": 1, "warmup": 0}
    result = suite.miou(cfg, torch.device("cpu"), suite.Timer(torch.device("cpu")), None)
    assert len(seen) == 2
    pred = np.concatenate([p.ravel() for p, _ in seen])
    target = np.concatenate([t.ravel() for _, t in seen])
    valid = target != suite.MIOU_IGNORE
    pred, target = pred[valid].astype(np.int64), target[valid].astype(np.int64)
    classes = np.unique(target)  # the default rule averages over the classes present in the ground truth
    ious = [((pred == c) & (target == c)).sum() / ((pred == c) | (target == c)).sum() for c in classes]
    assert result["mean_iou"] == pytest.approx(float(np.mean(ious)), rel=1e-6)


def test_miou_section_refuses_a_confusion_matrix_that_differs_from_its_reference(monkeypatch):
    suite = load_benchmark("gpu_suite", monkeypatch)

    def one_wrong_pixel(pred):
        pred = pred.clone()
        pred[-1, -1] = (pred[-1, -1] + 1) % suite.MIOU_CLASSES
        return pred

    record_updates(monkeypatch, alter=one_wrong_pixel)
    cfg = {"miou_maps": 1, "iterations": 1, "warmup": 0}
    with pytest.raises(RuntimeError, match="differs from the CPU bincount reference"):
        suite.miou(cfg, torch.device("cpu"), suite.Timer(torch.device("cpu")), None)


# Dense bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets (where a datasheet prints only the 2:4-sparsity
# figure, halved here), keyed by the name `torch.cuda.get_device_name()` reports. Written from the datasheets, not
# from the table under test.
DATASHEET_DENSE_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 1979 / 2,  # H100 SXM
    "NVIDIA H100 PCIe": 1513 / 2,
    "NVIDIA H100 NVL": 1671 / 2,
    "NVIDIA H200": 1979 / 2,
    "NVIDIA H200 NVL": 1671 / 2,
    "NVIDIA GH200 480GB": 1979 / 2,
    "NVIDIA A100-SXM4-80GB": 624 / 2,
    "NVIDIA A100 80GB PCIe": 624 / 2,
    "NVIDIA L40S": 362.05,  # the datasheet's dense figure (its sparse one, 733, is rounded up)
    "NVIDIA L40": 362.1 / 2,
    "NVIDIA L4": 242 / 2,
    "NVIDIA A10": 250 / 2,
    "NVIDIA GeForce RTX 4090": 330.4 / 2,  # with FP32 accumulation (Ada whitepaper)
}


def test_mfu_peak_table(monkeypatch):
    module = load_benchmark("bench_common", monkeypatch)
    for name, tflops in DATASHEET_DENSE_BF16_TFLOPS.items():
        # 1 %: the table keeps three significant digits
        assert module.bf16_peak_flops(name)[0] == pytest.approx(tflops * 1e12, rel=0.01), name
    # every entry is reachable: a device named by a key gets that key's peak, not a shorter key's it contains
    for key, peak in module.BF16_PEAK_FLOPS.items():
        assert module.bf16_peak_flops(f"NVIDIA {key}")[0] == peak, key
    for name in ("Tesla V100-SXM2-16GB", "Tesla T4"):  # no bf16 tensor cores
        peak, note = module.bf16_peak_flops(name)
        assert peak is None and "no bf16 tensor-core peak" in note
    peak, note = module.bf16_peak_flops("Some Future GPU")
    assert peak is None and "unknown device" in note
