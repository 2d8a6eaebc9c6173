#!/usr/bin/env python
"""Convert the official raw releases of the open-vocabulary segmentation evaluation datasets into `datasets` parquet,
one config per evaluation dataset.

    python training/prepare_datasets.py ade150 --raw_root /data/ADEChallengeData2016 --output /data/disa-benchmarks
    python training/prepare_datasets.py ade847 --raw_root /data/ADE20K_2021_17_01 --output ...     (OpenCV)
    python training/prepare_datasets.py pc59   --raw_root /data/VOCdevkit/VOC2010  --output ...  (trainval_merged.json)
    python training/prepare_datasets.py pc459  --raw_root /data/VOCdevkit/VOC2010  --output ... (trainval/*.mat, scipy)
    python training/prepare_datasets.py voc20  --raw_root /data/VOCdevkit/VOC2012  --output ...   (also voc20b)
    python training/prepare_datasets.py coco_stuff171 --raw_root /data/coco-stuff --output ...

Output layout (a Hub dataset repo, one config per evaluation dataset)::

    <output>/README.md                                    YAML `configs:` + label conventions
    <output>/data/<config>/<split>-00000-of-0000N.parquet columns: image (Image), label (Image), image_id (string)
    <output>/data/<config>/metadata.json                  label conventions (dtype, ignore value, class names, rules)

Every config is written into a temporary folder next to its destination and renamed into place (atomic per
config). ``--push_to_hub REPO`` uploads the config with ``DatasetDict.push_to_hub(REPO, config_name=...)``.
Label conventions follow CAT-Seg's detectron2 preparation scripts (see modeling_disa/evaluation/definitions/*.json,
"raw").
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_disa.evaluation.dataset_definitions import DatasetDefinition, load_evaluation_dataset  # noqa: E402

Example = dict[str, object]


# ----------------------------------------------------------------------------------------------- helpers
def _file_image(path: Path) -> dict[str, object]:
    """Original encoded bytes (no re-encoding of JPEGs)."""
    return {"bytes": Path(path).read_bytes(), "path": None}


def _lut(mapping: dict[int, int], size: int, default: int, dtype) -> np.ndarray:
    lut = np.full(size, default, dtype=dtype)
    for src, dst in mapping.items():
        if 0 <= src < size:
            lut[src] = dst
    return lut


def _read_palette_indices(path: Path) -> np.ndarray:
    img = Image.open(path)
    if img.mode not in ("P", "L", "I;16", "I"):
        raise ValueError(f"{path}: expected an indexed/greyscale label PNG, got mode {img.mode}.")
    return np.array(img)


def _label_image(label: np.ndarray, bench: DatasetDefinition) -> Image.Image:
    arr = label.astype(bench.numpy_label_dtype, copy=False)
    return Image.fromarray(arr)  # uint8 -> "L", uint16 -> "I;16" (PNG keeps 16 bits)


# ----------------------------------------------------------------------------------------------- COCO RLE
def rle_counts_from_string(s: str) -> list[int]:
    """Decode COCO's compressed RLE string (5-bit groups with continuation bit, deltas after the 2nd count)."""
    counts: list[int] = []
    pos = 0
    data = s.encode("ascii") if isinstance(s, str) else s
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            c = data[pos] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and (c & 0x10):
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_decode(segmentation: dict[str, object]) -> np.ndarray:
    """COCO RLE (compressed string or list counts) -> (H, W) uint8 mask. Runs are column-major, starting with 0s."""
    h, w = segmentation["size"]
    counts = segmentation["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_counts_from_string(counts)
    flat = np.zeros(h * w, dtype=np.uint8)
    pos, val = 0, 0
    for n in counts:
        if val:
            flat[pos : pos + n] = 1
        pos += n
        val ^= 1
    if pos != h * w:
        raise ValueError(f"RLE covers {pos} pixels, expected {h * w}.")
    return flat.reshape(w, h).T


# ----------------------------------------------------------------------------------------------- converters
def iter_ade150(root: Path, bench: DatasetDefinition) -> Iterator[tuple[str, Example]]:
    img_dir, ann_dir = root / "images" / "validation", root / "annotations" / "validation"
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"{ann_dir} not found: --raw_root must be the ADEChallengeData2016 folder.")
    for ann in sorted(ann_dir.glob("*.png")):
        raw = np.array(Image.open(ann))
        if raw.dtype != np.uint8:
            raise ValueError(f"{ann}: expected 8-bit annotations, got {raw.dtype}.")
        label = raw.astype(np.int16) - 1
        label[label < 0] = bench.ignore_index  # 0 (other) -> 255, k -> k-1
        yield (
            "validation",
            {
                "image": _file_image(img_dir / (ann.stem + ".jpg")),
                "label": _label_image(label, bench),
                "image_id": ann.stem,
            },
        )


