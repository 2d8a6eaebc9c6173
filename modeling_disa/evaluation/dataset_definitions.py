"""Evaluation-dataset definitions for open-vocabulary semantic segmentation (data, not code).

The definitions live in ``modeling_disa/evaluation/definitions/<name>.json`` (class names exactly as CAT-Seg's
``datasets/*.json``, label dtype, ignore value, evaluation rules, Hub config name, raw-release mapping).
This module only loads them and applies the two rules that are not plain data:

* prompt handling: a class entry may hold synonyms separated by a comma and a space (``"building, edifice"``);
  only the first synonym is prompted, by CAT-Seg's rule ``name.split(", ")[0]`` (nothing stripped: ADE-150's
  ``"bed "`` is prompted as ``"bed "``, which CLIP's tokenizer reads as ``"bed"``; a bare comma is part of the
  name);
* prediction folding (PAS-20b): every predicted index ``>= fold.from`` becomes ``fold.to`` before scoring.

Standalone on purpose: imports only the standard library, NumPy and (lazily) torch, never the model files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np

# The six open-vocabulary evaluation datasets in the column order of the published tables.
EVALUATION_DATASETS: tuple[str, ...] = ("ade847", "pc459", "ade150", "pc59", "voc20", "voc20b")
TRAINING_DATASETS: tuple[str, ...] = ("coco_stuff171",)
ALL_DATASETS: tuple[str, ...] = EVALUATION_DATASETS + TRAINING_DATASETS

_ALIASES = {
    "a847": "ade847",
    "ade20k847": "ade847",
    "ade847": "ade847",
    "pc459": "pc459",
    "pascalcontext459": "pc459",
    "context459": "pc459",
    "a150": "ade150",
    "ade20k150": "ade150",
    "ade150": "ade150",
    "ade20k": "ade150",
    "pc59": "pc59",
    "pascalcontext59": "pc59",
    "context59": "pc59",
    "voc20": "voc20",
    "pas20": "voc20",
    "pascalvoc20": "voc20",
    "voc": "voc20",
    "voc20b": "voc20b",
    "pas20b": "voc20b",
    "pascalvoc20b": "voc20b",
    "cocostuff171": "coco_stuff171",
    "cocostuff": "coco_stuff171",
    "coco171": "coco_stuff171",
    "coco": "coco_stuff171",
}


class UnknownDatasetError(KeyError):
    """Raised for a dataset name that is not defined."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ClassListMismatchError(ValueError):
    """Raised when a class list does not match the dataset definition it is used with."""


def definitions_dir() -> Traversable:
    """Folder holding the ``<name>.json`` definitions: the package data ``definitions/`` (read through
    `importlib.resources`, so it works from any install), or ``$DISA_DATASET_DEFINITIONS_DIR``."""
    env = os.environ.get("DISA_DATASET_DEFINITIONS_DIR")
    if env:
        return Path(env)
    return files(__package__).joinpath("definitions")


# CAT-Seg's synonym separator (its `get_text_embeds` prompts `classname.split(", ")[0]`): the rule of the model's
# `prompt_name`, which the processor applies to the names `run_evaluation.py` passes; repeated here so that this
# module does not import the model files.
SYNONYM_SEPARATOR = ", "


def first_synonym(name: str) -> str:
    """The prompted name, by CAT-Seg's rule: ``"building, edifice"`` -> ``"building"``; ``"bed "`` -> ``"bed "``
    (not stripped); ``"a,b"`` -> ``"a,b"``."""
    return name.split(SYNONYM_SEPARATOR)[0]


def _name_key(name: str) -> str:
    # white space is not part of what CLIP's tokenizer reads (it collapses runs of it), nor of a class's identity
    return " ".join(name.split())


def canonical_name(name: str) -> str:
    """Map a user-facing dataset name (``"A-847"``, ``"PAS-20b"``, ``"pc_59"``...) to its definition name."""
    key = "".join(ch for ch in str(name).lower() if ch.isalnum())
    if key in _ALIASES:
        return _ALIASES[key]
    raise UnknownDatasetError(
        f"Unknown evaluation dataset {name!r}. Known datasets: {', '.join(ALL_DATASETS)} "
        f"(aliases such as 'A-847', 'PC-459', 'A-150', 'PC-59', 'PAS-20', 'PAS-20b', 'coco-stuff' also work)."
    )


