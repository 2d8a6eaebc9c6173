"""Offline demo: `python -m modeling_disa.demo`.

Builds the `disa-tiny` preset with random weights (no download), segments a generated image with an open
vocabulary, saves model + processor (safetensors and remote code), reloads the folder through the Auto classes and
checks that the reloaded model gives the same segmentation. It shows the API end to end, not segmentation quality:
the weights are random.

`--dtype bfloat16` (on a CPU only where it has bfloat16 instructions) and `--torch_compile` segment with a bfloat16
copy of the model and / or through `torch.compile`; the summary then gives the largest logit difference to the
float32 eager model, which is the one saved and reloaded.
"""

import argparse
import copy
import json
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from . import (
    DiSaConfig,
    DiSaForOpenVocabSegmentation,
    DiSaProcessor,
    check_inference_dtype,
    compile_for_inference,
    compile_settings,
)

# The `disa-tiny` preset (configuration/models/disa-tiny in the repository) ships as package data, so the demo runs
# from an installed wheel too.
PRESET = files(__package__).joinpath("presets", "disa-tiny")


def demo_image(seed: int, size: int = 160) -> Image.Image:
    """Sky over grass with a red disc: a fixed, recognisable layout."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    image[: size // 2] = (110, 160, 230)
    image[size // 2 :] = (60, 150, 50)
    yy, xx = np.mgrid[:size, :size]
    image[(yy - size * 0.6) ** 2 + (xx - size * 0.4) ** 2 < (size * 0.15) ** 2] = (200, 30, 30)
    noise = rng.integers(-10, 11, image.shape)
    return Image.fromarray(np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        default=None,
        help="preset folder with config, tokenizer and processor (default: the packaged disa-tiny)",
    )
    parser.add_argument("--labels", nargs="+", default=["sky", "grass", "red ball"], help="the open vocabulary")
    parser.add_argument("--output_dir", default="outputs/demo", help="where the model, processor and PNG go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--torch_compile", action="store_true", help="segment through torch.compile")
    parser.add_argument("--torch_compile_backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument("--torch_compile_mode", default=None, help="torch.compile mode")
    args = parser.parse_args(argv)
    try:
        dtype = check_inference_dtype(args.dtype, "cpu")
    except ValueError as error:
        parser.error(f"--dtype {args.dtype}: {error}")

    torch.manual_seed(args.seed)
    with as_file(PRESET if args.preset is None else Path(args.preset)) as preset:
        model = DiSaForOpenVocabSegmentation(DiSaConfig.from_pretrained(preset)).eval()
        processor = DiSaProcessor.from_pretrained(preset)
    image = demo_image(args.seed)

    inputs = processor(images=image, text=args.labels, return_tensors="pt")
    fast = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    fast = compile_for_inference(fast, args.torch_compile, args.torch_compile_backend, args.torch_compile_mode)
    with torch.no_grad():
        outputs = model(**inputs)
        pixel_values = inputs["pixel_values"].to(dtype)
        fast_outputs = outputs if fast is model else fast(**{**inputs, "pixel_values": pixel_values})
    segmentation = processor.post_process_semantic_segmentation(fast_outputs, target_sizes=[image.size[::-1]])[0]

    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    reloaded = AutoModel.from_pretrained(output_dir, dtype=torch.float32)
    reprocessor = AutoProcessor.from_pretrained(output_dir)
    with torch.no_grad():
        again = reloaded(**reprocessor(images=image, text=args.labels, return_tensors="pt"))
    saved_state, loaded_state = model.state_dict(), reloaded.state_dict()
    same = all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state) and torch.allclose(
        again.logits, outputs.logits, rtol=0, atol=1e-5
    )

    palette = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48)], np.uint8)
    colours = palette[segmentation.numpy() % len(palette)]
    overlay = (0.5 * np.asarray(image) + 0.5 * colours).astype(np.uint8)
    Image.fromarray(overlay).save(output_dir / "demo_overlay.png")

    counts = torch.bincount(segmentation.flatten(), minlength=len(args.labels)).tolist()
    summary = {
        "labels": args.labels,
        "logits_shape": list(outputs.logits.shape),
        "pixels_per_label": dict(zip(args.labels, counts)),
        "reloaded_identical": same,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_compile": compile_settings(args.torch_compile, args.torch_compile_backend, args.torch_compile_mode),
        "max_abs_logit_difference_to_float32_eager": float((fast_outputs.logits.float() - outputs.logits).abs().max()),
        "output_dir": str(output_dir),
    }
    print(json.dumps(summary, indent=2))
    if not same:
        raise SystemExit("the reloaded model disagrees with the saved one")
    return summary


if __name__ == "__main__":
    main()