def _short_side_size(h: int, w: int, max_size: int = 512) -> tuple[int, int] | None:
    """ADE20K-full preparation rule (detectron2 / MaskFormer / CAT-Seg ``prepare_ade20k_full_sem_seg.py``): a short
    side above ``max_size`` becomes ``max_size`` and the long side ``round(long / short * max_size)``; ``None`` when
    the short side is at most ``max_size`` (no resize)."""
    if w >= h > max_size:
        return max_size, round(w / float(h) * max_size)
    if h >= w > max_size:
        return round(h / float(w) * max_size), max_size
    return None


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "ade847 resizes images and labels with OpenCV, as the official preparation script does: "
            "pip install opencv-python-headless (included in the package's 'eval' extra)."
        ) from e
    return cv2


def _resize_label_nearest(lab: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W)`` integer class-id map -> ``(height, width)`` int32 with ``cv2.INTER_NEAREST`` on the int32 map, as
    the official script calls it. OpenCV takes source column ``min(floor(x * (1 / (width / W))), W - 1)`` (rows
    likewise) in double precision; a float32 index, as in ``torch.nn.functional.interpolate``, picks the
    neighbouring row or column on some sizes."""
    if lab.size and (int(lab.min()) < np.iinfo(np.int32).min or int(lab.max()) > np.iinfo(np.int32).max):
        raise ValueError("class ids do not fit the int32 map the official script resizes.")
    cv2 = _cv2()
    return cv2.resize(np.ascontiguousarray(lab, dtype=np.int32), (width, height), interpolation=cv2.INTER_NEAREST)


def _resize_short_side(img: np.ndarray, lab: np.ndarray, max_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Resize an ADE20K-full image and its class-id map by :func:`_short_side_size` with OpenCV, called as the
    official script calls it, so the output is identical, not merely close: the image with ``cv2.INTER_LINEAR``
    (OpenCV's fixed-point bilinear on uint8; a float bilinear differs from it by 1 on some values) and the map
    with :func:`_resize_label_nearest`.

    Args:
        img: ``(H, W, 3)`` uint8 image.
        lab: ``(H, W)`` integer class-id map.
    Returns:
        The resized ``(H', W', 3)`` uint8 image and ``(H', W')`` int32 map, or both unchanged when the short side
        is at most ``max_size``.
    """
    h, w = img.shape[:2]
    if lab.shape != (h, w):
        raise ValueError(f"label map shape {lab.shape} differs from the image's {(h, w)}.")
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}.")
    size = _short_side_size(h, w, max_size)
    if size is None:
        return img, lab
    nh, nw = size
    cv2 = _cv2()
    img = cv2.resize(np.ascontiguousarray(img), (nw, nh), interpolation=cv2.INTER_LINEAR)
    return img, _resize_label_nearest(lab, nh, nw)


