"""DiSa open-vocabulary segmentation: a Gradio demo, laid out as a Hugging Face Space (this folder is the Space).

Locally, after the default job (`accelerate launch training/train.py` saves the toy-world model to runs/toy-world):

    python space/app.py                                  # http://127.0.0.1:7860
    python space/app.py --model org/disa-vitb            # or DISA_DEMO_MODEL=<folder or Hub repo>

Which model: `--model`, else `$DISA_DEMO_MODEL`, else the model repo this Space's README links (`models:`, when the
Hub is reachable), else the default job's output folder; with none of them the app says how to make one and exits.

Each request is one call of the `open-vocabulary-segmentation` pipeline (whole image or CAT-Seg's sliding window,
optionally with the SDM saliency maps), so the class names are encoded by the text tower once per request. Models
load through the package's own classes (no remote code is run). The example images are the toy-world test scenes
in `examples/` (written by `python training/write_space_examples.py`, with `examples.json` naming them and the world's
24 classes), so the app needs none of the training code.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from huggingface_hub import SpaceCard
from huggingface_hub import constants as hub_constants
from PIL import Image, ImageOps
from transformers import AutoModel, AutoProcessor, pipeline

from modeling_disa import PIPELINE_TASK, check_inference_dtype
from modeling_disa.visualize import palette, render_saliency

APP_DIR = Path(__file__).resolve().parent
MODEL_ENV = "DISA_DEMO_MODEL"
EXAMPLES_DIR = APP_DIR / "examples"
EXAMPLES_MANIFEST = "examples.json"  # {"images": [file names], "labels": [the toy world's class names]}
DEFAULT_JOB_OUTPUT = Path("runs") / "toy-world"  # output_dir of configuration/training/toy_world.yaml
DEFAULT_JOB_COMMAND = "accelerate launch training/train.py"
MAX_IMAGE_PIXELS = 2048 * 2048  # the pipeline upsamples every class's probabilities to the image size
MAX_UPLOAD_SIZE = "25mb"
SALIENCY_PANEL_SIZE = 192
MODES = {"whole image": "whole", "sliding window": "sliding"}
VIEWS = {"whole": "1 view", "sliding": "4 crops + global view"}
LEGEND_HEADERS = ["class", "pixels %", "mean score"]
# system fonts: the default theme fetches Google Fonts, which an offline browser cannot reach
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = "#overlay img.mask { opacity: 0.6; }"  # let the image show through the class colours
OVERLAY_HEIGHT = 420


class ModelNotFoundError(RuntimeError):
    """No model was given and the default job's output is missing."""


def input_error(title: str, message: str) -> gr.Error:
    """A message for the user (Gradio renders it as HTML); bad input is expected, so no server-side traceback."""
    return gr.Error(message, title=title, print_exception=False)


# ---------------------------------------------------------------------------------------------------- model
def linked_model_repo(readme: Path = APP_DIR / "README.md") -> str | None:
    """The first `models:` entry of the Space's README metadata (the `space` publishing command writes it)."""
    if not readme.is_file():
        return None
    models = SpaceCard.load(readme, ignore_metadata_errors=True).data.get("models") or []
    return models[0] if models else None


def default_job_outputs() -> list[Path]:
    """Where the default job's model may be: below the working directory or the repository checkout."""
    folders = [Path.cwd() / DEFAULT_JOB_OUTPUT, APP_DIR.parent / DEFAULT_JOB_OUTPUT]
    return list(dict.fromkeys(folder.resolve() for folder in folders))


def missing_model_message(looked_in: list[Path]) -> str:
    places = ", ".join(str(p) for p in looked_in)
    return (
        f"No DiSa model to serve: none was given and the default toy-world job's output was not found ({places}).\n"
        f"Make one with the default job, from the repository root (offline, about 11 minutes on 2 CPU cores):\n\n"
        f"    {DEFAULT_JOB_COMMAND}\n\n"
        f"then run `python space/app.py` again; or pass a saved model folder or Hub repo with --model "
        f"(or ${MODEL_ENV})."
    )


