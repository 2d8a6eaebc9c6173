"""Evaluation-dataset definitions: counts, label conventions, cross-consistency of the lists, prompt and fold rules."""

import json

import numpy as np
import pytest
import torch

from modeling_disa.evaluation.dataset_definitions import (
    ALL_DATASETS,
    EVALUATION_DATASETS,
    ClassListMismatchError,
    UnknownDatasetError,
    definitions_dir,
    first_synonym,
    load_evaluation_dataset,
)

EXPECTED = {  # name: (prompted classes, scored classes, dtype, ignore)
    "ade847": (847, 847, "uint16", 65535),
    "pc459": (459, 459, "uint16", 65535),
    "ade150": (150, 150, "uint8", 255),
    "pc59": (59, 59, "uint8", 255),
    "voc20": (20, 20, "uint8", 255),
    "voc20b": (59, 21, "uint8", 255),
    "coco_stuff171": (171, 171, "uint8", 255),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_and_conventions(name):
    b = load_evaluation_dataset(name)
    n, scored, dtype, ignore = EXPECTED[name]
    assert (b.num_classes, b.num_scored_classes, b.label_dtype, b.ignore_index) == (n, scored, dtype, ignore)
    assert b.hub_config == name and b.miou_rule == "present_in_gt"
    assert len(set(b.class_names)) == n  # no duplicate entries
    assert np.iinfo(b.numpy_label_dtype).max >= ignore >= scored
    assert "cvlab-kaist/CAT-Seg" in b.class_names_source
    raw = json.loads((definitions_dir() / f"{name}.json").read_text())
    assert raw["num_classes"] == n


def test_lists_are_mutually_consistent():
    pc459, pc59 = load_evaluation_dataset("pc459"), load_evaluation_dataset("pc59")
    # PC-59 ids (1-based over the 459 labels) point at the same names (CAT-Seg renames table -> diningtable)
    ids = pc59.raw["source_ids"]
    assert ids == sorted(ids) and len(ids) == 59
    names = [pc459.class_names[i - 1] for i in ids]
    assert [{"table": "diningtable"}.get(x, x) for x in names] == list(pc59.class_names)
    voc20, voc20b = load_evaluation_dataset("voc20"), load_evaluation_dataset("voc20b")
    assert list(voc20b.class_names[:20]) == list(voc20.class_names)
    assert set(voc20b.class_names[20:]) == set(pc59.class_names) - set(voc20.class_names)
    assert list(voc20b.scored_names) == list(voc20.class_names) + ["background"]
    a847 = load_evaluation_dataset("ade847")
    assert len(set(a847.raw["source_ids"])) == 847
    coco = load_evaluation_dataset("coco_stuff171")
    ids = coco.raw["source_ids"]
    assert len(ids) == 171 and ids == sorted(ids) and ids[-1] == 181 and 11 not in ids


def test_prompt_handling_first_synonym():
    a847 = load_evaluation_dataset("ade847")
    assert a847.class_names[1] == "building, edifice" and a847.prompt_names[1] == "building"
    # CAT-Seg does not strip: its source has "bed " with a trailing space (CLIP's tokenizer drops it)
    ade150 = load_evaluation_dataset("ade150")
    assert ade150.prompt_names[7] == "bed " and ade150.scored_names[7] == "bed"
    assert first_synonym("person, individual, someone") == "person"
    assert a847.prompts("a photo of a {}.")[0] == "a photo of a wall."
    assert all("," not in p and p == p.strip() and p for p in a847.prompt_names)


@pytest.mark.parametrize("name", ["a,b", "building, edifice", "a , b", "a,  b", "bed ", "x, y,z"])
def test_first_synonym_is_catseg_rule(name):
    assert first_synonym(name) == name.split(", ")[0]  # CAT-Seg's get_text_embeds, written out


def test_every_shipped_list_is_prompted_by_catseg_rule():
    for name in ALL_DATASETS:
        names = json.loads((definitions_dir() / f"{name}.json").read_text())["class_names"]
        assert load_evaluation_dataset(name).prompt_names == [n.split(", ")[0] for n in names], name


def test_definition_cannot_change_the_prompt_rule(tmp_path):
    data = json.loads((definitions_dir() / "voc20.json").read_text())
    path = tmp_path / "custom.json"
    for prompt in ({"synonym_separator": ","}, {"synonym_separator": ", ", "strip": True}):
        path.write_text(json.dumps({**data, "prompt": prompt}))
        with pytest.raises(ValueError, match="not CAT-Seg's rule"):
            load_evaluation_dataset(path)
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "prompt"}))
    assert load_evaluation_dataset(path).prompt_names == list(data["class_names"])


def test_aliases_and_unknown_names():
    assert load_evaluation_dataset("A-847").name == "ade847" and load_evaluation_dataset("PAS-20b").name == "voc20b"
    assert load_evaluation_dataset("PC-59").name == "pc59"
    assert load_evaluation_dataset("coco-stuff").name == "coco_stuff171"
    with pytest.raises(UnknownDatasetError, match="Known datasets"):
        load_evaluation_dataset("ade20000")
    assert EVALUATION_DATASETS == ("ade847", "pc459", "ade150", "pc59", "voc20", "voc20b")


def test_voc20b_fold_numpy_and_torch():
    b = load_evaluation_dataset("voc20b")
    p = np.array([0, 19, 20, 21, 58])
    assert b.fold_predictions(p).tolist() == [0, 19, 20, 20, 20]
    assert b.fold_predictions(torch.tensor(p)).tolist() == [0, 19, 20, 20, 20]
    assert load_evaluation_dataset("voc20").fold_predictions(p) is p


def test_class_list_check():
    b = load_evaluation_dataset("pc59")
    b.check_class_names(list(b.class_names))
    with pytest.raises(ClassListMismatchError, match="has 58 classes"):
        b.check_class_names(list(b.class_names)[:-1])
    wrong = list(b.class_names)
    wrong[3] = "duvet"
    with pytest.raises(ClassListMismatchError, match="#3"):
        b.check_class_names(wrong)
    ade847 = load_evaluation_dataset("ade847")
    ade847.check_class_names(ade847.prompt_names)  # first synonyms accepted