def iter_ade847(root: Path, bench: DatasetDefinition) -> Iterator[tuple[str, Example]]:
    # The release's index_ade20k.pkl is a pickle; the validation images are found by walking the folder instead,
    # so no pickle is ever loaded.
    val_root = root / "images" / "ADE" / "validation"
    if not val_root.is_dir():
        raise FileNotFoundError(f"{val_root} not found: --raw_root must be the ADE20K_2021_17_01 folder.")
    source_ids = bench.raw["source_ids"]
    lut = _lut({sid: i for i, sid in enumerate(source_ids)}, 1 << 16, bench.ignore_index, np.uint16)
    images = sorted(val_root.rglob("ADE_val_*.jpg"))
    if not images:
        raise FileNotFoundError(f"no ADE_val_*.jpg images under {val_root}.")
    for img_path in images:
        seg = np.array(Image.open(img_path.with_name(img_path.stem + "_seg.png")).convert("RGB"))
        class_mask = (seg[..., 0].astype(np.int32) // 10) * 256 + seg[..., 1].astype(np.int32)
        img = np.array(Image.open(img_path).convert("RGB"))
        img, class_mask = _resize_short_side(img, class_mask, 512)
        label = lut[class_mask]
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG")  # PIL default quality, as the detectron2 script
        yield (
            "validation",
            {
                "image": {"bytes": buf.getvalue(), "path": None},
                "label": _label_image(label, bench),
                "image_id": img_path.stem,
            },
        )


def _voc2010(root: Path) -> Path:
    for c in (root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"):
        if (c / "JPEGImages").is_dir():
            return c
    raise FileNotFoundError(f"No VOC2010 folder with JPEGImages/ under {root}.")


def iter_pc59(root: Path, bench: DatasetDefinition, annotations: Path | None = None) -> Iterator[tuple[str, Example]]:
    voc = _voc2010(root)
    ann_file = annotations or voc / "trainval_merged.json"
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file} not found (the Pascal Context 59 'trainval_merged.json').")
    data = json.loads(ann_file.read_text())
    images = {d["image_id"]: d for d in data["images"] if d.get("phase") == "val"}
    annos: dict[int, list] = {}
    for a in data["annos_segmentation"]:
        if a["image_id"] in images:
            annos.setdefault(a["image_id"], []).append(a)
    lut = _lut({sid: i for i, sid in enumerate(bench.raw["source_ids"])}, 1 << 16, bench.ignore_index, np.uint8)
    for image_id in sorted(images, key=lambda i: images[i]["file_name"]):
        info = images[image_id]
        full = np.zeros((info["height"], info["width"]), dtype=np.int64)  # 0 = background
        for a in annos.get(image_id, []):  # painted in file order, later annotations win
            full[rle_decode(a["segmentation"]) > 0] = a["category_id"]
        yield (
            "validation",
            {
                "image": _file_image(voc / "JPEGImages" / info["file_name"]),
                "label": _label_image(lut[full], bench),
                "image_id": Path(info["file_name"]).stem,
            },
        )


def iter_pc459(root: Path, bench: DatasetDefinition, val_list: Path | None = None) -> Iterator[tuple[str, Example]]:
    try:
        import scipy.io
    except ImportError as e:  # pragma: no cover
        raise ImportError("pc459 needs scipy to read the Pascal Context .mat files: pip install scipy") from e
    voc = _voc2010(root)
    val_list = val_list or voc / "pascalcontext_val.txt"
    if not val_list.is_file():
        raise FileNotFoundError(f"{val_list} not found (CAT-Seg's datasets/pascalcontext_val.txt, 5104 ids).")
    for line in val_list.read_text().split():
        mat = voc / "trainval" / f"{line}.mat"
        if not mat.is_file():
            continue  # CAT-Seg skips ids without labels
        label_map = scipy.io.loadmat(mat)["LabelMap"].astype(np.int64)
        if label_map.min() < 1 or label_map.max() > bench.num_classes:
            raise ValueError(f"{mat}: LabelMap values outside [1, {bench.num_classes}].")
        yield (
            "validation",
            {
                "image": _file_image(voc / "JPEGImages" / f"{line}.jpg"),
                "label": _label_image(label_map - 1, bench),
                "image_id": line,
            },
        )


def _iter_voc(root: Path, bench: DatasetDefinition, background: int | None) -> Iterator[tuple[str, Example]]:
    candidates = (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012")
    voc = next((c for c in candidates if (c / "JPEGImages").is_dir()), None)
    if voc is None:
        raise FileNotFoundError(f"No VOC2012 folder with JPEGImages/ under {root}.")
    ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    mapping = {k: k - 1 for k in range(1, 21)}
    mapping[0] = bench.ignore_index if background is None else background
    lut = _lut(mapping, 256, bench.ignore_index, np.uint8)
    for i in ids:
        ann = voc / "SegmentationClassAug" / f"{i}.png"
        if not ann.is_file():
            ann = voc / "SegmentationClass" / f"{i}.png"
        label = lut[_read_palette_indices(ann)]
        if np.all(label == bench.ignore_index):
            continue  # CAT-Seg drops maps without a scored pixel
        image = _file_image(voc / "JPEGImages" / f"{i}.jpg")
        yield "validation", {"image": image, "label": _label_image(label, bench), "image_id": i}


def iter_voc20(root, bench):
    return _iter_voc(root, bench, None)


def iter_voc20b(root, bench):
    return _iter_voc(root, bench, 20)


def iter_coco_stuff171(
    root: Path, bench: DatasetDefinition, splits=("train", "validation")
) -> Iterator[tuple[str, Example]]:
    lut = _lut({sid: i for i, sid in enumerate(bench.raw["source_ids"])}, 256, bench.ignore_index, np.uint8)
    for split, sub in (("train", "train2017"), ("validation", "val2017")):
        if split not in splits:
            continue
        ann_dir = root / "annotations" / sub
        if not ann_dir.is_dir():
            raise FileNotFoundError(f"{ann_dir} not found: expected coco-stuff/{{images,annotations}}/{sub}.")
        for ann in sorted(ann_dir.glob("*.png")):
            yield (
                split,
                {
                    "image": _file_image(root / "images" / sub / (ann.stem + ".jpg")),
                    "label": _label_image(lut[np.array(Image.open(ann))], bench),
                    "image_id": ann.stem,
                },
            )


CONVERTERS: dict[str, Callable] = {
    "ade150": iter_ade150,
    "ade847": iter_ade847,
    "pc59": iter_pc59,
    "pc459": iter_pc459,
    "voc20": iter_voc20,
    "voc20b": iter_voc20b,
    "coco_stuff171": iter_coco_stuff171,
}


# ----------------------------------------------------------------------------------------------- writing
def features_for(bench: DatasetDefinition):
    import datasets

    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.Image(), "image_id": datasets.Value("string")}
    )