@dataclass(frozen=True)
class DatasetDefinition:
    name: str
    display_name: str
    short_name: str
    hub_config: str
    class_names: tuple[str, ...]
    label_dtype: str
    ignore_index: int
    split: str
    num_images: int
    miou_rule: str = "present_in_gt"
    prediction_fold: tuple[int, int] | None = None
    scored_class_names: tuple[str, ...] | None = None
    class_names_source: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # ------------------------------------------------------------------ derived
    @property
    def num_classes(self) -> int:
        """Number of prompted classes (model output channels), e.g. 59 for PAS-20b."""
        return len(self.class_names)

    @property
    def num_scored_classes(self) -> int:
        """Number of classes in the confusion matrix, e.g. 21 for PAS-20b."""
        return len(self.scored_names)

    @property
    def scored_names(self) -> tuple[str, ...]:
        if self.scored_class_names is not None:
            return self.scored_class_names
        return tuple(_name_key(first_synonym(n)) for n in self.class_names)

    @property
    def prompt_names(self) -> list[str]:
        """Names that go into the prompt template (first synonym of each class, by CAT-Seg's rule)."""
        return [first_synonym(n) for n in self.class_names]

    @property
    def numpy_label_dtype(self) -> np.dtype:
        return np.dtype(self.label_dtype)

    def prompts(self, template: str = "A photo of a {} in the scene") -> list[str]:
        return [template.format(n) for n in self.prompt_names]

    # ------------------------------------------------------------------ rules
    def fold_predictions(self, pred):
        """Apply the prediction fold (PAS-20b: index >= 20 -> 20). Works on NumPy arrays and torch tensors."""
        if self.prediction_fold is None:
            return pred
        start, to = self.prediction_fold
        if isinstance(pred, np.ndarray):
            return np.where(pred >= start, np.asarray(to, dtype=pred.dtype), pred)
        import torch

        return torch.where(pred >= start, torch.as_tensor(to, dtype=pred.dtype, device=pred.device), pred)

    def check_class_names(self, names: Sequence[str], what: str = "class list") -> None:
        """Raise :class:`ClassListMismatchError` unless ``names`` equals this dataset's class list.

        Entries may be given either verbatim (with synonyms) or as prompt names (first synonym); white space does
        not count.
        """
        names = list(names)
        mine = [_name_key(n) for n in self.prompt_names]
        theirs = [_name_key(first_synonym(n)) for n in names]
        if names == list(self.class_names) or theirs == mine:
            return
        if len(names) != self.num_classes:
            raise ClassListMismatchError(
                f"{what} has {len(names)} classes but dataset {self.name!r} has {self.num_classes}."
            )
        bad = [(i, n, m) for i, (n, t, m) in enumerate(zip(names, theirs, mine)) if t != m]
        shown = ", ".join(f"#{i}: {n!r} != {m!r}" for i, n, m in bad[:5])
        raise ClassListMismatchError(
            f"{what} does not match dataset {self.name!r}: {len(bad)} of {len(names)} names differ ({shown}"
            f"{', ...' if len(bad) > 5 else ''})."
        )

    def to_metadata(self) -> dict[str, Any]:
        """Label conventions as a JSON-able dict (written into the prepared dataset's metadata)."""
        return {
            "dataset": self.name,
            "display_name": self.display_name,
            "num_classes": self.num_classes,
            "num_scored_classes": self.num_scored_classes,
            "class_names": list(self.class_names),
            "label_dtype": self.label_dtype,
            "ignore_index": self.ignore_index,
            "miou_rule": self.miou_rule,
            "prediction_fold": list(self.prediction_fold) if self.prediction_fold else None,
            "scored_class_names": list(self.scored_names),
            "class_names_source": self.class_names_source,
        }


def _from_json(data: dict[str, Any]) -> DatasetDefinition:
    ev = data.get("eval") or {}
    fold = ev.get("prediction_fold")
    prompt = data.get("prompt") or {}
    # the prompt rule is CAT-Seg's, applied by the model's processor: a definition may state it, not change it
    if set(prompt) - {"synonym_separator"} or prompt.get("synonym_separator", SYNONYM_SEPARATOR) != SYNONYM_SEPARATOR:
        raise ValueError(
            f"Definition file for {data['name']!r}: prompt settings {prompt} are not CAT-Seg's rule, the only one the "
            "processor applies (the text before the first comma-and-space, nothing stripped); write "
            '"prompt": {"synonym_separator": ", "} or leave "prompt" out.'
        )
    definition = DatasetDefinition(
        name=data["name"],
        display_name=data.get("display_name", data["name"]),
        short_name=data.get("short_name", data["name"]),
        hub_config=data.get("hub_config", data["name"]),
        class_names=tuple(data["class_names"]),
        label_dtype=data["label_dtype"],
        ignore_index=int(data["ignore_index"]),
        split=data.get("split", "validation"),
        num_images=int(data.get("num_images", 0)),
        miou_rule=ev.get("miou_rule", "present_in_gt"),
        prediction_fold=(int(fold["from"]), int(fold["to"])) if fold else None,
        scored_class_names=tuple(ev["scored_class_names"]) if ev.get("scored_class_names") else None,
        class_names_source=data.get("class_names_source", ""),
        raw=data.get("raw") or {},
    )
    if "num_classes" in data and int(data["num_classes"]) != definition.num_classes:
        raise ValueError(
            f"Definition file for {definition.name!r} says num_classes={data['num_classes']} "
            f"but lists {definition.num_classes} class names."
        )
    info = np.iinfo(definition.numpy_label_dtype)
    if not (definition.num_scored_classes <= definition.ignore_index <= info.max):
        raise ValueError(
            f"Dataset {definition.name!r}: ignore_index {definition.ignore_index} is not a free "
            f"{definition.label_dtype} value above the class ids."
        )
    return definition


_CACHE: dict[str, DatasetDefinition] = {}


def load_evaluation_dataset(name_or_path: str | os.PathLike) -> DatasetDefinition:
    """Load a definition by name/alias (``"ade847"``, ``"A-847"``) or from a ``.json`` path."""
    path = Path(name_or_path)
    if str(name_or_path).endswith(".json") and path.is_file():
        with open(path, encoding="utf-8") as f:
            return _from_json(json.load(f))
    name = canonical_name(str(name_or_path))
    key = f"{definitions_dir()}::{name}"
    if key not in _CACHE:
        file = definitions_dir() / f"{name}.json"
        if not file.is_file():
            raise UnknownDatasetError(f"Evaluation dataset {name!r} has no definition file at {file}.")
        _CACHE[key] = _from_json(json.loads(file.read_text(encoding="utf-8")))
    return _CACHE[key]


def list_evaluation_datasets() -> list[str]:
    return list(ALL_DATASETS)


__all__ = [
    "ALL_DATASETS",
    "EVALUATION_DATASETS",
    "TRAINING_DATASETS",
    "DatasetDefinition",
    "ClassListMismatchError",
    "UnknownDatasetError",
    "definitions_dir",
    "canonical_name",
    "first_synonym",
    "SYNONYM_SEPARATOR",
    "list_evaluation_datasets",
    "load_evaluation_dataset",
]
