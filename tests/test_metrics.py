"""Confusion-matrix metrics vs independent NumPy computations (loops / histograms), both averaging rules."""

import os

import numpy as np
import pytest
import torch
from simulated_ranks import run_ranks, seen_until

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

from modeling_disa.evaluation.metrics import SegmentationConfusionMatrix, metrics_from_confusion_matrix  # noqa: E402

METRIC_DIR = os.path.join(os.path.dirname(__file__), "..", "modeling_disa", "evaluation", "disa_mean_iou")


def ref_counts(preds, gts, k, ignore):
    """Per-class intersection / prediction area / label area with per-class boolean loops (no confusion matrix)."""
    inter = np.zeros(k)
    parea = np.zeros(k)
    larea = np.zeros(k)
    for p, g in zip(preds, gts):
        m = g != ignore
        p, g = p[m].astype(np.int64), g[m].astype(np.int64)
        for c in range(k):
            pc, gc = p == c, g == c
            inter[c] += np.sum(pc & gc)
            parea[c] += pc.sum()
            larea[c] += gc.sum()
    return inter, parea, larea


def ref_metrics(preds, gts, k, ignore, rule):
    inter, parea, larea = ref_counts(preds, gts, k, ignore)
    union = parea + larea - inter
    sel = larea > 0 if rule == "present_in_gt" else union > 0
    iou = [inter[c] / union[c] for c in range(k) if sel[c]]
    acc = [inter[c] / larea[c] for c in range(k) if larea[c] > 0]
    return np.mean(iou), np.mean(acc), inter.sum() / larea.sum(), inter, union, larea


def random_maps(rng, n, k, ignore, shape=(17, 23), absent=()):
    preds, gts = [], []
    for _ in range(n):
        g = rng.integers(0, k, shape)
        for a in absent:
            g[g == a] = (a + 1) % k
        g[rng.random(shape) < 0.15] = ignore
        p = np.where(rng.random(shape) < 0.6, np.where(g == ignore, 0, g), rng.integers(0, k, shape))
        preds.append(p)
        gts.append(g)
    return preds, gts


@pytest.mark.parametrize("rule", ["present_in_gt", "present_in_gt_or_pred"])
@pytest.mark.parametrize("k,ignore", [(7, 255), (30, 65535)])
def test_matches_numpy_reference(rule, k, ignore):
    rng = np.random.default_rng(k)
    preds, gts = random_maps(rng, 5, k, ignore, absent=(2, 3))  # classes 2, 3 absent from GT but predicted
    cm = SegmentationConfusionMatrix(k, ignore)
    for p, g in zip(preds, gts):
        cm.update(torch.from_numpy(p), torch.from_numpy(g))
    r = cm.compute(rule=rule)
    miou, macc, pacc, inter, union, larea = ref_metrics(preds, gts, k, ignore, rule)
    assert r["mean_iou"] == pytest.approx(miou, abs=1e-12)
    assert r["mean_accuracy"] == pytest.approx(macc, abs=1e-12)
    assert r["overall_accuracy"] == pytest.approx(pacc, abs=1e-12)
    assert r["num_pixels"] == larea.sum()
    iou = r["per_category_iou"]
    for c in range(k):
        if (rule == "present_in_gt" and larea[c] == 0) or union[c] == 0:
            assert np.isnan(iou[c])
        else:
            assert iou[c] == pytest.approx(inter[c] / union[c])
    # the two rules differ exactly by the predicted-but-absent classes (IoU 0 in the second rule)
    if rule == "present_in_gt_or_pred":
        assert iou[2] == 0.0 and iou[3] == 0.0