def _write_readme(output: Path) -> None:
    configs = sorted(p.name for p in (output / "data").iterdir() if p.is_dir() and not p.name.startswith("."))
    lines = ["---", "configs:"]
    body = [
        "",
        "# DiSa open-vocabulary segmentation evaluation datasets",
        "",
        "Converted with `training/prepare_datasets.py` from the official raw releases. Columns: `image`, "
        "`label` (PNG; 16-bit for 16-bit datasets), `image_id`.",
        "",
        "| config | classes | label dtype | ignore | splits |",
        "|---|---|---|---|---|",
    ]
    for c in configs:
        meta = json.loads((output / "data" / c / "metadata.json").read_text())
        lines += [f"- config_name: {c}", "  data_files:"]
        for split in meta["splits"]:
            lines += [f"  - split: {split}", f"    path: data/{c}/{split}-*.parquet"]
        body.append(
            f"| {c} | {meta['num_classes']} | {meta['label_dtype']} | {meta['ignore_index']} | "
            f"{', '.join(f'{s} ({n})' for s, n in meta['splits'].items())} |"
        )
    (output / "README.md").write_text("\n".join(lines + ["---"] + body) + "\n")


def convert(
    name: str,
    raw_root: Path,
    output: Path,
    max_images: int | None = None,
    shard_size: int = 1000,
    push_to_hub: str | None = None,
    **kwargs,
) -> Path:
    import datasets

    bench = load_evaluation_dataset(name)
    raw_root, output = Path(raw_root), Path(output)
    (output / "data").mkdir(parents=True, exist_ok=True)
    final = output / "data" / bench.hub_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{bench.hub_config}-", dir=output / "data"))
    try:
        by_split: dict[str, list[Example]] = {}
        counts: dict[str, int] = {}
        written: dict[str, list[Path]] = {}

        def flush(split: str, final_flush: bool = False) -> None:
            rows = by_split.get(split) or []
            if not rows:
                return
            ds = datasets.Dataset.from_list(rows, features=features_for(bench))
            part = len(written.setdefault(split, []))
            path = tmp / f"{split}-{part:05d}.parquet"
            ds.to_parquet(str(path))
            written[split].append(path)
            by_split[split] = []

        for split, ex in CONVERTERS[name](raw_root, bench, **kwargs):
            if max_images is not None and counts.get(split, 0) >= max_images:
                continue
            by_split.setdefault(split, []).append(ex)
            counts[split] = counts.get(split, 0) + 1
            if len(by_split[split]) >= shard_size:
                flush(split)
        for split in list(by_split):
            flush(split)
        if not counts:
            raise RuntimeError(f"No examples found for {name} under {raw_root}.")
        for split, paths in written.items():  # rename to the Hub's <split>-XXXXX-of-YYYYY convention
            for i, p in enumerate(paths):
                p.rename(tmp / f"{split}-{i:05d}-of-{len(paths):05d}.parquet")
        meta = bench.to_metadata()
        meta.update(
            {
                "splits": counts,
                "columns": {"image": "Image", "label": f"Image ({bench.label_dtype} PNG)", "image_id": "string"},
                "label_rule": bench.raw.get("label_rule"),
                "raw_release": bench.raw.get("release"),
            }
        )
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_readme(output)
    if push_to_hub:
        dd = load_prepared(output, name)
        dd.push_to_hub(push_to_hub, config_name=bench.hub_config)
    return final


