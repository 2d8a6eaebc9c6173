"""`modeling_disa.evaluation.saliency`: localization statistics of SDM's foreground tokens, against a direct
per-token loop over the pixels of each token's bin."""

import math

import numpy as np
import pytest
import torch

from modeling_disa.evaluation.saliency import SaliencyLocalization, token_majority


def _reference(mask: np.ndarray, labels: np.ndarray, ignore: int, processed: np.ndarray | None = None) -> dict:
    """Direct loops: token (i, j) covers rows floor(i H / h) .. ceil((i + 1) H / h) - 1 (same for columns); it is on
    class t when more than half of its non-ignored pixels are t; a token without such pixels is left out; an
    (image, class) pair with `processed[b, t]` False is left out."""
    b, t_count, h, w = mask.shape
    H, W = labels.shape[1:]
    n = dict(pairs=0, with_fg=0, fg=0, on_fg=0, class_tokens=0, scored=0, absent_pairs=0, absent_fg=0, scored_all=0)
    for b_i in range(b):
        lab = labels[b_i]
        for t in range(t_count):
            if processed is not None and not processed[b_i, t]:
                continue
            present = bool(((lab == t) & (lab != ignore)).any())
            fg = on_fg = class_tokens = scored = 0
            for i in range(h):
                for j in range(w):
                    rows = slice(math.floor(i * H / h), math.ceil((i + 1) * H / h))
                    cols = slice(math.floor(j * W / w), math.ceil((j + 1) * W / w))
                    cell = lab[rows, cols]
                    scored_pixels = int((cell != ignore).sum())
                    if scored_pixels == 0:
                        continue
                    scored += 1
                    on = 2 * int((cell == t).sum()) > scored_pixels
                    fg += int(mask[b_i, t, i, j])
                    on_fg += int(mask[b_i, t, i, j] and on)
                    class_tokens += int(on)
            n["scored_all"] += scored
            if present:
                n["pairs"] += 1
                n["with_fg"] += int(fg > 0)
                n["fg"] += fg
                n["on_fg"] += on_fg
                n["class_tokens"] += class_tokens
                n["scored"] += scored
            else:
                n["absent_pairs"] += 1
                n["absent_fg"] += fg
    return {
        "foreground_precision": n["on_fg"] / n["fg"],
        "foreground_recall": n["on_fg"] / n["class_tokens"],
        "present_with_foreground": n["with_fg"] / n["pairs"],
        "mean_foreground_tokens_present": n["fg"] / n["pairs"],
        "mean_foreground_tokens_absent": n["absent_fg"] / n["absent_pairs"],
        "foreground_grid_share": n["fg"] / n["scored"],
        "foreground_grid_share_all": (n["fg"] + n["absent_fg"]) / n["scored_all"],
        "num_images": b,
        "present_pairs": n["pairs"],
        "absent_pairs": n["absent_pairs"],
    }


