"""End-to-end CLI on a random disa-tiny model and a prepared synthetic evaluation-dataset folder; bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
import prepare_datasets as prep  # noqa: E402
import run_evaluation as cli  # noqa: E402

TINY = ROOT / "configuration" / "models" / "disa-tiny"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation, DiSaProcessor

    out = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(DiSaConfig.from_pretrained(TINY)).eval()
    model.save_pretrained(out)
    DiSaProcessor.from_pretrained(TINY).save_pretrained(out)
    return out, model


@pytest.fixture(scope="module")
def voc_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "VOC2012"
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    rng = np.random.default_rng(0)
    ids = ["a1", "a2"]
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids))
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / f"JPEGImages/{i}.jpg")
        lab = rng.integers(0, 21, (24, 32)).astype(np.uint8)
        lab[0] = 255
        im = Image.new("P", (32, 24))
        im.putdata(lab.flatten().tolist())
        im.putpalette(list(range(256)) * 3)
        im.save(root / f"SegmentationClass/{i}.png")
    out = tmp_path_factory.mktemp("prepared")
    prep.convert("voc20", root, out)
    prep.convert("voc20b", root, out)
    return out


def test_cli_end_to_end_matches_direct_computation(tiny_model, voc_data, tmp_path):
    model_dir, model = tiny_model
    args = [
        "--model",
        str(model_dir),
        "--datasets",
        "voc20",
        "PAS-20b",
        "--data_dir",
        str(voc_data),
        "--warp_size",
        "64",
        "--window_size",
        "48",
        "--stride",
        "16",
        "--short_side",
        "0",
        "--output",
        str(tmp_path / "r.json"),
        "--markdown",
        str(tmp_path / "r.md"),
        "--model_index",
        str(tmp_path / "mi.yaml"),
    ]
    cli.main(args)
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert set(res) == {"voc20", "voc20b"} and 0 <= res["voc20"]["mIoU"] <= 100
    assert len(res["voc20b"]["per_class_iou"]) == 21 and "background" in res["voc20b"]["per_class_iou"]
    assert "PAS-20b" in (tmp_path / "r.md").read_text()
    assert "model-index" in (tmp_path / "mi.yaml").read_text()
    # independent recomputation for voc20: NumPy confusion counts over the predictions of the same pipeline
    from modeling_disa import DiSaProcessor
    from modeling_disa.evaluation.dataset_definitions import load_evaluation_dataset
    from modeling_disa.model.inference import predict_segmentation

    proc = DiSaProcessor.from_pretrained(model_dir)
    m = type(model).from_pretrained(model_dir).eval()
    tok = proc.tokenize_class_names(load_evaluation_dataset("voc20").prompt_names)
    te = m.get_text_embeddings(tok["input_ids"], tok["attention_mask"])
    ds = prep.load_prepared(voc_data, "voc20")["validation"]
    inter = np.zeros(20)
    union = np.zeros(20)
    gt_any = np.zeros(20, bool)
    for ex in ds:
        lab = np.array(ex["label"]).astype(np.int64)
        pix = proc.image_processor(images=ex["image"], do_resize=False, return_tensors="pt")["pixel_values"]
        pred = predict_segmentation(m, pix, te, short_side=None, warp_size=64, window_size=48, stride=16)[0].numpy()
        v = lab != 255
        for c in range(20):
            pc, gc = (pred == c) & v, (lab == c) & v
            inter[c] += (pc & gc).sum()
            union[c] += (pc | gc).sum()
            gt_any[c] |= gc.any()
    expected = 100 * np.mean(inter[gt_any] / union[gt_any])
    assert res["voc20"]["mIoU"] == pytest.approx(expected, abs=1e-6)


def test_cli_bad_inputs(tiny_model, voc_data, tmp_path):
    model_dir, _ = tiny_model
    with pytest.raises(KeyError, match="Unknown evaluation dataset"):
        cli.main(["--model", str(model_dir), "--datasets", "ade-9000", "--data_dir", str(voc_data)])
    # a dataset whose recorded class list does not match its definition
    meta_file = voc_data / "data/voc20/metadata.json"
    meta = json.loads(meta_file.read_text())
    saved = dict(meta)
    meta["class_names"] = meta["class_names"][::-1]
    meta_file.write_text(json.dumps(meta))
    try:
        with pytest.raises(ValueError, match="does not match dataset"):
            cli.main(
                [
                    "--model",
                    str(model_dir),
                    "--datasets",
                    "voc20",
                    "--data_dir",
                    str(voc_data),
                    "--warp_size",
                    "64",
                    "--window_size",
                    "48",
                    "--stride",
                    "16",
                    "--short_side",
                    "0",
                ]
            )
    finally:
        meta_file.write_text(json.dumps(saved))
    with pytest.raises(FileNotFoundError, match="prepare_datasets"):
        cli.main(["--model", str(model_dir), "--datasets", "ade150", "--data_dir", str(voc_data)])


@pytest.fixture(scope="module")
def voc_blocky(tmp_path_factory):
    """Two VOC images with blocky labels (regions, not noise) and an ignore band, prepared as voc20 and voc20b."""
    root = tmp_path_factory.mktemp("raw_blocky") / "VOC2012"
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    rng = np.random.default_rng(1)
    ids = ["b1", "b2"]
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids))
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"JPEGImages/{i}.jpg")
        lab = rng.integers(0, 21, (3, 4)).repeat(16, 0).repeat(16, 1).astype(np.uint8)
        lab[:, 30:32] = 255
        im = Image.new("P", (64, 48))
        im.putdata(lab.flatten().tolist())
        im.putpalette(list(range(256)) * 3)
        im.save(root / f"SegmentationClass/{i}.png")
    out = tmp_path_factory.mktemp("prepared_blocky")
    prep.convert("voc20", root, out)
    prep.convert("voc20b", root, out)
    return out


WINDOW_ARGS = ["--warp_size", "64", "--window_size", "48", "--stride", "16", "--short_side", "0"]


def test_cli_boundary_iou_and_foreground_bias(tiny_model, voc_blocky, tmp_path):
    """--boundary_iou and --thing_classes against the official boundary rule (cv2 erosions) and pixel counting over
    the predictions of the same pipeline, on PAS-20b (prediction fold)."""
    from test_measures import direct_foreground_bias, reference_boundary_iou

    from modeling_disa import DiSaProcessor
    from modeling_disa.evaluation.dataset_definitions import load_evaluation_dataset
    from modeling_disa.model.inference import predict_segmentation

    model_dir, model = tiny_model
    bench = load_evaluation_dataset("voc20b")
    things = list(bench.scored_names[:20])  # the VOC objects; "background" is the stuff class
    split = tmp_path / "things.json"
    split.write_text(json.dumps({"PAS-20b": things}))
    args = ["--model", str(model_dir), "--datasets", "voc20b", "--data_dir", str(voc_blocky), *WINDOW_ARGS]
    args += ["--boundary_iou", "--boundary_dilation_ratio", "0.05", "--thing_classes", str(split)]
    args += ["--output", str(tmp_path / "r.json")]
    args += ["--markdown", str(tmp_path / "r.md")]
    out = cli.main(args)
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert out["protocol"]["boundary_dilation_ratio"] == 0.05
    row = res["voc20b"]
    assert row["thing_classes"] == things and row["boundary_dilation_ratio"] == 0.05
    assert "boundary IoU" in (tmp_path / "r.md").read_text() and "stuff -> thing" in (tmp_path / "r.md").read_text()

    proc = DiSaProcessor.from_pretrained(model_dir)
    m = type(model).from_pretrained(model_dir).eval()
    tok = proc(text=bench.prompt_names, allow_shared_prompts=True)
    te = m.get_text_embeddings(tok["input_ids"], tok["attention_mask"])
    preds, gts = [], []
    for ex in prep.load_prepared(voc_blocky, "voc20b")["validation"]:
        pix = proc.image_processor(images=ex["image"], do_resize=False, return_tensors="pt")["pixel_values"]
        preds.append(
            predict_segmentation(m, pix, te, short_side=None, warp_size=64, window_size=48, stride=16)[0].numpy()
        )
        gts.append(np.array(ex["label"]).astype(np.int64))
    mean, per_class = reference_boundary_iou(preds, gts, 21, 255, 0.05, fold=(20, 20))  # d = 4 px here, not 2
    assert row["boundary_IoU"] == pytest.approx(100 * mean, abs=1e-9)
    for name, value in zip(bench.scored_names, per_class):
        assert (row["per_class_boundary_iou"][name] is None) == bool(np.isnan(value))
    s2t, t2s, _, _ = direct_foreground_bias(preds, gts, np.arange(21) < 20, 255, fold=(20, 20))
    assert row["stuff_predicted_as_thing"] == pytest.approx(100 * s2t, abs=1e-9)
    assert row["thing_predicted_as_stuff"] == pytest.approx(100 * t2s, abs=1e-9)


def test_cli_measure_flags_refuse_bad_input(tiny_model, voc_blocky, tmp_path):
    model_dir, _ = tiny_model
    base = ["--model", str(model_dir), "--datasets", "voc20b", "--data_dir", str(voc_blocky), *WINDOW_ARGS]
    with pytest.raises(SystemExit):  # the width without the measure would be accepted and ignored
        cli.main([*base, "--boundary_dilation_ratio", "0.05"])
    with pytest.raises(SystemExit):
        cli.main([*base, "--boundary_iou", "--boundary_dilation_ratio", "0"])
    split = tmp_path / "things.json"
    for spec, message in [
        ({"ade150": ["wall"]}, "not evaluated"),
        ({"voc20b": ["aeroplane", "zebra"]}, "not scored classes"),
        ({"voc20b": []}, "non-empty list"),
        ({"voc20b": ["cat"], "PAS-20b": ["dog"]}, "two thing splits"),
        (["cat"], "JSON object"),
    ]:
        split.write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=message):
            cli.main([*base, "--thing_classes", str(split)])


def test_cli_refuses_a_processor_with_other_prompt_templates(voc_data, tmp_path):
    """A 2-template model saved with a 1-template processor: the 20 VOC prompts would be read as 10 classes."""
    from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation, DiSaProcessor

    templates = ["A photo of a {} in the scene", "a sketch of a {}"]
    config = DiSaConfig.from_pretrained(TINY, prompt_templates=templates, label_token_ids=None)
    torch.manual_seed(0)
    DiSaForOpenVocabSegmentation(config).save_pretrained(tmp_path / "model")
    processor = DiSaProcessor.from_pretrained(TINY)
    processor.save_pretrained(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--datasets", "voc20", "--data_dir", str(voc_data), "--mode"]
    args += ["whole", "--window_size", "48", "--short_side", "0", "--output", str(tmp_path / "r.json")]
    with pytest.raises(ValueError, match=r"templates \['A photo of a \{\} in the scene'\].*'a sketch of a \{\}'\]"):
        cli.main(args)
    assert not (tmp_path / "r.json").exists()
    # the model's own templates: evaluated
    DiSaProcessor(processor.image_processor, processor.tokenizer, prompt_templates=templates).save_pretrained(
        tmp_path / "model"
    )
    assert 0 <= cli.main(args)["results"]["voc20"]["mIoU"] <= 100


FAST = ["--warp_size", "64", "--window_size", "48", "--stride", "16", "--short_side", "0"]


def test_broken_distributed_launch_is_an_error_not_a_single_process_run(tiny_model, voc_data, tmp_path):
    """Rank 1 of a 2-process launch whose rendezvous is missing (no MASTER_ADDR): going on as one process would score
    every image on every rank and write the outputs; it must stop and say why."""
    import os
    import subprocess
    import sys

    model_dir, _ = tiny_model
    output = tmp_path / "r.json"
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    script = ROOT / "training" / "run_evaluation.py"
    args = ["--model", str(model_dir), "--datasets", "voc20", "--data_dir", str(voc_data), "--output", str(output)]
    proc = subprocess.run(
        [sys.executable, str(script), *args, *FAST], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "could not set up the distributed evaluation" in proc.stderr and "MASTER_ADDR" in proc.stderr
    assert not output.exists()


def test_split_option_is_the_split_scored_and_published(tiny_model, voc_data, tmp_path):
    """`--split train` scores the train files and says so in the results and the model-index (which named the
    validation split whatever was scored)."""
    import shutil

    import yaml

    model_dir, _ = tiny_model
    data = tmp_path / "data_dir"
    shutil.copytree(voc_data, data)
    folder = data / "data" / "voc20"
    (val,) = folder.glob("validation-*.parquet")
    shutil.move(val, folder / "train-00000-of-00001.parquet")  # only a train split is left
    args = ["--model", str(model_dir), "--datasets", "voc20", "--data_dir", str(data), *FAST]
    with pytest.raises(FileNotFoundError, match="No validation parquet files"):
        cli.main(args)  # the default split is validation
    out = cli.main([*args, "--split", "train", "--model_index", str(tmp_path / "mi.yaml")])
    assert out["protocol"]["split"] == "train" and out["results"]["voc20"]["split"] == "train"
    index = yaml.safe_load((tmp_path / "mi.yaml").read_text())["model-index"][0]["results"]
    assert [entry["dataset"]["split"] for entry in index] == ["train"]


@pytest.mark.parametrize("dataset_repo", [None, "org/disa-benchmarks"])
def test_model_index_is_huggingface_hubs_eval_results_in_card_form(dataset_repo):
    """The model-index holds what the hand-written dicts held (parity: the same values under the same keys), in the
    key order `huggingface_hub` writes into a card (`dataset.name` before `dataset.type`), and reads back with
    `model_index_to_eval_results` into one `EvalResult` per dataset with the rows' values."""
    from huggingface_hub import EvalResult, ModelCardData
    from huggingface_hub.repocard_data import model_index_to_eval_results

    rows = [
        {"dataset": "ade150", "display_name": "ADE20K-150", "split": "validation", "mIoU": 31.4567},
        {"dataset": "voc20b", "display_name": "PASCAL VOC-20b", "split": "train", "mIoU": 82.0049},
    ]
    index = cli.model_index("disa-b", rows, dataset_repo)
    hand_written = [
        {
            "name": "disa-b",
            "results": [
                {
                    "task": {"type": "image-segmentation", "name": "Open-vocabulary semantic segmentation"},
                    "dataset": {
                        "type": dataset_repo or r["dataset"],
                        "name": r["display_name"],
                        "config": r["dataset"],
                        "split": r["split"],
                    },
                    "metrics": [{"type": "mean_iou", "value": round(r["mIoU"], 2), "name": "mIoU"}],
                }
                for r in rows
            ],
        }
    ]
    assert index == hand_written
    card = ModelCardData(
        model_name="disa-b",
        eval_results=[
            EvalResult(
                task_type="image-segmentation",
                task_name="Open-vocabulary semantic segmentation",
                dataset_type=dataset_repo or r["dataset"],
                dataset_name=r["display_name"],
                dataset_config=r["dataset"],
                dataset_split=r["split"],
                metric_type="mean_iou",
                metric_name="mIoU",
                metric_value=round(r["mIoU"], 2),
            )
            for r in rows
        ],
    ).to_dict()["model-index"]
    assert json.dumps(index) == json.dumps(card)  # key order included
    name, results = model_index_to_eval_results(index)
    assert name == "disa-b" and [(e.dataset_config, e.dataset_split, e.metric_value) for e in results] == [
        ("ade150", "validation", 31.46),
        ("voc20b", "train", 82.0),
    ]
