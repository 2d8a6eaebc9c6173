"""Boundary IoU and foreground-bias rates vs direct references: the official `mask_to_boundary` (cv2 erosions) per
image and class, and plain pixel counting; the `evaluate` module's options and its checked copies."""

import os

import cv2
import numpy as np
import pytest
import torch
from simulated_ranks import run_ranks, seen_until

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

from modeling_disa.evaluation.boundary import (  # noqa: E402
    BoundaryIoU,
    boundary_dilation,
    boundary_iou_from_counts,
    boundary_labels,
)
from modeling_disa.evaluation.metrics import SegmentationConfusionMatrix, foreground_bias_rates  # noqa: E402

METRIC_DIR = os.path.join(os.path.dirname(__file__), "..", "modeling_disa", "evaluation", "disa_mean_iou")


# ------------------------------------------------------------------ references
def official_mask_to_boundary(mask: np.ndarray, dilation_ratio: float) -> np.ndarray:
    """The Boundary IoU API's `mask_to_boundary` (boundary_iou/utils/boundary_utils.py), written out."""
    h, w = mask.shape
    dilation = int(round(dilation_ratio * np.sqrt(h**2 + w**2)))
    if dilation < 1:
        dilation = 1
    new_mask = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    new_mask_erode = cv2.erode(new_mask, np.ones((3, 3), dtype=np.uint8), iterations=dilation)
    return mask - new_mask_erode[1 : h + 1, 1 : w + 1]


def reference_boundary_counts(preds, gts, k, ignore, dilation_ratio, fold=None):
    """Per class, summed over images: |Gb & Pb|, |Gb | Pb|, GT presence; G and P restricted to non-ignored pixels."""
    inter = np.zeros(k)
    union = np.zeros(k)
    in_gt = np.zeros(k, bool)
    in_pred = np.zeros(k, bool)
    for p, g in zip(preds, gts):
        if fold is not None:
            p = np.where(p >= fold[0], fold[1], p)
        valid = g != ignore
        for c in range(k):
            gm = ((g == c) & valid).astype(np.uint8)
            pm = ((p == c) & valid).astype(np.uint8)
            gb = official_mask_to_boundary(gm, dilation_ratio).astype(bool)
            pb = official_mask_to_boundary(pm, dilation_ratio).astype(bool)
            inter[c] += np.sum(gb & pb)
            union[c] += np.sum(gb | pb)
            in_gt[c] |= bool(gm.any())
            in_pred[c] |= bool(pm.any())
    return inter, union, in_gt, in_pred


def reference_boundary_iou(preds, gts, k, ignore, dilation_ratio, rule="present_in_gt", fold=None):
    inter, union, in_gt, in_pred = reference_boundary_counts(preds, gts, k, ignore, dilation_ratio, fold)
    keep = in_gt if rule == "present_in_gt" else in_gt | in_pred
    per_class = np.full(k, np.nan)
    per_class[keep] = inter[keep] / union[keep]
    return float(np.mean(per_class[keep])), per_class