def test_rules_differ_as_documented():
    # GT: all class 0; prediction: half class 0, half class 1 -> present_in_gt: IoU_0 = 0.5 ; gt_or_pred: (0.5+0)/2
    g = np.zeros((4, 4), dtype=np.int64)
    p = g.copy()
    p[:, 2:] = 1
    cm = SegmentationConfusionMatrix(3, 255)
    cm.update(p, g)
    assert cm.compute("present_in_gt")["mean_iou"] == pytest.approx(0.5)
    assert cm.compute("present_in_gt_or_pred")["mean_iou"] == pytest.approx(0.25)
    assert cm.compute("present_in_gt")["overall_accuracy"] == pytest.approx(0.5)


def test_batched_numpy_uint16_and_dataset_accumulation_equal_per_image():
    rng = np.random.default_rng(0)
    preds, gts = random_maps(rng, 6, 12, 65535)
    a = SegmentationConfusionMatrix(12, 65535)
    a.update(np.stack(preds), np.stack(gts).astype(np.uint16))
    b = SegmentationConfusionMatrix(12, 65535)
    for p, g in zip(preds, gts):
        b.update(torch.from_numpy(p).to(torch.int32), torch.from_numpy(g.astype(np.int64)))
    assert torch.equal(a.confusion, b.confusion)
    # confusion[i, j] = #pixels with gt i predicted j (independent count)
    i, j = 3, 5
    direct = sum(int(np.sum((g == i) & (p == j))) for p, g in zip(preds, gts))
    assert int(a.confusion[i, j]) == direct
    # dataset-wide mIoU is not the mean of per-image mIoUs
    per_image = []
    for p, g in zip(preds, gts):
        c = SegmentationConfusionMatrix(12, 65535)
        c.update(p, g)
        per_image.append(c.compute()["mean_iou"])
    assert a.compute()["mean_iou"] != pytest.approx(np.mean(per_image), abs=1e-9)


def test_reduce_across_processes_sums():
    rng = np.random.default_rng(1)
    preds, gts = random_maps(rng, 4, 9, 255)
    parts = []
    for r in range(2):  # two "ranks", each sees half of the data
        c = SegmentationConfusionMatrix(9, 255)
        for p, g in list(zip(preds, gts))[r::2]:
            c.update(p, g)
        parts.append(c)
    whole = SegmentationConfusionMatrix(9, 255)
    for p, g in zip(preds, gts):
        whole.update(p, g)
    other = parts[1].confusion.clone()
    parts[0].reduce(lambda t: t + other)  # stand-in for accelerator.reduce(t, "sum")
    assert torch.equal(parts[0].confusion, whole.confusion)
    assert parts[0].compute()["mean_iou"] == whole.compute()["mean_iou"]
    # no reduce_fn and no process group -> unchanged
    before = whole.confusion.clone()
    whole.reduce()
    assert torch.equal(before, whole.confusion)


def bincount_confusion(pairs, k, ignore):
    """Independent reference: (K, K) counts of every (prediction, ground truth) pair given, by np.bincount."""
    cm = np.zeros((k, k), np.int64)
    for p, g in pairs:
        m = g != ignore
        cm += np.bincount(g[m].astype(np.int64) * k + p[m].astype(np.int64), minlength=k * k).reshape(k, k)
    return cm


def test_update_reduce_update_counts_every_pixel_once():
    """Single process: any interleaving of update and reduce (with or without a reduce_fn) counts each pixel once."""
    k, ignore = 6, 255
    p = np.array([[0, 1]])
    g = np.array([[0, 1]])
    cm = SegmentationConfusionMatrix(k, ignore)
    cm.update(p, g)
    cm.reduce()
    cm.update(p, g)
    assert int(cm.confusion.sum()) == 4
    np.testing.assert_array_equal(cm.confusion.numpy(), bincount_confusion([(p, g)] * 2, k, ignore))

    rng = np.random.default_rng(7)
    preds, gts = random_maps(rng, 9, k, ignore)
    steps = ["update", "reduce", "update", "update", "reduce", "reduce", "update", "compute", "update", "reduce"]
    for reduce_fn in (None, lambda t: t.clone()):  # no process group / accelerate's single-process reduce
        cm = SegmentationConfusionMatrix(k, ignore)
        cm.reduce(reduce_fn)  # reduce before any update is allowed and counts nothing
        seen = []
        for step, (p, g) in zip(steps * 2, zip(preds * 2, gts * 2)):
            if step == "update":
                cm.update(p, g)
                seen.append((p, g))
            elif step == "reduce":
                cm.reduce(reduce_fn)
            else:
                res = cm.compute()
                assert res["num_pixels"] == sum(int(np.sum(g != ignore)) for _, g in seen)
            np.testing.assert_array_equal(cm.confusion.numpy(), bincount_confusion(seen, k, ignore))


