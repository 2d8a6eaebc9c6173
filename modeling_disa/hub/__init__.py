"""Publishing DiSa to the Hugging Face Hub: a complete repository in one commit.

`save_for_hub(model, processor, folder, ...)` writes everything a Hub repo needs:

- `model.safetensors` and `config.json` (with `auto_map` for `AutoConfig`, `AutoModel`,
  `AutoModelForSemanticSegmentation`, and `custom_pipelines` for the `open-vocabulary-segmentation` task);
- `processor_config.json`, `preprocessor_config.json`, `tokenizer.json`, `tokenizer_config.json`;
- the code files (`configuration_disa.py`, `modeling_disa.py`, ..., `pipeline_disa.py`) so that
  `AutoModel.from_pretrained(repo, trust_remote_code=True)` and `pipeline(..., trust_remote_code=True)` work without
  the package installed;
- `README.md`: the model card rendered from `model_card.md` (placeholders `{model_name}`, `{repo_id}`,
  `{eval_results}`; any other brace text such as the prompt template `"A photo of a {} in the scene"` is left alone),
  with metadata (`library_name: transformers`, `pipeline_tag: image-segmentation`, datasets, metrics) and a
  `model-index` built from the evaluation results, when given.

`publish_to_hub(model, processor, repo_id, eval_results=None, ...)` does the same in a temporary folder, creates the
repo (if needed) and uploads the folder in one commit. The standard `model.push_to_hub(repo_id, processor=...)` and
`model.save_pretrained(folder, push_to_hub=True, ...)` of `DiSaForOpenVocabSegmentation` go through it too. CLI:

    python -m modeling_disa.hub --model_dir out/disa-vitb --repo_id org/disa-vitb --eval_results results.json
    python -m modeling_disa.hub --model_dir out/disa-vitb --repo_id org/disa-vitb --output_dir staged/  # no upload

The demo Space (the Gradio app in the repository's `space/` folder): `publish_space(repo_id, model_repo)` writes the
app, its requirements, its example images (`examples/*.png` and `examples/examples.json`), its README with
`models: [model_repo]` (the model the app serves) and a copy of this package (which the app imports), creates the
Space (`repo_type="space"`, `space_sdk="gradio"`) and uploads it in one commit:

    python -m modeling_disa.hub space --repo_id org/disa-demo --model_repo org/disa-vitb [--output_dir staged/]

Evaluation results (a dict or a JSON file) may be any of:
`{"ade150": {"mIoU": 31.5, "mAcc": 50.1}, ...}`, the same under a `"results"` key, a list of
`{"dataset": "ade150", "mIoU": 31.5, ...}` entries (as training/run_evaluation.py writes them; the name may also be
under `"name"`, or `"benchmark"` as older result files have it), or `{"ade150": 31.5}` (mIoU). Metric names:
`mIoU`/`mean_iou`,
`mAcc`/`mean_accuracy`, `pAcc`/`pixel_accuracy`/`overall_accuracy`, `fwIoU`/`frequency_weighted_iou`; values are
written as given (the project's evaluation writes percentages). Other keys are ignored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, SpaceCard
from huggingface_hub import constants as hub_constants
from transformers.dynamic_module_utils import custom_object_save

from ..model.pipeline_disa import PIPELINE_TASK, DiSaOpenVocabSegmentationPipeline

# The card template, package data (in the repository a link to the top-level model_card.md; a file in a wheel).
TEMPLATE = files(__package__).joinpath("model_card.md")
PACKAGE_DIR = Path(__file__).resolve().parent.parent
SPACE_DIR = PACKAGE_DIR.parent / "space"  # the app folder, when the package runs from a repository checkout
SPACE_FILE_SUFFIXES = (".py", ".txt", ".md")  # the app's own files (not its README screenshot)
SPACE_EXAMPLE_FILES = ("*.png", "examples.json")  # examples/: the example images and the manifest naming them
SPACE_SDK = "gradio"
PLACEHOLDERS = ("model_name", "repo_id", "eval_results")

# metric key in the results JSON -> (model-index metric type, display name)
METRIC_KEYS = {
    "miou": ("mean_iou", "mIoU"),
    "mean_iou": ("mean_iou", "mIoU"),
    "macc": ("mean_accuracy", "mAcc"),
    "mean_accuracy": ("mean_accuracy", "mAcc"),
    "pacc": ("accuracy", "pAcc"),
    "pixel_accuracy": ("accuracy", "pAcc"),
    "overall_accuracy": ("accuracy", "pAcc"),
    "fwiou": ("frequency_weighted_iou", "fwIoU"),
    "frequency_weighted_iou": ("frequency_weighted_iou", "fwIoU"),
}
METRIC_ORDER = ("mIoU", "mAcc", "pAcc", "fwIoU")
DATASET_KEYS = ("dataset", "benchmark", "name")  # the evaluation dataset of a results entry


# ---------------------------------------------------------------------------------------------------- eval results
def _dataset_info(name: str) -> dict:
    """Display name / split / config of an evaluation dataset from its definition, or the name itself."""
    info = {"name": name, "display_name": name, "split": None, "config": None}
    from ..evaluation.dataset_definitions import UnknownDatasetError, load_evaluation_dataset

    try:
        definition = load_evaluation_dataset(name)
    except UnknownDatasetError:  # a dataset without a definition is published under its own name
        return info
    info.update(
        name=definition.name,
        display_name=definition.display_name,
        split=definition.split,
        config=definition.hub_config,
    )
    return info


def load_eval_results(source) -> dict[str, dict[str, float]]:
    """Normalise evaluation results to `{dataset: {"mIoU": value, ...}}` (see the module docstring).

    `source` is a dict, a list, or a path to a JSON file.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation results file {str(path)!r} does not exist.")
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"evaluation results file {str(path)!r} is not valid JSON: {error}") from error
    if isinstance(source, dict) and isinstance(source.get("results"), (dict, list)):
        source = source["results"]
    entries: list[tuple[str, object]] = []
    if isinstance(source, list):
        for item in source:
            if not isinstance(item, dict) or not any(isinstance(item.get(k), str) for k in DATASET_KEYS):
                raise ValueError(f"each evaluation result entry needs a 'dataset' name, got {item!r}.")
            name = next(item[k] for k in DATASET_KEYS if isinstance(item.get(k), str))
            entries.append((name, item))
    elif isinstance(source, dict):
        entries = list(source.items())
    else:
        raise TypeError(f"evaluation results must be a dict, a list or a JSON file path, got {type(source).__name__}.")

    results: dict[str, dict[str, float]] = {}
    for name, values in entries:
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = {"mIoU": values}
        if not isinstance(values, dict):
            continue
        metrics = {}
        for key, value in values.items():
            mapped = METRIC_KEYS.get(str(key).lower())
            if mapped is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(float(value)):
                metrics[mapped[1]] = float(value)
        if metrics:
            results[str(name)] = metrics
    if not results:
        raise ValueError("no numeric evaluation results found (expected e.g. {'ade150': {'mIoU': 31.5}}).")
    return results


