"""`modeling_disa.evaluation.split_statistics`: SDM's presence and foreground-split statistics, against a direct
per-pair, per-token loop; the class cap; sums across batches and processes; a real model's forward."""

import math

import numpy as np
import pytest
import torch

from modeling_disa import DiSaSegmentationOutput
from modeling_disa.evaluation.split_statistics import SplitStatistics, split_statistics


def _reference(itm_logits, mask, labels, ignore, processed):
    """Direct loops over (image, class) pairs and the pixels of each token's bin (rows floor(i H / h) ..
    ceil((i + 1) H / h) - 1, same for columns); a token is on class t when more than half of its scored pixels are t;
    only processed pairs count, except in the share of present classes the cap dropped."""
    b, t_count, h, w = mask.shape
    H, W = labels.shape[1:]
    n = {k: 0.0 for k in "pp pa sp sa pruned with fg on cls scored_p scored_all fg_abs".split()}
    for i_b in range(b):
        lab = labels[i_b]
        for t in range(t_count):
            present = bool(((lab == t) & (lab != ignore)).any())
            if not processed[i_b, t]:
                n["pruned"] += present
                continue
            p = 1 / (1 + math.exp(-float(itm_logits[i_b, t])))
            fg = on_fg = cls = scored = 0
            for i in range(h):
                for j in range(w):
                    cell = lab[math.floor(i * H / h) : math.ceil((i + 1) * H / h)]
                    cell = cell[:, math.floor(j * W / w) : math.ceil((j + 1) * W / w)]
                    scored_pixels = int((cell != ignore).sum())
                    if not scored_pixels:
                        continue
                    scored += 1
                    on = 2 * int((cell == t).sum()) > scored_pixels
                    fg += int(mask[i_b, t, i, j])
                    on_fg += int(mask[i_b, t, i, j] and on)
                    cls += int(on)
            n["scored_all"] += scored
            if present:
                n["pp"] += 1
                n["sp"] += p
                n["with"] += fg > 0
                n["fg"] += fg
                n["on"] += on_fg
                n["cls"] += cls
                n["scored_p"] += scored
            else:
                n["pa"] += 1
                n["sa"] += p
                n["fg_abs"] += fg

    def r(num, den):
        return num / den if den else None

    return {
        "presence_present": r(n["sp"], n["pp"]),
        "presence_absent": r(n["sa"], n["pa"]),
        "foreground_precision": r(n["on"], n["fg"]),
        "foreground_recall": r(n["on"], n["cls"]),
        "present_with_foreground": r(n["with"], n["pp"]),
        "mean_foreground_tokens_present": r(n["fg"], n["pp"]),
        "mean_foreground_tokens_absent": r(n["fg_abs"], n["pa"]),
        "foreground_grid_share": r(n["fg"], n["scored_p"]),
        "foreground_grid_share_all": r(n["fg"] + n["fg_abs"], n["scored_all"]),
        "num_images": b,
        "present_pruned": r(n["pruned"], n["pp"] + n["pruned"]),
        "present_pairs": n["pp"],
        "absent_pairs": n["pa"],
    }