def resolve_model_source(model: str | None = None, readme: Path = APP_DIR / "README.md") -> tuple[str, str]:
    """-> (folder or repo id, where it came from). Raises `ModelNotFoundError` with the way to make one."""
    if model:
        return model, "--model"
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV], f"${MODEL_ENV}"
    linked = linked_model_repo(readme)
    if linked and not hub_constants.HF_HUB_OFFLINE:
        return linked, "the Space's README (models:)"
    folders = default_job_outputs()
    for folder in folders:
        if (folder / "config.json").is_file():
            return str(folder), "the default toy-world job"
    raise ModelNotFoundError(missing_model_message(folders))


def load_segmenter(source: str, dtype=None, torch_compile: bool = False):
    """The `open-vocabulary-segmentation` pipeline over a saved folder or Hub repo (package classes only); `dtype`
    (e.g. "bfloat16", refused on a CPU without it) and `torch_compile` are the pipeline's speed options."""
    if not Path(source).exists() and source.count("/") != 1:
        raise ModelNotFoundError(f"{source!r} is neither a folder nor a Hub repo id ('org/name').")
    device = 0 if torch.cuda.is_available() else -1
    dtype = None if dtype is None else check_inference_dtype(dtype, "cuda" if device == 0 else "cpu")
    try:
        model = AutoModel.from_pretrained(source, **({} if dtype is None else {"dtype": dtype})).eval()
        processor = AutoProcessor.from_pretrained(source)
    except OSError as error:
        raise ModelNotFoundError(f"could not load the model {source!r}: {error}") from error
    if getattr(model.config, "model_type", None) != "disa":
        raise ModelNotFoundError(f"{source!r} is a {model.config.model_type!r} model, not DiSa.")
    return pipeline(PIPELINE_TASK, model=model, processor=processor, device=device, torch_compile=torch_compile)


def default_vocabulary(config) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label, key=int)] if getattr(config, "label_token_ids", None) else []


# ---------------------------------------------------------------------------------------------------- inputs
def format_labels(names: list[str]) -> str:
    """Names as the text box shows them: comma-separated, or semicolons when a name holds synonyms."""
    return ("; " if any("," in name for name in names) else ", ").join(names)


def parse_labels(text: str | None) -> list[str]:
    """Class names from the text box: separated by commas, or by semicolons / new lines when there are any (then
    a name may hold synonyms, `building, edifice`). Synonyms are written back separated by ", " whatever the
    spacing typed (`building,edifice` -> `building, edifice`): the model prompts a class by the text before its
    first ", " (CAT-Seg's rule), so a bare comma would otherwise stay part of the prompted name. Raises `gr.Error`
    for none or repeated names."""
    text = text or ""
    separators = ";\n" if any(s in text for s in ";\n") else ","
    for separator in separators[1:]:
        text = text.replace(separator, separators[0])
    names = []
    for name in text.split(separators[0]):
        synonyms = (" ".join(part.split()) for part in name.split(","))
        names.append(", ".join(synonym for synonym in synonyms if synonym))  # "a, ;" holds no "," class
    names = [name for name in names if name]
    if not names:
        raise input_error("No labels", "Enter at least one class name, e.g. <code>red stripes, blue circle</code>.")
    seen, repeated = {}, []
    for name in names:
        if name.lower() in seen and name not in repeated:
            repeated.append(name)
        seen.setdefault(name.lower(), name)
    if repeated:
        listed = ", ".join(html.escape(name) for name in repeated)
        raise input_error("Duplicate labels", f"Each class name may appear once; repeated: {listed}.")
    return names


def open_image(path: str | None, max_pixels: int) -> Image.Image:
    """The uploaded file as RGB, refusing images over `max_pixels` before decoding them."""
    if path is None:
        raise input_error("No image", "Upload an image, take one with the webcam or pick an example.")
    try:
        image = Image.open(path)
    except (OSError, Image.DecompressionBombError) as error:
        raise input_error("Bad image", f"Cannot read the image: {html.escape(str(error))}") from error
    width, height = image.size  # from the header: nothing decoded yet
    if width * height > max_pixels:
        raise input_error(
            "Image too large",
            f"The image is {width} x {height} = {width * height / 1e6:.1f} megapixels; this demo takes up to "
            f"{max_pixels / 1e6:.1f} megapixels. Downscale it and try again.",
        )
    return ImageOps.exif_transpose(image).convert("RGB")