def eval_results_to_model_index(
    results: dict[str, dict[str, float]], dataset_repo: str | None = None
) -> list[EvalResult]:
    """One `EvalResult` per (evaluation dataset, metric), task type `image-segmentation`."""
    display_to_type = {name: type_ for type_, name in METRIC_KEYS.values()}
    entries = []
    for dataset, metrics in results.items():
        info = _dataset_info(dataset)
        for metric in sorted(metrics, key=lambda m: METRIC_ORDER.index(m) if m in METRIC_ORDER else 99):
            entries.append(
                EvalResult(
                    task_type="image-segmentation",
                    task_name="Open-vocabulary semantic segmentation",
                    dataset_type=dataset_repo or info["name"],
                    dataset_name=info["display_name"],
                    dataset_config=info["config"],
                    dataset_split=info["split"],
                    metric_type=display_to_type[metric],
                    metric_name=metric,
                    metric_value=metrics[metric],
                )
            )
    return entries


def eval_results_markdown(results: dict[str, dict[str, float]] | None) -> str:
    """A markdown table of the results (or a sentence saying there are none yet)."""
    if not results:
        return "No evaluation results have been published for this checkpoint yet."
    columns = [m for m in METRIC_ORDER if any(m in v for v in results.values())]
    lines = ["| dataset | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for dataset, metrics in results.items():
        cells = [f"{metrics[c]:.1f}" if c in metrics else "-" for c in columns]
        lines.append(f"| {_dataset_info(dataset)['display_name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- model card
def render_template(text: str, values: dict[str, str]) -> str:
    """Replace `{model_name}`, `{repo_id}`, `{eval_results}` only (not `str.format`: the card holds other braces)."""
    return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", lambda m: str(values.get(m.group(1), m.group(0))), text)


def render_model_card(
    repo_id: str,
    eval_results=None,
    *,
    model_name: str | None = None,
    template: str | os.PathLike | None = None,
    base_model: str | list[str] | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    dataset_repo: str | None = None,
) -> ModelCard:
    """
    The model card (`README.md`) for `repo_id`.

    Args:
        repo_id: `"org/name"`; used in the usage snippet and (its last part) as the default `model_name`.
        eval_results: results dict / list / JSON path (see module docstring); fills the `{eval_results}` table and
            the `model-index`.
        template: a card template path (default: the package's `model_card.md`, the project's card).
        base_model, datasets, tags, license: metadata merged into the template's front matter.
        dataset_repo: Hub dataset id used as `dataset.type` in the model-index (default: the dataset's name).
    """
    results = load_eval_results(eval_results) if eval_results is not None else None
    model_name = model_name or repo_id.split("/")[-1]
    if template is not None:
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"model card template {str(path)!r} does not exist.")
        text = path.read_text(encoding="utf-8")
    else:
        text = TEMPLATE.read_text(encoding="utf-8")
    text = render_template(
        text, {"model_name": model_name, "repo_id": repo_id, "eval_results": eval_results_markdown(results)}
    )
    card = ModelCard(text, ignore_metadata_errors=True)
    data = card.data
    data.library_name = "transformers"
    data.pipeline_tag = "image-segmentation"
    data.model_name = model_name
    if license:
        data.license = license
    if base_model:
        data.base_model = base_model
    data.datasets = _merge(data.datasets, datasets)
    data.metrics = _merge(data.metrics, ["mean_iou"])
    data.tags = _merge(data.tags, ["open-vocabulary-segmentation"] + list(tags or []))
    data.eval_results = eval_results_to_model_index(results, dataset_repo) if results else None
    return card


def _merge(existing, extra) -> list[str] | None:
    items = [existing] if isinstance(existing, str) else list(existing or [])
    for item in extra or []:
        if item not in items:
            items.append(item)
    return items or None


# ---------------------------------------------------------------------------------------------------- saving / upload
def save_for_hub(
    model,
    processor,
    save_directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    eval_results=None,
    max_shard_size: int | str | None = "50GB",
    state_dict: dict | None = None,
    **card_kwargs,
) -> Path:
    """Write a complete Hub repository into `save_directory` (see the module docstring); returns the folder.

    `processor=None` writes everything but the processor and tokenizer files (see `publish_to_hub`). `state_dict`:
    the weights to write instead of the model's own parameters, e.g. the full state dict that accelerate's
    `get_state_dict` gathers from FSDP shards (the sharded model's own parameters are not the full weights)."""
    if getattr(model.config, "model_type", None) != "disa":
        raise TypeError(f"expected a DiSa model, got {type(model).__name__}.")
    if processor is not None and not hasattr(processor, "tokenize_class_names"):
        raise TypeError(f"expected the DiSaProcessor (image processor + tokenizer), got {type(processor).__name__}.")
    if processor is not None:
        model.check_prompt_templates(processor.prompt_templates)  # a repository whose pipeline would misname masks
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    card_kwargs["tags"] = list(card_kwargs.get("tags") or []) + list(getattr(model, "model_tags", None) or [])
    card = render_model_card(repo_id or folder.name, eval_results, **card_kwargs)

    previous = getattr(model.config, "custom_pipelines", None)
    model.config.custom_pipelines = {
        PIPELINE_TASK: {
            "impl": f"{DiSaOpenVocabSegmentationPipeline.__module__.split('.')[-1]}."
            f"{DiSaOpenVocabSegmentationPipeline.__name__}",
            "pt": ["AutoModel"],
            "type": "multimodal",
        }
    }
    try:
        model.save_pretrained(folder, max_shard_size=max_shard_size, state_dict=state_dict)
    finally:
        if previous is None:
            del model.config.custom_pipelines
        else:
            model.config.custom_pipelines = previous
    custom_object_save(DiSaOpenVocabSegmentationPipeline, folder)  # pipeline_disa.py (+ its sibling imports)
    if processor is not None:
        processor.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)  # preprocessor_config.json, for image-processor-only loaders
    card.save(folder / "README.md")
    return folder