def test_reduce_under_interleaved_updates_simulated_all_reduce():
    """Two ranks in threads with a barrier-synchronised sum (the semantics of accelerate's reduce(t, "sum")):
    after every reduce both ranks hold the counts of all pixels either rank has seen, each once."""
    k, ignore, world = 5, 255, 2
    rng = np.random.default_rng(3)
    data = [random_maps(rng, 6, k, ignore, shape=(7, 9)) for _ in range(world)]
    # per step: how many maps each rank adds before the collective reduce (uneven on purpose, zeros included)
    plan = [(1, 0), (2, 1), (0, 0), (1, 3), (2, 2)]
    results = run_ranks(
        lambda: SegmentationConfusionMatrix(k, ignore), lambda m: m.confusion.numpy().copy(), data, plan
    )
    for step in range(len(plan)):
        expected = bincount_confusion(seen_until(data, plan, step), k, ignore)
        for rank in range(world):
            np.testing.assert_array_equal(results[rank][step], expected, err_msg=f"rank {rank}, step {step}")


def test_reduce_with_torch_distributed_process_group(tmp_path):
    """The default path (no reduce_fn, a process group initialised): update -> reduce -> update -> reduce."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        k, ignore = 4, 255
        p, g = np.array([[0, 1, 2]]), np.array([[0, 1, 255]])
        cm = SegmentationConfusionMatrix(k, ignore)
        cm.update(p, g)
        cm.reduce()
        cm.update(p, g)
        cm.reduce()
        cm.reduce()
        np.testing.assert_array_equal(cm.confusion.numpy(), bincount_confusion([(p, g)] * 2, k, ignore))
    finally:
        dist.destroy_process_group()


def test_reduce_rejects_a_reduction_that_is_not_a_sum():
    cm = SegmentationConfusionMatrix(3, 255)
    cm.update(np.array([[0, 1, 2]]), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="gather"):
        cm.reduce(lambda t: torch.cat([t, t]))  # accelerator.gather instead of reduce
    with pytest.raises(ValueError, match="integers"):
        cm.reduce(lambda t: t.double())
    with pytest.raises(ValueError, match="not average"):
        cm.reduce(lambda t: t // 2)
    np.testing.assert_array_equal(cm.confusion.numpy(), np.eye(3, dtype=np.int64))  # state untouched


def test_voc20b_fold():
    cm = SegmentationConfusionMatrix(21, 255, prediction_fold=(20, 20), num_pred_classes=59)
    g = np.array([[20, 20, 3, 255]])
    p = np.array([[45, 20, 3, 58]])
    cm.update(p, g)
    assert int(cm.confusion[20, 20]) == 2 and int(cm.confusion[3, 3]) == 1 and int(cm.confusion.sum()) == 3
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.array([[59]]), np.array([[0]]))


def test_bad_inputs():
    cm = SegmentationConfusionMatrix(10, 255)
    with pytest.raises(ValueError, match="not the ignore value"):
        cm.update(np.zeros((2, 2), int), np.array([[1, 12], [255, 0]]))
    with pytest.raises(ValueError, match="not the ignore value"):  # 16-bit ignore given to an 8-bit dataset
        cm.update(np.zeros((1, 2), int), np.array([[65535, 0]]))
    with pytest.raises(ValueError, match="not the ignore value"):
        cm.update(np.zeros((1, 2), int), np.array([[-1, 0]]))
    with pytest.raises(ValueError, match="does not match label shape"):
        cm.update(np.zeros((3, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.full((2, 2), 10), np.zeros((2, 2), int))
    with pytest.raises(TypeError):
        cm.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="collides"):
        SegmentationConfusionMatrix(300, 255)
    assert int(cm.confusion.sum()) == 0  # failed updates leave the state untouched


def test_bf16_and_device_agnostic_inputs():
    cm = SegmentationConfusionMatrix(4, 255, device="cpu")
    cm.update(torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8), torch.tensor([[0, 1], [2, 255]], dtype=torch.uint8))
    assert cm.compute()["mean_iou"] == pytest.approx(1.0)
    assert cm.compute(nan_to_num=0.0)["per_category_iou"][3] == 0.0


def test_metrics_from_confusion_matrix_direct():
    cm = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    r = metrics_from_confusion_matrix(cm)
    assert r["per_category_iou"][0] == pytest.approx(5 / 8) and r["per_category_iou"][1] == pytest.approx(2 / 5)
    assert np.isnan(r["per_category_iou"][2]) and r["mean_iou"] == pytest.approx((5 / 8 + 2 / 5) / 2)
    assert r["overall_accuracy"] == pytest.approx(7 / 10)


# ------------------------------------------------------------------ evaluate module
def histogram_mean_iou(preds, gts, k, ignore):
    """mean_iou's formulas (histograms per map, nanmean over classes with union > 0), written independently."""
    ti = np.zeros(k)
    tp = np.zeros(k)
    tl = np.zeros(k)
    for p, g in zip(preds, gts):
        m = g != ignore
        p, g = p[m], g[m]
        ti += np.histogram(p[p == g], bins=k, range=(0, k - 1))[0]
        tp += np.histogram(p, bins=k, range=(0, k - 1))[0]
        tl += np.histogram(g, bins=k, range=(0, k - 1))[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = ti / (tp + tl - ti)
        acc = ti / tl
    return np.nanmean(iou), np.nanmean(acc), ti.sum() / tl.sum(), iou, acc


@pytest.fixture(scope="module")
def hub_metric():
    import evaluate

    return evaluate.load(METRIC_DIR)


def test_evaluate_module_matches_mean_iou_formulas(hub_metric):
    rng = np.random.default_rng(3)
    preds, gts = random_maps(rng, 3, 11, 255, shape=(9, 13), absent=(4,))
    gts += [rng.integers(0, 11, (5, 7))]
    preds += [rng.integers(0, 11, (5, 7))]  # sizes differ between maps
    r = hub_metric.compute(predictions=preds, references=gts, num_labels=11, ignore_index=255)
    miou, macc, oacc, iou, acc = histogram_mean_iou(preds, gts, 11, 255)
    assert r["mean_iou"] == pytest.approx(miou) and r["mean_accuracy"] == pytest.approx(macc)
    assert r["overall_accuracy"] == pytest.approx(oacc)
    np.testing.assert_allclose(r["per_category_iou"], iou, equal_nan=True)
    np.testing.assert_allclose(r["per_category_accuracy"], acc, equal_nan=True)
    # the published rule agrees with the torch accumulator
    r2 = hub_metric.compute(
        predictions=preds, references=gts, num_labels=11, ignore_index=255, miou_rule="present_in_gt"
    )
    cm = SegmentationConfusionMatrix(11, 255)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    assert r2["mean_iou"] == pytest.approx(cm.compute()["mean_iou"])


def load_evaluate_module_file():
    """The evaluate module's source file as a plain module (what `evaluate.load(path)` executes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("disa_mean_iou_copy", os.path.join(METRIC_DIR, "disa_mean_iou.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rule", ["present_in_gt", "present_in_gt_or_pred"])
@pytest.mark.parametrize("nan_to_num", [None, -1.0])
def test_evaluate_module_arithmetic_is_the_package_copy(rule, nan_to_num):
    """disa_mean_iou.py carries a copy of metrics.py's confusion-matrix arithmetic (it must stay self-contained): on
    random confusion matrices with absent, predicted-only and empty classes, and on random label maps, the two give
    the same confusion matrices and the same metrics."""
    copy = load_evaluate_module_file()
    rng = np.random.default_rng(11)
    for k in (1, 5, 23):
        cm = rng.integers(0, 50, (k, k))
        cm[rng.random((k, k)) < 0.3] = 0
        cm[rng.integers(0, k)] = 0  # a class absent from the ground truth (predicted, perhaps)
        if k > 2:
            cm[:, rng.integers(0, k)] = 0  # a class never predicted
        ours = metrics_from_confusion_matrix(cm, rule=rule, nan_to_num=nan_to_num)
        theirs = copy.metrics_from_confusion(cm, rule=rule, nan_to_num=nan_to_num)
        for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
            np.testing.assert_allclose(theirs[key], ours[key], rtol=1e-12, equal_nan=True, err_msg=key)
        for key in ("per_category_iou", "per_category_accuracy"):
            np.testing.assert_allclose(theirs[key], ours[key], rtol=1e-12, equal_nan=True, err_msg=key)
    np.testing.assert_array_equal(
        copy.metrics_from_confusion(np.zeros((3, 3)))["per_category_iou"],
        metrics_from_confusion_matrix(np.zeros((3, 3)), rule="present_in_gt_or_pred")["per_category_iou"],
    )
    preds, gts = random_maps(rng, 4, 9, 255, absent=(2,))
    accumulated = SegmentationConfusionMatrix(9, 255)
    total = np.zeros((9, 9), np.int64)
    for p, g in zip(preds, gts):
        accumulated.update(p, g)
        total += copy.confusion_matrix(p, g, 9, 255)
    np.testing.assert_array_equal(total, accumulated.confusion.numpy())


def test_evaluate_module_16bit_reduce_labels_label_map_nan_to_num(hub_metric):
    g = np.array([[846, 0], [65535, 3]], dtype=np.uint16)
    r = hub_metric.compute(
        predictions=[np.array([[846, 0], [7, 2]])], references=[g], num_labels=847, ignore_index=65535
    )
    assert r["mean_iou"] == pytest.approx((1 + 1 + 0 + 0) / 4)  # classes 846, 0 hit; 3 missed; 2 predicted only
    # reduce_labels: 0 -> ignore, k -> k-1 (ADE-150 raw annotations)
    raw = np.array([[0, 1], [2, 150]], dtype=np.uint8)
    r = hub_metric.compute(
        predictions=[np.array([[5, 0], [1, 149]])],
        references=[raw],
        num_labels=150,
        ignore_index=255,
        reduce_labels=True,
        nan_to_num=-1,
    )
    assert r["mean_iou"] == pytest.approx(1.0) and r["per_category_iou"][5] == -1
    r = hub_metric.compute(
        predictions=[np.array([[1, 1]])],
        references=[np.array([[0, 1]])],
        num_labels=2,
        ignore_index=255,
        label_map={0: 1},
    )
    assert r["mean_iou"] == pytest.approx(1.0)


def test_evaluate_module_bad_input(hub_metric):
    with pytest.raises(ValueError, match="not ignore_index"):
        hub_metric.compute(
            predictions=[np.zeros((2, 2), int)], references=[np.full((2, 2), 9)], num_labels=5, ignore_index=255
        )
    with pytest.raises(ValueError, match="does not match"):
        hub_metric.compute(
            predictions=[np.zeros((2, 3), int)], references=[np.zeros((2, 2), int)], num_labels=5, ignore_index=255
        )