# ---------------------------------------------------------------------------------------------------- request
def segment(segmenter, image_path, labels_text, mode_name, show_saliency, max_pixels=MAX_IMAGE_PIXELS):
    """One request -> (AnnotatedImage value, legend rows, saliency gallery, timing text)."""
    start = time.perf_counter()
    labels = parse_labels(labels_text)
    image = open_image(image_path, max_pixels)
    mode = MODES.get(mode_name)
    if mode is None:
        raise input_error(
            "Bad option", f"Unknown inference mode {html.escape(str(mode_name))!r}; choose one of {list(MODES)}."
        )
    saliency = bool(show_saliency) and bool(getattr(segmenter.model.config, "use_sdm", False))
    try:
        started = time.perf_counter()
        results = segmenter(image, candidate_labels=labels, inference_mode=mode, output_saliency=saliency)
        seconds = time.perf_counter() - started
    except (ValueError, TypeError) as error:  # the pipeline's input checks (e.g. an image smaller than a patch)
        raise input_error("Cannot segment this input", html.escape(str(error))) from error

    colors = palette(len(labels))
    color_map = {name: "#{:02x}{:02x}{:02x}".format(*(int(c) for c in colors[i])) for i, name in enumerate(labels)}
    masks = [(np.asarray(entry["mask"]) > 127, entry) for entry in results]
    annotations = [(mask.astype(np.float32), entry["label"]) for mask, entry in masks]
    rows = ([entry["label"], round(100.0 * mask.mean(), 2), round(entry["score"], 4)] for mask, entry in masks)
    legend = sorted(rows, key=lambda row: -row[1])
    gallery = saliency_panels(image, results) if saliency else []
    timing = (
        f"Pipeline: {seconds:.2f} s ({mode_name}, {VIEWS[mode]}, {len(labels)} classes, "
        f"{image.width} x {image.height} px); whole request: {time.perf_counter() - start:.2f} s."
    )
    overlay = gr.AnnotatedImage(value=(image, annotations), color_map=color_map)
    return overlay, legend, gallery, timing


def saliency_panels(image: Image.Image, results) -> list[tuple[Image.Image, str]]:
    """Per class present: SDM saliency heat map and foreground (green) / background (dark) split, on a small copy."""
    small = image.copy()
    small.thumbnail((SALIENCY_PANEL_SIZE, SALIENCY_PANEL_SIZE))
    panels = []
    for entry in results:
        picture = render_saliency(small, entry["saliency"][None], entry["foreground_mask"][None], [entry["label"]])
        panels.append((picture, f"{entry['label']}: saliency | foreground / background"))
    return panels


# ---------------------------------------------------------------------------------------------------- examples
def load_examples(folder: Path = EXAMPLES_DIR) -> tuple[list[Path], list[str]]:
    """-> (the example PNGs, the class names of the world they come from), from `examples.json` in `folder`; none
    when the folder has no manifest (the app then runs without examples)."""
    manifest = folder / EXAMPLES_MANIFEST
    if not manifest.is_file():
        return [], []
    entries = json.loads(manifest.read_text(encoding="utf-8"))
    paths = [folder / name for name in entries["images"]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{manifest} lists missing images {missing}: rerun `python training/write_space_examples.py`."
        )
    return paths, list(entries["labels"])


def example_labels(vocabulary: list[str], world_labels: list[str]) -> str:
    """A model of the examples' world gets that world's full vocabulary (for the toy world, its 8 unseen classes
    included); any other model its own default vocabulary."""
    if vocabulary and world_labels and set(vocabulary) <= set(world_labels):
        return format_labels(world_labels)
    return format_labels(vocabulary)