def load_prepared(output: Path, name: str):
    """Load a prepared config back as a ``DatasetDict`` (offline, from the local folder)."""
    import datasets

    bench = load_evaluation_dataset(name)
    folder = Path(output) / "data" / bench.hub_config
    meta = json.loads((folder / "metadata.json").read_text())
    files = {s: sorted(str(p) for p in folder.glob(f"{s}-*.parquet")) for s in meta["splits"]}
    dd = datasets.load_dataset("parquet", data_files=files)
    return datasets.DatasetDict({s: d.cast(features_for(bench)) for s, d in dd.items()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(CONVERTERS) + ["all"])
    parser.add_argument(
        "--raw_root",
        type=Path,
        required=True,
        help="raw release folder (for 'all': a folder holding ADEChallengeData2016, "
        "ADE20K_2021_17_01, "
        "VOCdevkit/VOC2010, VOCdevkit/VOC2012, coco-stuff)",
    )
    parser.add_argument("--output", type=Path, required=True, help="dataset repo folder to write")
    parser.add_argument("--max_images", type=int, default=None, help="per split, for quick checks")
    parser.add_argument("--shard_size", type=int, default=1000, help="images per parquet file")
    parser.add_argument(
        "--push_to_hub", default=None, metavar="REPO_ID", help="also upload the config(s) to this repo"
    )
    parser.add_argument("--pc59_annotations", type=Path, default=None, help="trainval_merged.json (default VOC2010/)")
    parser.add_argument("--pc459_val_list", type=Path, default=None, help="pascalcontext_val.txt (default VOC2010/)")
    args = parser.parse_args(argv)
    names = sorted(CONVERTERS) if args.dataset == "all" else [args.dataset]
    sub = {
        "ade150": "ADEChallengeData2016",
        "ade847": "ADE20K_2021_17_01",
        "pc59": "VOCdevkit/VOC2010",
        "pc459": "VOCdevkit/VOC2010",
        "voc20": "VOCdevkit/VOC2012",
        "voc20b": "VOCdevkit/VOC2012",
        "coco_stuff171": "coco-stuff",
    }
    for name in names:
        root = args.raw_root / sub[name] if args.dataset == "all" else args.raw_root
        extra = {}
        if name == "pc59" and args.pc59_annotations:
            extra["annotations"] = args.pc59_annotations
        if name == "pc459" and args.pc459_val_list:
            extra["val_list"] = args.pc459_val_list
        path = convert(name, root, args.output, args.max_images, args.shard_size, args.push_to_hub, **extra)
        print(f"{name}: wrote {path}")


if __name__ == "__main__":
    main()
