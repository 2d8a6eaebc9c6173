"""training/train.py's split statistics and split guard on the disa-tiny preset (CPU, about a second per run):

- the log separates the segmentation and ITM (presence) loss terms, and for a model with SDM holds the split
  statistics of every logging window (`train/split/...`) and of the evaluation (`eval/split/...`), also in
  all_results.json; a CAT-Seg-mode model logs the loss terms only;
- the forward's `output_saliency=True`, which the loop uses for them, leaves the loss and the gradients unchanged;
- a collapsed split (presence threshold near 1: no class gets a foreground token) warns, naming the statistic, its
  value and the step, and the warnings are counted in the results (and carried over a resume);
- the guard's thresholds and warm-up are recipe settings that are honoured, and refused when out of range;
- with 2 processes the window and evaluation statistics count every process's images once.
"""

import json
import logging
import os

import pytest
import torch
from test_train_script import CLASSES, TINY, main_in_process, make_split, run

from modeling_disa.evaluation.split_statistics import SplitStatistics

SDM = ["--model_config_overrides", json.dumps({"use_sdm": True})]
# presence threshold near 1: no class of the untrained model is predicted present, so none gets a foreground token
COLLAPSED = ["--model_config_overrides", json.dumps({"use_sdm": True, "presence_threshold": 0.999})]
SPLIT_KEYS = set(SplitStatistics().compute())


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the subprocess runs get (OMP_NUM_THREADS=1): the tiny model's ops are too small to
    gain from more, and on a shared machine the extra threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def log_lines(out):
    with open(os.path.join(out, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def guard_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "SDM split" in r.getMessage()]


def test_sdm_run_logs_the_loss_terms_and_the_split_statistics(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    res = main_in_process(
        ["--class_names", *CLASSES, *SDM, "--split_guard_min_foreground_precision", "0"],
        tmp_path,
        make_split(4, 0),
        make_split(3, 1),
    )
    lines = log_lines(tmp_path / "out")
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == [1, 2]
    for line in train:
        # the loss is the segmentation term plus the weighted ITM term (itm_loss_weight 1 in the tiny preset)
        assert line["train/loss"] == pytest.approx(line["train/segmentation_loss"] + line["train/itm_loss"], rel=1e-6)
        assert line["train/itm_loss"] > 0
        assert {f"train/split/{key}" for key in SPLIT_KEYS} <= line.keys()
        assert line["train/split/num_images"] == 2  # one step of 2 images per window
        assert 0 <= line["train/split/foreground_precision"] <= 1
    (evaluation,) = [line for line in lines if "eval/mIoU" in line]
    assert {f"eval/split/{key}" for key in SPLIT_KEYS} <= evaluation.keys()
    assert evaluation["eval/split/num_images"] == 3  # the whole validation split
    assert all(res[f"eval_split/{key}"] == evaluation[f"eval/split/{key}"] for key in SPLIT_KEYS)
    assert all(res[f"train_split/{key}"] == train[-1][f"train/split/{key}"] for key in SPLIT_KEYS)
    # healthy enough for the thresholds given: every present class got foreground tokens, precision is not checked
    assert train[-1]["train/split/present_with_foreground"] == 1.0
    assert res["split_guard_warnings"] == 0 and res["split_guard_last_warning"] is None
    assert not guard_warnings(caplog)


def test_catseg_mode_run_logs_the_loss_terms_only(tmp_path):
    res = main_in_process(["--class_names", *CLASSES], tmp_path, make_split(4, 0), make_split(3, 1))
    lines = log_lines(tmp_path / "out")
    train = [line for line in lines if "train/loss" in line]
    assert len(train) == 2
    for line in train:
        assert line["train/segmentation_loss"] == line["train/loss"]  # no ITM term without SDM
        assert "train/itm_loss" not in line
    assert not any("split" in key for line in lines for key in line)
    assert not any("split" in key for key in res)


def test_output_saliency_leaves_loss_and_gradients_unchanged(tiny_config, pixel_values):
    from modeling_disa import DiSaForOpenVocabSegmentation

    tiny_config.use_sdm = True
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(tiny_config).train()
    labels = torch.randint(0, 6, (2, 64, 64))
    labels[:, :8] = 255

    def step(output_saliency):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout draws
        out = model(pixel_values=pixel_values, labels=labels, output_saliency=output_saliency)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    (plain, plain_grads), (with_saliency, saliency_grads) = step(False), step(True)
    assert plain.foreground_mask is None and with_saliency.foreground_mask is not None
    for name in ("loss", "segmentation_loss", "itm_loss"):
        assert torch.equal(plain[name], with_saliency[name]), name
    assert plain_grads.keys() == saliency_grads.keys() and plain_grads
    assert all(torch.equal(plain_grads[n], saliency_grads[n]) for n in plain_grads)


def test_collapsed_split_warns_and_is_counted(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    res = main_in_process(["--class_names", *CLASSES, *COLLAPSED], tmp_path, make_split(4, 0), make_split(3, 1))
    train = [line for line in log_lines(tmp_path / "out") if "train/loss" in line]
    assert all(line["train/split/present_with_foreground"] == 0.0 for line in train)
    assert all(line["train/split/mean_foreground_tokens_present"] == 0.0 for line in train)
    warnings = guard_warnings(caplog)
    # warm-up: ceil(0.1 x 2 steps) = 1, so the windows of steps 1 and 2 and the final evaluation are checked
    assert len(warnings) == 3 == res["split_guard_warnings"]
    assert "step 1, training window: present_with_foreground = 0.000" in warnings[0]
    assert "split_guard_min_present_with_foreground = 0.5" in warnings[0]
    assert "go wholly through the background branch" in warnings[0]  # what it means
    assert "step 2, evaluation" in warnings[-1]
    assert res["split_guard_last_warning"] == {
        "step": 2,
        "source": "evaluation",
        "statistic": "present_with_foreground",
        "value": 0.0,
        "threshold": 0.5,
    }


@pytest.mark.parametrize(
    "settings,model,expected",
    [
        (["--split_guard_min_present_with_foreground", "0"], COLLAPSED, []),  # the check is off
        (["--split_guard_warmup_fraction", "0.9"], COLLAPSED, ["present_with_foreground"] * 2),  # from step 2 on
        (["--split_guard_min_present_with_foreground", "0.01"], COLLAPSED, ["present_with_foreground"] * 3),
        (["--split_guard_min_foreground_precision", "0"], SDM, []),
        (["--split_guard_min_foreground_precision", "1"], SDM, ["foreground_precision"] * 3),
    ],
)
def test_guard_settings_are_honoured(tmp_path, caplog, settings, model, expected):
    caplog.set_level(logging.WARNING)
    res = main_in_process(["--class_names", *CLASSES, *model, *settings], tmp_path, make_split(4, 0), make_split(3, 1))
    warnings = guard_warnings(caplog)
    assert [w.split(": ")[1].split(" = ")[0] for w in warnings] == expected
    assert res["split_guard_warnings"] == len(expected)


@pytest.mark.parametrize(
    "setting,value",
    [
        ("split_guard_min_present_with_foreground", "1.5"),
        ("split_guard_min_foreground_precision", "-0.1"),
        ("split_guard_warmup_fraction", "1"),
    ],
)
def test_invalid_guard_settings_are_refused(tmp_path, setting, value):
    import train

    with pytest.raises(SystemExit, match=setting):
        train.parse_args(["--config", TINY, "--output_dir", str(tmp_path), f"--{setting}", value])
    recipe = tmp_path / "recipe.yaml"  # a yaml value is checked as well
    recipe.write_text(f"{setting}: {value}\n")
    with pytest.raises(SystemExit, match=setting):
        train.parse_args(["--config", str(recipe), "--output_dir", str(tmp_path)])


def test_a_resumed_run_keeps_counting(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    args = ["--class_names", *CLASSES, *COLLAPSED, "--checkpointing_steps", "1"]
    first = main_in_process(args, tmp_path, make_split(4, 0), make_split(3, 1))
    assert first["split_guard_warnings"] == 3  # windows 1 and 2 (the checkpoint of step 2 holds these), evaluation
    caplog.clear()
    resumed = main_in_process(
        [*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"],
        tmp_path,
        make_split(4, 0),
        make_split(3, 1),
    )
    assert len(guard_warnings(caplog)) == 2  # window 3 and the final evaluation
    assert resumed["split_guard_warnings"] == 2 + 2


@pytest.fixture
def parquet_dir(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    make_split(4, 0).to_parquet(str(d / "train-00000-of-00001.parquet"))
    make_split(5, 1).to_parquet(str(d / "validation-00000-of-00001.parquet"))
    return str(d)


def test_two_processes_count_every_image_once(parquet_dir, tmp_path):
    out = str(tmp_path / "out")
    args = ["--dataset_name", parquet_dir, "--output_dir", out, "--max_train_steps", "1", "--checkpointing_steps", "0"]
    run([*args, "--per_device_train_batch_size", "1", *SDM], tmp_path, nproc=2)
    lines = log_lines(out)
    (train,) = [line for line in lines if "train/loss" in line]
    assert train["train/split/num_images"] == 2  # one image per process, summed
    assert train["train/loss"] == pytest.approx(train["train/segmentation_loss"] + train["train/itm_loss"], rel=1e-6)
    (evaluation,) = [line for line in lines if "eval/mIoU" in line]
    # 5 validation images, 2 per process and batch: the duplicate that evens out the last batch is not counted
    assert evaluation["eval/split/num_images"] == 5


def test_guard_settings_on_a_model_without_sdm_are_refused(tmp_path):
    """A threshold set for a CAT-Seg-mode model could only be ignored: it is refused, naming the setting."""
    import train

    r = train.parse_args(
        ["--config", TINY, "--output_dir", str(tmp_path / "o"), "--model_config_overrides", "{use_sdm: false}"]
        + ["--split_guard_min_foreground_precision", "0.3"]
    )
    with pytest.raises(SystemExit, match="split_guard_min_foreground_precision.*no SDM"):
        train.build_model_and_processor(r)
    r = train.parse_args(
        ["--config", TINY, "--output_dir", str(tmp_path / "o"), "--model_config_overrides", "{use_sdm: false}"]
    )
    train.build_model_and_processor(r)  # the defaults are not a setting the user gave