def publish_to_hub(
    model,
    processor,
    repo_id: str,
    eval_results=None,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload DiSa model",
    commit_description: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    max_shard_size: int | str | None = "50GB",
    **card_kwargs,
):
    """
    Save a complete repository (`save_for_hub`) in a temporary folder, create `repo_id` if needed and upload it in
    one commit. Returns the `CommitInfo` of the upload.

    `endpoint` defaults to `HF_ENDPOINT` / huggingface.co; `token` to the stored login or `HF_TOKEN`.
    `card_kwargs` go to `render_model_card` (`model_name`, `template`, `base_model`, `datasets`, `tags`, `license`,
    `dataset_repo`). With `processor=None` the repo gets no processor or tokenizer files (warned): the pipelines
    cannot load from it until `processor.push_to_hub(repo_id)` adds them.
    """
    if processor is None:
        warnings.warn(
            f"pushing {repo_id} without a processor: the repo gets the weights, config, code and model card but no "
            "processor_config.json or tokenizer files, so `pipeline(...)` and `AutoProcessor` cannot load from it. "
            "Pass processor=DiSaProcessor(...) or run processor.push_to_hub(repo_id) as well.",
            UserWarning,
            stacklevel=3,
        )
    _check_online()
    _check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token, library_name="modeling_disa")
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_for_hub(
            model,
            processor,
            tmp,
            repo_id=repo_id,
            eval_results=eval_results,
            max_shard_size=max_shard_size,
            **card_kwargs,
        )
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
        )