def _blocky_labels(rng, batch, size, num_classes, ignore):
    """Label maps of coarse random blocks (so majorities vary), speckled with other classes and ignored pixels."""
    H, W = size
    coarse = rng.integers(0, num_classes, size=(batch, 3, 4))
    rows = np.minimum(np.arange(H) * 3 // H, 2)
    cols = np.minimum(np.arange(W) * 4 // W, 3)
    labels = coarse[:, rows][:, :, cols]
    speckle = rng.random(labels.shape) < 0.2
    labels = np.where(speckle, rng.integers(0, num_classes, size=labels.shape), labels)
    labels = np.where(rng.random(labels.shape) < 0.1, ignore, labels)
    labels[0, : H // 2, : W // 2] = ignore  # whole bins without a scored pixel
    return labels


@pytest.mark.parametrize("size,grid", [((13, 10), (4, 3)), ((16, 16), (4, 4)), ((7, 9), (5, 6))])
def test_statistics_match_a_direct_loop(size, grid):
    rng = np.random.default_rng(sum(size) + sum(grid))
    num_classes, ignore = 8, 255
    labels = _blocky_labels(rng, 5, size, 6, ignore)  # classes 6 and 7 are absent from every image
    mask = rng.random((5, num_classes, *grid)) < 0.35
    metric = SaliencyLocalization(ignore_index=ignore)
    metric.update(torch.from_numpy(mask[:2]), labels[:2])  # two batches accumulate
    metric.update(torch.from_numpy(mask[2:]), torch.from_numpy(labels[2:]).to(torch.uint8))
    got, want = metric.compute(), _reference(mask, labels, ignore)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


def test_class_cap_leaves_the_unprocessed_classes_out():
    """With `class_indices` (the model's class cap), only the (image, class) pairs the model processed count."""
    rng = np.random.default_rng(7)
    num_classes, ignore, grid = 8, 255, (4, 3)
    labels = _blocky_labels(rng, 4, (13, 10), 6, ignore)
    class_indices = torch.from_numpy(np.stack([rng.permutation(num_classes)[:5] for _ in range(4)]))
    processed = np.zeros((4, num_classes), bool)
    np.put_along_axis(processed, class_indices.numpy(), True, axis=1)
    # the model returns no foreground token for a class it did not process
    mask = (rng.random((4, num_classes, *grid)) < 0.35) & processed[:, :, None, None]
    metric = SaliencyLocalization(ignore_index=ignore)
    metric.update(torch.from_numpy(mask), labels, class_indices=class_indices)
    got, want = metric.compute(), _reference(mask, labels, ignore, processed)
    assert got["present_pairs"] + got["absent_pairs"] == 4 * 5
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    with pytest.raises(ValueError, match="class_indices"):
        metric.update(torch.from_numpy(mask), labels, class_indices=class_indices + num_classes)


def test_token_rule_on_a_hand_made_map():
    # 4x4 map, 2x2 grid: bin (0,0) all class 1; bin (0,1) half 1, half 2 (a tie: on neither); bin (1,0) three 1s
    # and one ignored pixel (on 1); bin (1,1) all ignored (unscored)
    x = 255
    label = torch.tensor([[1, 1, 1, 2], [1, 1, 1, 2], [1, 1, x, x], [1, x, x, x]])
    on, scored = token_majority(label, torch.tensor([1, 2]), (2, 2), ignore_index=x)
    assert on[0].tolist() == [[True, False], [True, False]] and not on[1].any()
    assert scored.tolist() == [[True, True], [True, False]]
    metric = SaliencyLocalization(ignore_index=x)
    mask = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    mask[0, 1] = True  # every token of class 1: three scored, two on the class
    mask[0, 0, 0, 0] = True  # one token of the absent class 0
    metric.update(mask, label[None])
    out = metric.compute()
    assert out["foreground_precision"] == pytest.approx(2 / 3)
    assert out["foreground_recall"] == 1.0  # class 1 has two tokens, both foreground; class 2 has none
    assert out["present_with_foreground"] == 0.5  # class 2 (present) gets no foreground token
    assert out["mean_foreground_tokens_absent"] == 1.0 and out["absent_pairs"] == 1
    assert out["foreground_grid_share"] == pytest.approx(3 / 6)
    assert out["foreground_grid_share_all"] == pytest.approx(4 / 9)  # 3 scored tokens x 3 classes


def test_empty_ratios_are_none_and_bad_inputs_are_refused():
    metric = SaliencyLocalization()
    assert metric.compute()["foreground_precision"] is None
    mask = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match="bool"):
        metric.update(mask.float(), np.zeros((1, 4, 4), np.int64))
    with pytest.raises(ValueError, match=r"class ids \[3\]"):
        metric.update(mask, np.full((1, 4, 4), 3))
    with pytest.raises(ValueError, match="batch"):
        metric.update(mask, np.zeros((2, 4, 4), np.int64))
