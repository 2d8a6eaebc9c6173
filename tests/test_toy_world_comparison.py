"""`training/toy_world_comparison.py --smoke`: the DiSa vs CAT-Seg-mode sweep on a tiny world, a few steps. Checks
the result file's schema, the summary arithmetic, and that a rerun resumes instead of retraining."""

import argparse
import json
import os
import statistics
from pathlib import Path

import numpy as np
import pytest

import toy_world as W

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_PATH = Path(REPO)


def _load_script():
    import toy_world_comparison

    return toy_world_comparison


def test_smoke_sweep_schema_summary_and_resume(tmp_path):
    script = _load_script()
    out = tmp_path / "comparison.json"
    argv = [
        "--smoke",
        "--jobs",
        "1",
        "--seeds",
        "0",
        "1",
        "--models",
        "catseg",
        "disa",
        "disa-upgrade",
        "--worlds",
        "unbiased",
        "foreground_biased",
        "--work_dir",
        str(tmp_path / "work"),
        "--output",
        str(out),
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    assert script.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"machine", "steps", "rows", "summary", "baselines"} and result["steps"] == 3
    assert set(result["baselines"]) == {"unbiased", "foreground_biased"}
    assert 0 <= result["baselines"]["unbiased"]["dense_clip"]["stuff"] <= 100
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch"]
    rows = result["rows"]
    assert {(r["world"], r["model"], r["seed"]) for r in rows} == {
        (w, m, s)
        for w in ("unbiased", "foreground_biased")
        for m in ("catseg", "disa", "disa-upgrade")
        for s in (0, 1)
    }
    # the upgrade row loads its catseg row with DiSa's parts switched on, which start as the identity; the smoke
    # recipe's single upgrade step is the first warm-up step (learning rate 0), so it scores exactly as its base
    for row in (r for r in rows if r["model"] == "disa-upgrade"):
        base = next(r for r in rows if (r["world"], r["model"], r["seed"]) == (row["world"], "catseg", row["seed"]))
        assert row["upgrade_from"] == "catseg" and row["upgrade_steps"] == 1
        assert row["trainable_parameters"] == "disa" and row["overrides"] == {"use_sdm": True, "use_hrm": True}
        for column in ("all", "stuff", "pas20b", "pas20b_fold", "boundary_iou", "stuff_predicted_as_thing"):
            assert row[column] == base[column] and row["dev"][column] == base["dev"][column]
        assert "saliency_localization" in row
    for row in rows:
        for column in ("all", "seen", "unseen", "stuff", "things", "unseen_stuff"):
            assert 0.0 <= row[column] <= 100.0 and 0.0 <= row["dev"][column] <= 100.0
        assert ("presence_auroc" in row) == (row["model"] in ("disa", "disa-upgrade"))
        for scores in (row, row["dev"]):  # the PAS-20b analog is scored for every model, SDM's split for DiSa only
            for column in ("pas20b", "pas20b_background", "pas20b_fold", "boundary_iou", "stuff_predicted_as_thing"):
                assert 0.0 <= scores[column] <= 100.0
            assert set(scores["pas20b_scores"]["prompted"]["per_class_iou"]) == set(W.PAS20B_NAMES)
            localization = scores.get("saliency_localization")
            assert (localization is not None) == (row["model"] in ("disa", "disa-upgrade"))
            if localization is not None:
                # 16 test and 16 dev images in the smoke world, 24 classes each
                assert localization["num_images"] == 16
                assert localization["present_pairs"] + localization["absent_pairs"] == 16 * 24
                share = localization["present_with_foreground"]
                assert share is not None and 0.0 <= share <= 1.0
    assert {r["stuff_caption_rate"] for r in rows if r["world"] == "foreground_biased"} == {0.25}
    assert {r["stuff_caption_rate"] for r in rows if r["world"] == "unbiased"} == {1.0}
    # the summary is the mean / sd over the seeds of the rows
    entry = next(
        e for e in result["summary"] if e["split"] == "test" and e["world"] == "unbiased" and e["model"] == "catseg"
    )
    values = [r["stuff"] for r in rows if r["world"] == "unbiased" and r["model"] == "catseg"]
    assert np.isclose(entry["stuff"]["mean"], np.mean(values)) and np.isclose(
        entry["stuff"]["sd"], np.std(values, ddof=1)
    )
    assert (tmp_path / "comparison.md").read_text().count("| unbiased | test |") == 3
    # the goals: each check is the difference of the two test-summary entries it names
    entries = {(e["world"], e["model"]): e for e in result["summary"] if e["split"] == "test"}
    assert {c["world"] for c in result["goals"]} == {"unbiased", "foreground_biased"}
    for c in result["goals"]:
        ours, theirs = entries[(c["world"], c["model"])], entries[(c["world"], c["reference"])]
        assert c["value"] == ours[c["column"]][c["statistic"]]
        assert c["difference"] == pytest.approx(c["value"] - theirs[c["column"]][c["statistic"]])
    # the new columns: summarised where every row of a (world, model) has them, tabled beside the old ones
    for e in result["summary"]:
        assert "pas20b" in e and "pas20b_fold" in e and ("fg_on_class" in e) == (e["model"] != "catseg")
    entry = next(e for e in result["summary"] if e["split"] == "dev" and e["model"] == "disa")
    values = [
        r["dev"]["saliency_localization"]["present_with_foreground"]
        for r in rows
        if r["model"] == "disa" and r["world"] == entry["world"]
    ]
    assert np.isclose(entry["fg_any"]["mean"], np.mean(values))
    header = (tmp_path / "comparison.md").read_text().splitlines()[2]
    assert "| pas20b |" in header and "| fg_on_class |" in header
    for base in result["baselines"].values():
        assert 0.0 <= base["dense_clip"]["pas20b"] <= 100.0 and 0.0 <= base["dense_clip"]["pas20b_fold"] <= 100.0
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the baselines alone, from the cached worlds: the same numbers as the sweep's
    alone = tmp_path / "baselines.json"
    assert script.main([str(alone) if a == str(out) else a for a in argv] + ["--baselines_only"]) == 0
    assert json.loads(alone.read_text())["baselines"] == result["baselines"]

    # resume: only the removed row is trained again
    row_dir = tmp_path / "work" / "rows"
    files = sorted(row_dir.rglob("*.json"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    files[0].unlink()
    assert script.main(argv) == 0
    again = sorted(row_dir.rglob("*.json"))
    assert again == files
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files[1:])


def test_goal_checks_margins_worst_seed_and_lower_is_better():
    """Each goal compares the named statistic of two models in the same world against its margin: +1 needs a gain
    of at least 1, "no harm" allows a loss of 0.5, stability compares worst seeds, foreground bias must go down."""
    script = _load_script()

    def entry(model, **columns):
        return {
            "world": "w",
            "model": model,
            "split": "test",
            **{c: {"mean": m, "sd": 0.0, "min": lo} for c, (m, lo) in columns.items()},
        }

    summary = [
        entry("catseg", pas20b=(10.0, 9.0), boundary_iou=(20.0, 19.0), stuff_as_thing=(2.0, 1.5), all=(40.0, 39.0)),
        entry("disa", pas20b=(11.0, 8.0), boundary_iou=(20.9, 20.0), stuff_as_thing=(2.0, 1.0), all=(39.6, 37.9)),
        {**entry("disa", all=(99.0, 99.0)), "split": "dev"},  # dev entries never count
    ]
    checks = {c["goal"]: c for c in script.goal_checks(summary)}
    assert checks["PAS-20b analog +1"]["met"] and checks["PAS-20b analog +1"]["difference"] == pytest.approx(1.0)
    assert not checks["boundary IoU +1"]["met"]
    assert not checks["less foreground bias"]["met"]  # equal is not less
    assert checks["no harm: all-class mIoU >= -0.5"]["met"]
    assert checks["stability: worst seed >= -1"]["statistic"] == "min"
    assert not checks["stability: worst seed >= -1"]["met"]  # 37.9 vs 39.0
    assert not checks["stretch: all-class mIoU +2"]["met"]
    assert "PAS-20b folded +1" not in checks  # no pas20b_fold column: not checked
    assert not any(c["model"] == "disa-upgrade" for c in checks.values())  # no upgrade rows: not checked


def test_world_registry_and_overrides(tmp_path, capsys):
    """Worlds carry their own seed and stuff caption rate; --world_seed / --stuff_caption_rate override them, and
    overrides that make two named worlds the same are refused."""
    script = _load_script()

    def parser_args(**kw):
        return argparse.Namespace(
            **{"world_seed": None, "stuff_caption_rate": None, "background_caption_rate": None, **kw}
        )

    spec = script.world_spec
    assert spec(parser_args(), "foreground_biased_ws1") == {
        "seed": 1,
        "stuff_caption_rate": 0.4,
        "background_caption_rate": 0.0,
    }
    assert spec(parser_args(), "foreground_biased_bg")["background_caption_rate"] == 1.0
    over = parser_args(world_seed=3, stuff_caption_rate=0.1, background_caption_rate=0.5)
    # the unbiased world names every region: only its seed can change
    assert spec(over, "unbiased") == {"seed": 3, "stuff_caption_rate": 1.0, "background_caption_rate": 0.0}
    assert spec(over, "foreground_biased") == {"seed": 3, "stuff_caption_rate": 0.1, "background_caption_rate": 0.5}
    same = [
        "--worlds",
        "foreground_biased",
        "foreground_biased_ws1",
        "--world_seed",
        "1",
        "--stuff_caption_rate",
        "0.4",
    ]
    with pytest.raises(SystemExit) as refused:
        script.main([*same, "--collect_only", "--work_dir", str(tmp_path)])
    assert refused.value.code == 2 and "make worlds the same" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # an upgrade row without the row it starts from
        script.main(["--models", "disa-upgrade", "--collect_only", "--work_dir", str(tmp_path)])
    assert refused.value.code == 2 and "add ['catseg'] to --models" in capsys.readouterr().err


def test_boundary_and_bias_columns_against_direct_counts():
    """The comparison's boundary / foreground-bias columns: a perfect prediction has Boundary IoU 100 and no bias;
    painting stuff pixels with a thing class moves exactly their share into `stuff_predicted_as_thing`."""
    script = _load_script()
    rng = np.random.default_rng(0)
    labels = rng.choice(W.STUFF_IDS, size=(3, 1, 1)).repeat(64, 1).repeat(64, 2).astype(np.int64)
    thing = next(i for i in range(len(W.CLASS_NAMES)) if i not in W.STUFF_IDS)
    labels[:, 20:40, 20:40] = thing
    labels[0, :2] = 255
    perfect = script.boundary_and_bias(labels.clip(max=len(W.CLASS_NAMES) - 1), labels)
    assert perfect == {"boundary_iou": 100.0, "stuff_predicted_as_thing": 0.0, "thing_predicted_as_stuff": 0.0}
    pred = labels.clip(max=len(W.CLASS_NAMES) - 1).copy()
    pred[:, 50:, :] = thing  # stuff rows painted as the thing
    scored = labels != 255
    stuff = scored & np.isin(labels, W.STUFF_IDS)
    expected = 100.0 * (stuff & ~np.isin(pred, W.STUFF_IDS)).sum() / stuff.sum()
    biased = script.boundary_and_bias(pred, labels)
    assert biased["stuff_predicted_as_thing"] == pytest.approx(expected)
    assert biased["thing_predicted_as_stuff"] == 0.0 and biased["boundary_iou"] < 100.0


def test_readme_and_model_card_quote_the_committed_comparison():
    """The comparison table in README.md and model_card.md is the one generated from the committed JSON."""
    script = _load_script()
    result = json.loads((REPO_PATH / "benchmarks" / "results" / "toy_world_comparison.json").read_text())
    assert not result["smoke"] and len({r["seed"] for r in result["rows"]}) >= 3
    table = script.headline_table(
        result["summary"], result["steps"], result["baselines"], goals=result["goals"], worlds=result["worlds"]
    )
    for doc in ("README.md", "model_card.md"):
        text = (REPO_PATH / doc).read_text()
        block = text.split(script.README_START, 1)[1].split(script.README_END, 1)[0]
        assert block.strip() == table.strip(), f"{doc}: run `python training/toy_world_comparison.py --update_docs`"
    # and the committed summary is the mean / sd / min over the seeds of the committed rows, recomputed here
    test_entries = [e for e in result["summary"] if e["split"] == "test"]
    groups = {(r["world"], r["model"]) for r in result["rows"]}
    assert sorted((e["world"], e["model"]) for e in test_entries) == sorted(groups)
    for entry in test_entries:
        group = [r for r in result["rows"] if (r["world"], r["model"]) == (entry["world"], entry["model"])]
        assert entry["seeds"] == len(group)
        for column in ("all", "seen", "unseen", "stuff", "things", "unseen_stuff"):
            values = [r[column] for r in group]
            expected = {"mean": statistics.mean(values), "sd": statistics.stdev(values), "min": min(values)}
            assert entry[column] == pytest.approx(expected, rel=1e-9, abs=1e-9), (entry["world"], entry["model"])


def test_models_are_valid_configurations_and_retired_rows_stay_in_the_results():
    """Every model the sweep trains is a valid config; the rows of models whose settings were retired are gone from
    MODELS but stay, with the overrides they ran with, in the committed results."""
    from modeling_disa import PAPER_SDM_SETTINGS, DiSaConfig

    script = _load_script()
    assert {"catseg", "disa", "disa-sdm-only", "disa-hrm-only", "disa-paper"} <= set(script.MODELS)
    for name, (preset, overrides) in script.MODELS.items():
        config = DiSaConfig.from_pretrained(REPO_PATH / preset, **overrides)
        assert {key: getattr(config, key) for key in overrides} == overrides, name
    paper = script.MODELS["disa-paper"][1]
    assert {key: paper[key] for key in PAPER_SDM_SETTINGS} == PAPER_SDM_SETTINGS
    committed = json.loads((REPO_PATH / "benchmarks" / "results" / "toy_world_ablation.json").read_text())["rows"]
    retired = {row["model"] for row in committed} - set(script.MODELS)
    assert {"disa-first-wave", "fw+detach", "cost-saliency+own+presence+shared+copy"} <= retired
    assert all(row["overrides"] for row in committed if row["model"] in retired)