def _check_online() -> None:
    if hub_constants.HF_HUB_OFFLINE:
        raise RuntimeError("cannot publish to the Hub: offline mode is enabled (unset HF_HUB_OFFLINE).")


def _check_repo_id(repo_id, name: str = "repo_id") -> None:
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{name} must look like 'org/name', got {repo_id!r}.")


# ---------------------------------------------------------------------------------------------------- demo Space
def save_space(
    save_directory: str | os.PathLike, model_repo: str, *, space_dir: str | os.PathLike | None = None
) -> Path:
    """
    Write the demo Space repository into `save_directory`; returns the folder.

    Args:
        model_repo: `"org/name"` of the model the app serves, written to the README metadata (`models:`).
        space_dir: the app folder (`app.py`, `requirements.txt`, `README.md` with `sdk: gradio` and `app_file`,
            optional `examples/`); default: the `space/` folder of the repository checkout the package runs from
            (an installed package has none: pass it).
    """
    _check_repo_id(model_repo, "model_repo")
    if space_dir is None and not (PACKAGE_DIR.parent / "setup.py").is_file():
        raise FileNotFoundError(
            "the demo app is not part of the installed package: pass space_dir= (--space_dir) "
            "pointing at the repository's space/ folder."
        )
    source = Path(space_dir) if space_dir is not None else SPACE_DIR
    missing = [name for name in ("app.py", "requirements.txt", "README.md") if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the Space folder {str(source)!r} lacks {missing}; pass space_dir= (--space_dir) "
            "pointing at the repository's space/ folder."
        )
    card = SpaceCard.load(source / "README.md")
    if card.data.get("sdk") != SPACE_SDK or not (source / str(card.data.get("app_file"))).is_file():
        raise ValueError(
            f"{source / 'README.md'} must declare sdk: {SPACE_SDK} and an app_file present in the "
            f"folder, got sdk={card.data.get('sdk')!r}, app_file={card.data.get('app_file')!r}."
        )
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in SPACE_FILE_SUFFIXES:
            shutil.copy2(path, folder / path.name)
    examples = sorted({path for pattern in SPACE_EXAMPLE_FILES for path in (source / "examples").glob(pattern)})
    if examples:
        (folder / "examples").mkdir(exist_ok=True)
    for path in examples:
        shutil.copy2(path, folder / "examples" / path.name)
    # The Space cannot pip-install this package from a registry, so the app's import finds a copy beside it.
    package = folder / PACKAGE_DIR.name
    package.mkdir(exist_ok=True)
    for path in sorted(PACKAGE_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".json", ".md") and "__pycache__" not in path.parts:
            target = package / path.relative_to(PACKAGE_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    card.data.models = [model_repo]
    card.save(folder / "README.md")
    return folder


def publish_space(
    repo_id: str,
    model_repo: str,
    *,
    space_dir: str | os.PathLike | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload DiSa demo",
    endpoint: str | None = None,
):
    """Stage the demo Space (`save_space`) in a temporary folder, create the Space `repo_id` (Gradio SDK) if needed
    and upload it in one commit. Returns the `CommitInfo`. Warns when `model_repo` does not exist (yet)."""
    _check_online()
    _check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token, library_name="modeling_disa")
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_space(tmp, model_repo, space_dir=space_dir)
        if not api.repo_exists(model_repo):
            warnings.warn(
                f"the Space serves {model_repo}, which does not exist on the Hub yet: publish it with "
                "`python -m modeling_disa.hub --model_dir DIR --repo_id " + model_repo + "`.",
                stacklevel=2,
            )
        api.create_repo(repo_id, repo_type="space", space_sdk=SPACE_SDK, private=private, exist_ok=True)
        return api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="space", commit_message=commit_message)