def structured_maps(rng, n, k, ignore, shape):
    """Blocky scenes (upsampled coarse labels + drawn discs) with VOC-like ignore bands on contours and ignore
    noise; the prediction is the ground truth shifted and partly relabelled."""
    preds, gts = [], []
    h, w = shape
    for _ in range(n):
        coarse = rng.integers(0, k, (rng.integers(2, 5), rng.integers(2, 5))).astype(np.uint8)
        g = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int64)
        for _ in range(2):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            radius = int(rng.integers(2, max(3, min(h, w) // 3)))
            disc = np.zeros((h, w), np.uint8)
            cv2.circle(disc, centre, radius, 1, -1)
            g[disc > 0] = rng.integers(0, k)
            band = np.zeros((h, w), np.uint8)
            cv2.circle(band, centre, radius, 1, 1)
            g[band > 0] = ignore
        g[rng.random(shape) < 0.05] = ignore
        p = np.roll(np.where(g == ignore, rng.integers(0, k, shape), g), (1, -2), axis=(0, 1))
        relabel = cv2.resize(
            (rng.random((3, 3)) < 0.3).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST
        ).astype(bool)
        p[relabel] = (p[relabel] + 1) % k
        preds.append(p)
        gts.append(g)
    return preds, gts


# ------------------------------------------------------------------ boundary IoU
@pytest.mark.parametrize("dilation", [1, 2, 3, 6])
def test_window_boundary_equals_iterated_cv2_erosion(dilation):
    """d erosions with a 3x3 square (cv2, one pixel of zero padding) == one (2d+1) window, per mask."""
    rng = np.random.default_rng(dilation)
    for shape in [(1, 9), (12, 15), (31, 20)]:
        coarse = (rng.random((4, 4)) < 0.5).astype(np.uint8)
        mask = cv2.resize(coarse, shape[::-1], interpolation=cv2.INTER_NEAREST)
        mask[rng.random(shape) < 0.1] ^= 1
        h, w = shape
        ratio = (dilation - 0.4) / np.sqrt(h**2 + w**2)  # rounds to `dilation`
        assert boundary_dilation(h, w, ratio) == dilation
        expected = official_mask_to_boundary(mask, ratio)
        labels = torch.from_numpy(np.where(mask > 0, 0, 1))[None]  # class 0 = the mask, 1 = outside
        ours = (boundary_labels(labels, dilation, outside=1)[0] == 0).numpy()
        np.testing.assert_array_equal(ours, expected.astype(bool))


@pytest.mark.parametrize("rule", ["present_in_gt", "present_in_gt_or_pred"])
@pytest.mark.parametrize(
    "k,ignore,shape,ratio", [(5, 255, (24, 31), 0.02), (6, 255, (90, 120), 0.02), (9, 65535, (40, 37), 0.1)]
)
def test_boundary_iou_matches_official_reference(rule, k, ignore, shape, ratio):
    rng = np.random.default_rng(k)
    preds, gts = structured_maps(rng, 4, k, ignore, shape)
    preds[0][preds[0] == k - 1] = 0  # a class present in the ground truth, never predicted
    metric = BoundaryIoU(k, ignore, dilation_ratio=ratio)
    for p, g in zip(preds, gts):
        metric.update(torch.from_numpy(p), torch.from_numpy(g))
    r = metric.compute(rule=rule)
    mean, per_class = reference_boundary_iou(preds, gts, k, ignore, ratio, rule)
    assert r["mean_boundary_iou"] == pytest.approx(mean, abs=1e-12)
    np.testing.assert_allclose(r["per_category_boundary_iou"], per_class, rtol=1e-12, equal_nan=True)
    assert 0 < mean < 1
    if shape == (90, 120):
        assert boundary_dilation(*shape) == 3  # the width the official rounding gives: round(0.02 * 150)


def test_boundary_iou_accumulates_over_images_not_per_image_mean():
    rng = np.random.default_rng(5)
    shapes = [(20, 26), (33, 17), (64, 48)]  # sizes (so widths) differ between images
    preds, gts = [], []
    for s in shapes:
        p, g = structured_maps(rng, 1, 4, 255, s)
        preds += p
        gts += g
    metric = BoundaryIoU(4, 255)
    per_image = []
    for p, g in zip(preds, gts):
        metric.update(p, g)
        one = BoundaryIoU(4, 255)
        one.update(p, g)
        per_image.append(one.compute()["mean_boundary_iou"])
    mean, _ = reference_boundary_iou(preds, gts, 4, 255, 0.02)
    assert metric.compute()["mean_boundary_iou"] == pytest.approx(mean, abs=1e-12)
    assert mean != pytest.approx(np.mean(per_image), abs=1e-6)


def test_boundary_iou_batch_numpy_uint16_and_perfect_prediction():
    rng = np.random.default_rng(2)
    preds, gts = structured_maps(rng, 3, 7, 65535, (30, 40))
    a = BoundaryIoU(7, 65535)
    a.update(np.stack(preds), np.stack(gts).astype(np.uint16))
    b = BoundaryIoU(7, 65535)
    for p, g in zip(preds, gts):
        b.update(torch.from_numpy(p).to(torch.int32), torch.from_numpy(g))
    assert torch.equal(a.counts, b.counts)
    # ignore bands do not cost a prediction that equals the ground truth on the scored pixels
    perfect = BoundaryIoU(7, 65535)
    for g in gts:
        perfect.update(np.where(g == 65535, 3, g), g)
    assert perfect.compute()["mean_boundary_iou"] == 1.0


def test_boundary_iou_prediction_fold_as_pas20b():
    rng = np.random.default_rng(8)
    gts = [rng.integers(0, 3, (3, 4)).repeat(6, 0).repeat(6, 1) for _ in range(2)]  # scored classes 0..2
    preds = [np.where(g == 2, rng.integers(2, 6, g.shape), g) for g in gts]  # "background" spread over ids 2..5
    gts[0][0, :5] = 255
    metric = BoundaryIoU(3, 255, prediction_fold=(2, 2), num_pred_classes=6)
    for p, g in zip(preds, gts):
        metric.update(p, g)
    mean, per_class = reference_boundary_iou(preds, gts, 3, 255, 0.02, fold=(2, 2))
    assert metric.compute()["mean_boundary_iou"] == pytest.approx(mean, abs=1e-12)
    np.testing.assert_allclose(metric.compute()["per_category_boundary_iou"], per_class, equal_nan=True)


def reference_counts(pairs, k, ignore, dilation_ratio=0.02):
    """Independent reference of BoundaryIoU's state: per class, summed over the (prediction, ground truth) pairs
    given, |Gb & Pb|, |Gb| and |Pb| from the official `mask_to_boundary` (G and P restricted to scored pixels)."""
    counts = np.zeros((3, k), np.int64)
    for p, g in pairs:
        valid = g != ignore
        for c in range(k):
            gb = official_mask_to_boundary(((g == c) & valid).astype(np.uint8), dilation_ratio).astype(bool)
            pb = official_mask_to_boundary(((p == c) & valid).astype(np.uint8), dilation_ratio).astype(bool)
            counts[:, c] += [np.sum(gb & pb), gb.sum(), pb.sum()]
    return counts


def test_boundary_iou_reduce_across_simulated_processes_sums_each_pixel_once():
    """Two "ranks", each sees half of the maps; rank 0 reduces, updates again and reduces twice more, the other
    rank's counts standing still: every map counts once."""
    rng = np.random.default_rng(3)
    preds, gts = structured_maps(rng, 5, 5, 255, (21, 27))
    pairs = list(zip(preds, gts))
    parts = []
    for rank in range(2):
        m = BoundaryIoU(5, 255)
        for p, g in pairs[:4][rank::2]:
            m.update(p, g)
        parts.append(m)
    other = parts[1].counts.clone()

    def sum_with_other_rank(t):  # stand-in for accelerator.reduce(t, "sum"): returns a new tensor
        return t + other

    parts[0].reduce(sum_with_other_rank)
    np.testing.assert_array_equal(parts[0].counts.numpy(), reference_counts(pairs[:4], 5, 255))
    whole = BoundaryIoU(5, 255)
    for p, g in pairs[:4]:
        whole.update(p, g)
    assert parts[0].compute()["mean_boundary_iou"] == whole.compute()["mean_boundary_iou"]
    parts[0].update(*pairs[4])  # an update after the reduce lands on top of the summed counts
    np.testing.assert_array_equal(parts[0].counts.numpy(), reference_counts(pairs, 5, 255))
    for _ in range(2):  # a repeated reduce counts the other rank once
        parts[0].reduce(sum_with_other_rank)
        np.testing.assert_array_equal(parts[0].counts.numpy(), reference_counts(pairs, 5, 255))


def test_boundary_iou_update_reduce_update_counts_every_pixel_once():
    """Single process: any interleaving of update and reduce (with or without a reduce_fn) counts each pixel once."""
    k, ignore = 4, 255
    rng = np.random.default_rng(4)
    preds, gts = structured_maps(rng, 5, k, ignore, (15, 18))
    m = BoundaryIoU(k, ignore)
    m.update(preds[0], gts[0])
    m.reduce()
    m.update(preds[0], gts[0])
    np.testing.assert_array_equal(m.counts.numpy(), reference_counts([(preds[0], gts[0])] * 2, k, ignore))

    steps = ["update", "reduce", "update", "update", "reduce", "reduce", "update", "compute", "update", "reduce"]
    for reduce_fn in (None, lambda t: t.clone()):  # no process group / accelerate's single-process reduce
        m = BoundaryIoU(k, ignore)
        m.reduce(reduce_fn)  # reduce before any update is allowed and counts nothing
        seen = []
        for step, (p, g) in zip(steps, zip(preds * 2, gts * 2)):
            if step == "update":
                m.update(p, g)
                seen.append((p, g))
            elif step == "reduce":
                m.reduce(reduce_fn)
            else:
                expected = reference_counts(seen, k, ignore)
                per_class = boundary_iou_from_counts(*expected)["per_category_boundary_iou"]
                np.testing.assert_array_equal(m.compute()["per_category_boundary_iou"], per_class)
            np.testing.assert_array_equal(m.counts.numpy(), reference_counts(seen, k, ignore))


def test_boundary_iou_reduce_under_interleaved_updates_simulated_all_reduce():
    """Two ranks in threads with a barrier-synchronised sum (the semantics of accelerate's reduce(t, "sum")):
    after every reduce both ranks hold the counts of all maps either rank has seen, each once."""
    k, ignore, world = 4, 255, 2
    rng = np.random.default_rng(6)
    data = [structured_maps(rng, 5, k, ignore, (13, 16)) for _ in range(world)]
    # per step: how many maps each rank adds before the collective reduce (uneven on purpose, zeros included)
    plan = [(1, 0), (2, 1), (0, 0), (1, 2), (1, 2)]
    results = run_ranks(lambda: BoundaryIoU(k, ignore), lambda m: m.counts.numpy().copy(), data, plan)
    for step in range(len(plan)):
        expected = reference_counts(seen_until(data, plan, step), k, ignore)
        for rank in range(world):
            np.testing.assert_array_equal(results[rank][step], expected, err_msg=f"rank {rank}, step {step}")


def test_boundary_iou_reduce_with_torch_distributed_process_group(tmp_path):
    """The default path (no reduce_fn, a process group initialised): update -> reduce -> update -> reduce."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rng = np.random.default_rng(9)
        (p,), (g,) = structured_maps(rng, 1, 3, 255, (12, 14))
        m = BoundaryIoU(3, 255)
        m.update(p, g)
        m.reduce()
        m.update(p, g)
        m.reduce()
        m.reduce()
        np.testing.assert_array_equal(m.counts.numpy(), reference_counts([(p, g)] * 2, 3, 255))
    finally:
        dist.destroy_process_group()


def test_boundary_iou_reduce_rejects_a_reduction_that_is_not_a_sum():
    rng = np.random.default_rng(10)
    (p,), (g,) = structured_maps(rng, 1, 3, 255, (12, 14))
    m = BoundaryIoU(3, 255)
    m.update(p, g)
    with pytest.raises(ValueError, match="gather"):
        m.reduce(lambda t: torch.cat([t, t]))  # accelerator.gather instead of reduce
    with pytest.raises(ValueError, match="gather"):
        m.reduce(lambda t: t.sum(0))
    with pytest.raises(ValueError, match="integers"):
        m.reduce(lambda t: t.double())
    with pytest.raises(ValueError, match="not average"):
        m.reduce(lambda t: t // 2)
    np.testing.assert_array_equal(m.counts.numpy(), reference_counts([(p, g)], 3, 255))  # state untouched
    m.counts.zero_()  # `counts` is a copy: editing it changes nothing
    np.testing.assert_array_equal(m.counts.numpy(), reference_counts([(p, g)], 3, 255))


def test_boundary_iou_bad_inputs():
    m = BoundaryIoU(4, 255)
    with pytest.raises(ValueError, match="not the ignore value"):
        m.update(np.zeros((2, 2), int), np.array([[1, 7], [255, 0]]))
    with pytest.raises(ValueError, match="outside"):
        m.update(np.full((2, 2), 4), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="does not match label shape"):
        m.update(np.zeros((3, 2), int), np.zeros((2, 3), int))
    with pytest.raises(TypeError):
        m.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), int))
    assert int(m.counts.sum()) == 0  # failed updates leave the state untouched
    with pytest.raises(ValueError, match="dilation_ratio"):
        BoundaryIoU(4, 255, dilation_ratio=0.0)
    with pytest.raises(ValueError, match="collides"):
        BoundaryIoU(300, 255)
    with pytest.raises(ValueError, match="Unknown mIoU averaging rule"):
        m.compute(rule="mean")
    with pytest.raises(ValueError, match="dilation ratios"):
        m.merge(BoundaryIoU(4, 255, dilation_ratio=0.05))


# ------------------------------------------------------------------ foreground bias
def direct_foreground_bias(preds, gts, is_thing, ignore, fold=None):
    stuff_n = thing_n = stuff_as_thing = thing_as_stuff = 0
    for p, g in zip(preds, gts):
        if fold is not None:
            p = np.where(p >= fold[0], fold[1], p)
        v = g != ignore
        g_thing = is_thing[np.where(v, g, 0)] & v
        g_stuff = ~is_thing[np.where(v, g, 0)] & v
        p_thing = is_thing[p]
        stuff_n += g_stuff.sum()
        thing_n += g_thing.sum()
        stuff_as_thing += (g_stuff & p_thing).sum()
        thing_as_stuff += (g_thing & ~p_thing).sum()
    return stuff_as_thing / stuff_n, thing_as_stuff / thing_n, stuff_n, thing_n


def test_foreground_bias_matches_pixel_counting():
    rng = np.random.default_rng(4)
    k = 10
    is_thing = np.zeros(k, bool)
    is_thing[[1, 4, 5, 8]] = True
    preds, gts = structured_maps(rng, 4, k, 255, (25, 30))
    cm = SegmentationConfusionMatrix(k, 255)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    r = foreground_bias_rates(cm.confusion, torch.from_numpy(is_thing))
    s2t, t2s, ns, nt = direct_foreground_bias(preds, gts, is_thing, 255)
    assert r["stuff_predicted_as_thing"] == pytest.approx(s2t, abs=1e-12)
    assert r["thing_predicted_as_stuff"] == pytest.approx(t2s, abs=1e-12)
    assert (r["num_stuff_pixels"], r["num_thing_pixels"]) == (ns, nt)
    # PAS-20b: predictions >= 20 fold into "background" (stuff) before the rates are taken
    is_thing21 = np.arange(21) < 20
    gts = [rng.integers(0, 21, (9, 11)) for _ in range(3)]
    preds = [rng.integers(0, 59, (9, 11)) for _ in range(3)]
    gts[0][0] = 255
    cm = SegmentationConfusionMatrix(21, 255, prediction_fold=(20, 20), num_pred_classes=59)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    r = foreground_bias_rates(cm.confusion.numpy(), is_thing21)
    s2t, t2s, _, _ = direct_foreground_bias(preds, gts, is_thing21, 255, fold=(20, 20))
    assert r["stuff_predicted_as_thing"] == pytest.approx(s2t) and r["thing_predicted_as_stuff"] == pytest.approx(t2s)


def test_foreground_bias_bad_inputs_and_empty_kinds():
    cm = np.array([[3, 1], [0, 2]])
    with pytest.raises(ValueError, match="boolean vector"):
        foreground_bias_rates(cm, np.array([0, 1]))  # class ids or 0/1 ints, not a mask
    with pytest.raises(ValueError, match="boolean vector"):
        foreground_bias_rates(cm, np.array([True, False, True]))
    r = foreground_bias_rates(cm, np.array([True, True]))  # no stuff class: its rate is undefined
    assert np.isnan(r["stuff_predicted_as_thing"]) and r["thing_predicted_as_stuff"] == 0.0


# ------------------------------------------------------------------ evaluate module
@pytest.fixture(scope="module")
def hub_metric():
    import evaluate

    return evaluate.load(METRIC_DIR)


def load_evaluate_module_file():
    import importlib.util

    spec = importlib.util.spec_from_file_location("disa_mean_iou_copy", os.path.join(METRIC_DIR, "disa_mean_iou.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_module_boundary_iou_and_foreground_bias(hub_metric):
    rng = np.random.default_rng(6)
    preds, gts = structured_maps(rng, 2, 6, 255, (26, 34))
    p2, g2 = structured_maps(rng, 1, 6, 255, (80, 64))
    preds, gts = preds + p2, gts + g2
    is_thing = np.isin(np.arange(6), [0, 3])
    for rule in ("present_in_gt", "present_in_gt_or_pred"):
        r = hub_metric.compute(
            predictions=preds,
            references=gts,
            num_labels=6,
            ignore_index=255,
            miou_rule=rule,
            boundary_iou=True,
            thing_classes=[0, 3],
        )
        mean, per_class = reference_boundary_iou(preds, gts, 6, 255, 0.02, rule)
        assert r["mean_boundary_iou"] == pytest.approx(mean, abs=1e-12)
        np.testing.assert_allclose(r["per_category_boundary_iou"], per_class, rtol=1e-12, equal_nan=True)
        s2t, t2s, _, _ = direct_foreground_bias(preds, gts, is_thing, 255)
        assert r["stuff_predicted_as_thing"] == pytest.approx(s2t) and r["thing_predicted_as_stuff"] == pytest.approx(
            t2s
        )
    r = hub_metric.compute(
        predictions=preds,
        references=gts,
        num_labels=6,
        ignore_index=255,
        boundary_iou=True,
        boundary_dilation_ratio=0.1,
    )
    assert r["mean_boundary_iou"] == pytest.approx(
        reference_boundary_iou(preds, gts, 6, 255, 0.1, "present_in_gt_or_pred")[0], abs=1e-12
    )
    plain = hub_metric.compute(predictions=preds, references=gts, num_labels=6, ignore_index=255)
    assert "mean_boundary_iou" not in plain and "stuff_predicted_as_thing" not in plain


def test_evaluate_module_measure_options_refuse_bad_input(hub_metric):
    maps = dict(
        predictions=[np.zeros((4, 4), int)], references=[np.zeros((4, 4), int)], num_labels=3, ignore_index=255
    )
    with pytest.raises(ValueError, match="boundary_iou is off"):
        hub_metric.compute(**maps, boundary_dilation_ratio=0.05)
    with pytest.raises(ValueError, match="positive"):
        hub_metric.compute(**maps, boundary_iou=True, boundary_dilation_ratio=-1.0)
    with pytest.raises(ValueError, match="outside"):
        hub_metric.compute(**maps, thing_classes=[1, 3])
    with pytest.raises(ValueError, match="class ids"):
        hub_metric.compute(**maps, thing_classes=[True, False, False])


@pytest.mark.parametrize("ratio", [0.02, 0.07])
@pytest.mark.parametrize("nan_to_num", [None, -1.0])
def test_evaluate_module_boundary_iou_is_the_package_copy(ratio, nan_to_num):
    """disa_mean_iou.py carries a NumPy copy of BoundaryIoU's counting and arithmetic: same counts per map, same
    results under both rules, with absent and predicted-only classes."""
    copy = load_evaluate_module_file()
    rng = np.random.default_rng(12)
    for k, ignore, shape in [(4, 255, (15, 19)), (8, 65535, (50, 41)), (3, 255, (1, 12))]:
        preds, gts = structured_maps(rng, 3, k, ignore, shape)
        gts[0][gts[0] == 1] = 0  # class 1 absent from one map; predicted-only there
        for p, g in zip(preds, gts):
            ours = BoundaryIoU(k, ignore, dilation_ratio=ratio)
            ours.update(p, g)
            np.testing.assert_array_equal(copy.boundary_counts(p, g, k, ignore, ratio), ours.counts.numpy())
        counts = rng.integers(0, 20, (3, k))
        counts[1, 0] = 0  # absent from the ground truth, perhaps predicted
        counts[:, -1] = 0  # absent everywhere
        counts[0] = np.minimum(counts[0], np.minimum(counts[1], counts[2]))
        for rule in ("present_in_gt", "present_in_gt_or_pred"):
            theirs = copy.boundary_iou_from_counts(counts, rule, nan_to_num)
            mine = boundary_iou_from_counts(counts[0], counts[1], counts[2], rule, nan_to_num)
            for key in ("mean_boundary_iou", "per_category_boundary_iou"):
                np.testing.assert_allclose(theirs[key], mine[key], rtol=1e-12, equal_nan=True, err_msg=key)
        for h, w in [(1, 1), (37, 50), (480, 640), (1023, 2047)]:
            assert copy.boundary_dilation(h, w, ratio) == boundary_dilation(h, w, ratio)


def test_evaluate_module_foreground_bias_is_the_package_copy():
    copy = load_evaluate_module_file()
    rng = np.random.default_rng(13)
    for k in (2, 7, 30):
        cm = rng.integers(0, 40, (k, k))
        is_thing = rng.random(k) < 0.4
        is_thing[0], is_thing[-1] = True, False
        theirs = copy.foreground_bias_from_confusion(cm, is_thing)
        mine = foreground_bias_rates(cm, is_thing)
        for key in ("stuff_predicted_as_thing", "thing_predicted_as_stuff"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-12)
    cm = np.array([[0, 0], [3, 2]])
    theirs = copy.foreground_bias_from_confusion(cm, np.array([False, True]))
    assert np.isnan(theirs["stuff_predicted_as_thing"]) and np.isnan(
        foreground_bias_rates(cm, np.array([False, True]))["stuff_predicted_as_thing"]
    )