# ---------------------------------------------------------------------------------------------------- UI
def build_demo(
    segmenter,
    source: str,
    origin: str = "",
    examples: list[Path] = (),
    example_world: list[str] = (),
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> gr.Blocks:
    config = segmenter.model.config
    has_sdm = bool(getattr(config, "use_sdm", False))
    vocabulary = default_vocabulary(config)
    kind = "DiSa (SDM)" if has_sdm else "CAT-Seg mode"
    kind = "DiSa (SDM + HRM)" if has_sdm and getattr(config, "use_hrm", False) else kind
    with gr.Blocks(title="DiSa open-vocabulary segmentation", analytics_enabled=False) as demo:
        gr.Markdown(
            "# DiSa open-vocabulary segmentation\n"
            f"Model `{source}`{f' (from {origin})' if origin else ''}: {kind}, "
            f"{config.clip_resolution} px CLIP input. Type any class names; every pixel gets the best-matching one."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath", sources=["upload", "webcam", "clipboard"], label="Image", elem_id="image"
                )
                labels = gr.Textbox(
                    value=format_labels(vocabulary),
                    lines=3,
                    elem_id="labels",
                    label="Class names (comma-separated; semicolons when a name holds synonyms)",
                )
                with gr.Row():
                    mode = gr.Radio(list(MODES), value="whole image", label="Inference", elem_id="mode")
                    saliency = gr.Checkbox(
                        value=has_sdm,
                        label="Show SDM saliency",
                        interactive=has_sdm,
                        elem_id="show-saliency",
                        info=None if has_sdm else "this model has no SDM (config.use_sdm=False)",
                    )
                run = gr.Button("Segment", variant="primary", elem_id="run")
                if examples:
                    example_text = example_labels(vocabulary, list(example_world))
                    gr.Examples(
                        [[str(path), example_text] for path in examples],
                        inputs=[image, labels],
                        label="Toy-world test scenes",
                    )
            with gr.Column():
                overlay = gr.AnnotatedImage(
                    label="Segmentation", elem_id="overlay", format="png", height=OVERLAY_HEIGHT
                )
                timing = gr.Markdown(elem_id="timing")
                legend = gr.Dataframe(
                    headers=LEGEND_HEADERS,
                    datatype=["str", "number", "number"],
                    label="Classes present",
                    interactive=False,
                    elem_id="legend",
                )
        gallery = gr.Gallery(
            label="SDM saliency (left) and foreground / background split (right), per class",
            columns=3,
            visible=has_sdm,
            elem_id="saliency",
        )
        run.click(
            lambda *inputs: segment(segmenter, *inputs, max_pixels=max_pixels),
            inputs=[image, labels, mode, saliency],
            outputs=[overlay, legend, gallery, timing],
            api_name="segment",
        )
    return demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help=f"saved DiSa folder or Hub repo (default: ${MODEL_ENV}, the "
        "README's models: link, then the default job's runs/toy-world)",
    )
    parser.add_argument("--host", default=None, help="address to serve on (default 127.0.0.1, $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, $GRADIO_SERVER_PORT)")
    parser.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="weights dtype (bfloat16: CPUs with AMX / AVX512_BF16)",
    )
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the model (first request slow)")
    args = parser.parse_args(argv)
    if args.dtype is not None:
        try:
            check_inference_dtype(args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        except ValueError as error:
            parser.error(f"--dtype {args.dtype}: {error}")
    try:
        source, origin = resolve_model_source(args.model)
        segmenter = load_segmenter(source, args.dtype, args.torch_compile)
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    examples, example_world = load_examples()
    demo = build_demo(segmenter, source, origin, examples, example_world, args.max_image_pixels)
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())
    return 0


def launch_options(examples: Path = EXAMPLES_DIR) -> dict:
    """`Blocks.launch` settings of the app (the tests launch with the same)."""
    return {
        "theme": THEME,
        "css": CSS,
        "show_error": True,
        "max_file_size": MAX_UPLOAD_SIZE,
        "allowed_paths": [str(examples)],
    }


if __name__ == "__main__":
    raise SystemExit(main())
