"""Write the demo Space's example images: the first toy-world test scenes as PNGs in `space/examples/`, with
`examples.json` (the file names and the world's class names, which the app offers as the examples' labels).

    python training/write_space_examples.py [--output_dir space/examples]

Deterministic (the default world's seed): rerunning rewrites identical files. The app reads these files and does not
import the toy world, which is training code.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from toy_world.scenes import CLASS_NAMES, WorldSettings, generate_split

REPO = Path(__file__).resolve().parents[1]
OUTPUT_DIR = REPO / "space" / "examples"
NUM_EXAMPLES = 4
EXAMPLE_SIZE = 256  # toy-world scenes are 64 px; shown enlarged (nearest neighbour) like the job's sample picture
MANIFEST = "examples.json"


def example_scenes(num: int = NUM_EXAMPLES) -> list[np.ndarray]:
    """The first `num` test scenes of the default world, uint8 (64, 64, 3)."""
    return generate_split(WorldSettings(), "test", num=num)["image"]


def write_space_examples(output_dir: str | os.PathLike = OUTPUT_DIR, num: int = NUM_EXAMPLES) -> list[Path]:
    """Write `toy_world_test_{i}.png` (i < num, `EXAMPLE_SIZE` px) and `examples.json` atomically; -> the PNG paths."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, scene in enumerate(example_scenes(num)):
        path = folder / f"toy_world_test_{index}.png"
        partial = path.with_suffix(".partial.png")
        Image.fromarray(scene).resize((EXAMPLE_SIZE, EXAMPLE_SIZE), Image.NEAREST).save(partial)
        os.replace(partial, path)
        paths.append(path)
    manifest = {
        "images": [path.name for path in paths],
        "labels": list(CLASS_NAMES),
        "source": "toy-world test scenes (python training/write_space_examples.py)",
    }
    partial = folder / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(partial, folder / MANIFEST)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(OUTPUT_DIR))
    parser.add_argument("--num", type=int, default=NUM_EXAMPLES)
    args = parser.parse_args(argv)
    paths = write_space_examples(args.output_dir, args.num)
    print(f"wrote {len(paths)} examples and {MANIFEST} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