# ---------------------------------------------------------------------------------------------------- CLI
def space_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_disa.hub space",
        description="Publish the Gradio demo Space that serves a DiSa model repo.",
    )
    parser.add_argument("--repo_id", required=True, help="the Space, 'org/name'")
    parser.add_argument("--model_repo", required=True, help="the model repo the app serves, 'org/name'")
    parser.add_argument("--space_dir", default=None, help="the app folder (default: the repository's space/)")
    parser.add_argument("--output_dir", default=None, help="only write the Space repository here, do not upload")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None)
    parser.add_argument("--commit_message", default="Upload DiSa demo")
    args = parser.parse_args(argv)
    if args.output_dir:
        folder = save_space(args.output_dir, args.model_repo, space_dir=args.space_dir)
        print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
        return 0
    info = publish_space(
        args.repo_id,
        args.model_repo,
        space_dir=args.space_dir,
        token=args.token,
        private=args.private or None,
        commit_message=args.commit_message,
    )
    print(f"uploaded to the Space {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["space"]:  # a subcommand in front of the model-publishing options, which keep their form
        return space_main(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The demo Space: python -m modeling_disa.hub space --help",
    )
    parser.add_argument("--model_dir", required=True, help="folder with the saved model and processor")
    parser.add_argument("--repo_id", required=True, help="target repo, 'org/name'")
    parser.add_argument("--eval_results", default=None, help="evaluation results JSON")
    parser.add_argument("--output_dir", default=None, help="only write the repository here, do not upload")
    parser.add_argument("--template", default=None, help="model card template (default: model_card.md)")
    parser.add_argument("--base_model", default=None)
    parser.add_argument("--dataset", action="append", default=None, help="training dataset id (repeatable)")
    parser.add_argument("--dataset_repo", default=None, help="Hub dataset id for the model-index entries")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None)
    parser.add_argument("--commit_message", default="Upload DiSa model")
    args = parser.parse_args(argv)

    from ..model.modeling_disa import DiSaForOpenVocabSegmentation
    from ..model.processing_disa import DiSaProcessor

    model = DiSaForOpenVocabSegmentation.from_pretrained(args.model_dir)
    processor = DiSaProcessor.from_pretrained(args.model_dir)
    card_kwargs = dict(
        template=args.template, base_model=args.base_model, datasets=args.dataset, dataset_repo=args.dataset_repo
    )
    if args.output_dir:
        folder = save_for_hub(
            model, processor, args.output_dir, repo_id=args.repo_id, eval_results=args.eval_results, **card_kwargs
        )
        print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
        return 0
    info = publish_to_hub(
        model,
        processor,
        args.repo_id,
        args.eval_results,
        token=args.token,
        private=args.private or None,
        commit_message=args.commit_message,
        **card_kwargs,
    )
    print(f"uploaded to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


__all__ = [
    "eval_results_markdown",
    "eval_results_to_model_index",
    "load_eval_results",
    "publish_space",
    "publish_to_hub",
    "render_model_card",
    "save_for_hub",
    "save_space",
]

if __name__ == "__main__":
    raise SystemExit(main())