def _batch(seed, batch=3, num_classes=7, size=(13, 11), grid=(4, 3), cap=None, ignore=255):
    """Synthetic outputs as the model returns them: blocky label maps with speckle and ignored pixels, presence
    logits and foreground masks; under a class cap the dropped classes hold the pruned logit and no foreground."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_classes - 1, size=(batch, 3, 3))  # the last class never occurs
    labels = coarse[:, np.minimum(np.arange(size[0]) * 3 // size[0], 2)][
        :, :, np.minimum(np.arange(size[1]) * 3 // size[1], 2)
    ]
    labels = np.where(rng.random(labels.shape) < 0.15, rng.integers(0, num_classes, labels.shape), labels)
    labels = np.where(rng.random(labels.shape) < 0.1, ignore, labels)
    itm = rng.normal(0, 2, size=(batch, num_classes))
    mask = rng.random((batch, num_classes, *grid)) < 0.3
    processed = np.ones((batch, num_classes), bool)
    class_indices = None
    if cap is not None:
        class_indices = np.stack([np.sort(rng.permutation(num_classes)[:cap]) for _ in range(batch)])
        processed[:] = False
        np.put_along_axis(processed, class_indices, True, axis=1)
        itm = np.where(processed, itm, -100.0)
        mask &= processed[:, :, None, None]
        class_indices = torch.from_numpy(class_indices)
    return torch.tensor(itm, dtype=torch.float32), torch.from_numpy(mask), labels, class_indices, processed


@pytest.mark.parametrize("cap", [None, 4])
def test_statistics_match_a_direct_computation(cap):
    batches = [_batch(seed, cap=cap) for seed in (1, 2)]
    stats = SplitStatistics(ignore_index=255)
    for itm, mask, labels, class_indices, _ in batches:
        stats.update(itm, mask, labels, class_indices)
    want = _reference(
        torch.cat([b[0] for b in batches]).numpy(),
        torch.cat([b[1] for b in batches]).numpy(),
        np.concatenate([b[2] for b in batches]),
        255,
        np.concatenate([b[4] for b in batches]),
    )
    got = stats.compute()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    if cap is None:
        assert got["present_pruned"] == 0.0
    else:
        # the pruned classes' logit (-100) is not a prediction: it does not pull the absent classes' mean to 0
        assert got["presence_absent"] > 0.05 and got["present_pruned"] > 0


def test_counts_sum_across_processes_and_one_forward():
    """Two accumulators (two processes, or two logging windows) summed through `to_tensor` give the statistics of
    all their batches; `split_statistics` of one output equals the accumulator on its tensors."""
    first, second = _batch(3, cap=5), _batch(4, cap=5)
    a, b, both = SplitStatistics(), SplitStatistics(), SplitStatistics()
    a.update(*first[:4])
    b.update(*second[:4])
    for batch in (first, second):
        both.update(*batch[:4])
    summed = SplitStatistics.from_tensor(a.to_tensor() + b.to_tensor())
    assert summed.compute() == both.compute()
    assert SplitStatistics().merge(a).merge(b).compute() == both.compute()
    itm, mask, labels, class_indices, _ = first
    output = DiSaSegmentationOutput(itm_logits=itm, foreground_mask=mask, class_indices=class_indices)
    single = SplitStatistics()
    single.update(itm, mask, labels, class_indices)
    assert split_statistics(output, labels) == single.compute()


def test_bad_inputs_are_refused():
    itm, mask, labels, _, _ = _batch(5)
    with pytest.raises(ValueError, match="output_saliency=True"):
        split_statistics(DiSaSegmentationOutput(itm_logits=itm), labels)
    with pytest.raises(ValueError, match="output_saliency=True"):
        SplitStatistics().update(itm, mask[:, :3], labels)
    with pytest.raises(ValueError, match="float presence logits"):
        SplitStatistics().update(itm.long(), mask, labels)
    with pytest.raises(ValueError, match="class_indices"):
        SplitStatistics().update(itm, mask, labels, torch.zeros(2, 3, dtype=torch.long))
    stats = SplitStatistics()
    with pytest.raises(ValueError, match="outside the mask's 7 classes"):
        stats.update(itm, mask, np.full_like(labels, 9))
    assert stats.compute()["num_images"] == 0  # nothing was counted from the refused batch
    with pytest.raises(ValueError, match="counts"):
        SplitStatistics.from_tensor(torch.zeros(3))


def test_a_model_forward(tiny_config, pixel_values):
    """On an SDM model's own output (class cap on: 6 classes, cap 4): the statistics equal the direct loop on the
    processed pairs, and no foreground token or presence logit of a dropped class enters them."""
    from modeling_disa import DiSaForOpenVocabSegmentation

    tiny_config.use_sdm = True
    tiny_config.class_cap = 4
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(tiny_config).eval()
    # two classes per image, in blocks: the other four are absent
    labels = torch.tensor([0, 1, 3, 4]).view(2, 2, 1, 1).repeat_interleave(16, 1).repeat(1, 1, 1, 32).flatten(1, 2)
    labels[:, :3] = 255
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_saliency=True)
    assert out.class_indices is not None and out.foreground_mask.shape[1] == 6
    processed = np.zeros((2, 6), bool)
    np.put_along_axis(processed, out.class_indices.numpy(), True, axis=1)
    want = _reference(out.itm_logits.numpy(), out.foreground_mask.numpy(), labels.numpy(), 255, processed)
    got = split_statistics(out, labels, ignore_index=255)
    assert got["present_pairs"] > 0 and got["absent_pairs"] > 0
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), key
