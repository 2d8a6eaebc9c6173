"""Each converter on a tiny synthetic copy of its raw release layout, checked against hand-derived labels."""

import json

import numpy as np
import pytest
from PIL import Image

import prepare_datasets as prep  # noqa: E402
from modeling_disa.evaluation.dataset_definitions import load_evaluation_dataset  # noqa: E402


def jpg(path, h=6, w=8, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def png(path, arr, palette=False):
    """Write a PNG; ``palette=True`` writes an indexed ("P") image like VOC's SegmentationClass."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        im = Image.new("P", (arr.shape[1], arr.shape[0]))
        im.putdata(arr.flatten().tolist())
        im.putpalette([(v * 37) % 256 for v in range(768)])
    else:
        im = Image.fromarray(arr)
    im.save(path)


def labels_of(out, name, split="validation"):
    dd = prep.load_prepared(out, name)
    return {r["image_id"]: np.array(r["label"]) for r in dd[split]}, dd


def test_ade150(tmp_path):
    raw = tmp_path / "ADEChallengeData2016"
    ann = np.array([[0, 1, 150], [2, 0, 7]], dtype=np.uint8)
    png(raw / "annotations/validation/ADE_val_00000001.png", ann)
    jpg(raw / "images/validation/ADE_val_00000001.jpg", 2, 3)
    prep.convert("ade150", raw, tmp_path / "out")
    labels, dd = labels_of(tmp_path / "out", "ade150")
    np.testing.assert_array_equal(labels["ADE_val_00000001"], [[255, 0, 149], [1, 255, 6]])
    # image bytes are the original JPEG, unchanged
    assert dd["validation"].features["image"].__class__.__name__ == "Image"
    meta = json.loads((tmp_path / "out/data/ade150/metadata.json").read_text())
    assert meta["ignore_index"] == 255 and meta["label_dtype"] == "uint8" and meta["splits"] == {"validation": 1}
    assert "config_name: ade150" in (tmp_path / "out/README.md").read_text()


def test_ade847_full_index_mapping_16bit_and_resize(tmp_path):
    raw = tmp_path / "ADE20K_2021_17_01"
    src = load_evaluation_dataset("ade847").raw["source_ids"]
    folder = "ADE20K_2021_17_01/images/ADE/validation/abbey"
    ids = np.array([[src[0], src[846], 0], [src[5], 3, src[846]]])  # 3 is not one of the 847 -> ignore
    seg = np.zeros((2, 3, 3), dtype=np.uint8)
    seg[..., 0] = (ids // 256) * 10 + 3  # R encodes id // 256 (times 10, +noise < 10)
    seg[..., 1] = ids % 256
    d = tmp_path / folder
    png(d / "ADE_val_00000005_seg.png", seg)
    jpg(d / "ADE_val_00000005.jpg", 2, 3)
    jpg(tmp_path / "ADE20K_2021_17_01/images/ADE/training/x/ADE_train_00000001.jpg", 2, 3)
    prep.convert("ade847", raw, tmp_path / "out")
    labels, dd = labels_of(tmp_path / "out", "ade847")
    lab = labels["ADE_val_00000005"]
    assert lab.dtype == np.uint16 and len(dd["validation"]) == 1  # training image skipped
    np.testing.assert_array_equal(lab, [[0, 846, 65535], [5, 65535, 846]])


def nearest_source_index(src, dst):
    """OpenCV's INTER_NEAREST rule, written out: source index min(floor(x * (1 / (dst / src))), src - 1), in double."""
    return np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.int64), src - 1)


def opencv_linear_u8_downscale(img, nh, nw):
    """OpenCV's INTER_LINEAR on uint8 for a downscale, written out: float32 source positions, 11-bit fixed-point
    weights, its rounding of the vertical pass; an exact 2x downscale in both axes is a 2x2 box average instead."""
    h, w = img.shape[:2]
    im = img.astype(np.int64)
    if (h, w) == (2 * nh, 2 * nw):
        return ((im[0::2, 0::2] + im[1::2, 0::2] + im[0::2, 1::2] + im[1::2, 1::2] + 2) >> 2).astype(np.uint8)

    def taps(src, dst):
        pos = ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
        first = np.floor(pos).astype(np.int64)
        frac = pos - first.astype(np.float32)
        return first, np.rint((np.float32(1) - frac) * 2048).astype(np.int64), np.rint(frac * 2048).astype(np.int64)

    x, a0, a1 = taps(w, nw)
    y, b0, b1 = taps(h, nh)
    rows = im[:, x] * a0[None, :, None] + im[:, x + 1] * a1[None, :, None]
    out = ((b0[:, None, None] * (rows[y] >> 4)) >> 16) + ((b1[:, None, None] * (rows[y + 1] >> 4)) >> 16)
    return ((out + 2) >> 2).astype(np.uint8)


def ade_full_size(h, w):
    """The official short-side rule, written out (short side 512, long side rounded)."""
    if min(h, w) <= 512:
        return h, w
    return (512, round(w / h * 512)) if w >= h else (round(h / w * 512), 512)


def test_ade847_resize_follows_the_official_opencv_calls():
    rng = np.random.default_rng(0)
    # (530, 700) -> (512, 676): a float32 source index takes the neighbouring column at 169 and 338
    sizes = [(530, 700), (1024, 1536), (700, 530), (2000, 3000), (513, 514), (600, 1000)]
    for h, w in sizes:
        nh, nw = ade_full_size(h, w)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        lab = np.arange(h * w, dtype=np.int32).reshape(h, w)  # every pixel its own id: shows which one was taken
        i2, l2 = prep._resize_short_side(img, lab, 512)
        rows, cols = nearest_source_index(h, nh), nearest_source_index(w, nw)
        np.testing.assert_array_equal(l2, lab[rows[:, None], cols[None, :]], err_msg=f"{h}x{w}")
        np.testing.assert_array_equal(i2, opencv_linear_u8_downscale(img, nh, nw), err_msg=f"{h}x{w}")
    float32_cols = np.floor(np.arange(676, dtype=np.float32) * np.float32(700 / 676)).astype(np.int64)
    assert np.flatnonzero(float32_cols != nearest_source_index(700, 676)).tolist() == [169, 338]
    i3, l3 = prep._resize_short_side(np.zeros((500, 900, 3), np.uint8), np.zeros((500, 900), np.int32), 512)
    assert i3.shape == (500, 900, 3) and l3.shape == (500, 900)  # short side <= 512: untouched


def test_ade847_label_index_rule_over_many_image_sizes():
    """Short sides 513-3000: the nearest rule is separable, so one row and one column of each real size suffice."""
    rng = np.random.default_rng(1)
    differs_in_float32 = 0
    for _ in range(400):
        short = int(rng.integers(513, 3001))
        long = int(rng.integers(short, 2 * short + 1))
        h, w = (short, long) if rng.random() < 0.5 else (long, short)
        nh, nw = prep._short_side_size(h, w, 512)
        assert (nh, nw) == ade_full_size(h, w)
        for src, dst in ((h, nh), (w, nw)):
            line = np.arange(src, dtype=np.int32)[None]
            np.testing.assert_array_equal(prep._resize_label_nearest(line, 1, dst)[0], nearest_source_index(src, dst))
            f32 = np.floor(np.arange(dst, dtype=np.float32) * np.float32(src / dst)).astype(np.int64)
            differs_in_float32 += bool((np.minimum(f32, src - 1) != nearest_source_index(src, dst)).any())
    assert differs_in_float32 > 0  # the sweep holds sizes where a float32 index would pick other rows or columns


def test_ade847_resized_end_to_end(tmp_path):
    """A 530 x 700 raw image and segmentation PNG through the converter: the stored label is the official nearest
    resize of the class-id map mapped to the 847 ids, and the stored JPEG is PIL's encoding of the official bilinear
    resize."""
    import io

    raw = tmp_path / "ADE20K_2021_17_01"
    src = load_evaluation_dataset("ade847").raw["source_ids"]
    rng = np.random.default_rng(2)
    h, w = 530, 700
    ids = np.asarray(src)[rng.integers(0, 847, (h, w))]
    ids[rng.random((h, w)) < 0.1] = 3  # 3 is not one of the 847 -> ignore
    seg = np.zeros((h, w, 3), dtype=np.uint8)
    seg[..., 0] = (ids // 256) * 10 + 3
    seg[..., 1] = ids % 256
    d = raw / "images/ADE/validation/abbey"
    png(d / "ADE_val_00000007_seg.png", seg)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(d / "ADE_val_00000007.png")  # lossless stand-in, read back as the converter reads it
    (d / "ADE_val_00000007.png").rename(d / "ADE_val_00000007.jpg")
    prep.convert("ade847", raw, tmp_path / "out")
    labels, dd = labels_of(tmp_path / "out", "ade847")
    nh, nw = ade_full_size(h, w)
    rows, cols = nearest_source_index(h, nh), nearest_source_index(w, nw)
    to_847 = np.full(ids.max() + 1, 65535, dtype=np.int64)
    to_847[np.asarray(src)] = np.arange(847)
    expected = to_847[ids[rows[:, None], cols[None, :]]]
    np.testing.assert_array_equal(labels["ADE_val_00000007"], expected)
    buf = io.BytesIO()
    Image.fromarray(opencv_linear_u8_downscale(img, nh, nw)).save(buf, format="JPEG")
    stored = dd["validation"].cast_column("image", type(dd["validation"].features["image"])(decode=False))
    assert stored[0]["image"]["bytes"] == buf.getvalue()


def coco_rle_encode(mask):
    """Independent encoder of COCO compressed RLE (column-major runs, deltas, 5-bit groups + continuation)."""
    flat = mask.T.flatten()
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            run = 0
            cur = v
        run += 1
    counts.append(run)
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_rle_decoder():
    # hand example: column-major [0, 1, 1, 1] -> counts [1, 3] -> "13"
    np.testing.assert_array_equal(prep.rle_decode({"size": [2, 2], "counts": "13"}), [[0, 1], [1, 1]])
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = (rng.random((37, 23)) < 0.3).astype(np.uint8)
        np.testing.assert_array_equal(prep.rle_decode({"size": list(m.shape), "counts": coco_rle_encode(m)}), m)


def test_pc59_from_trainval_merged(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2010"
    jpg(voc / "JPEGImages/2008_000002.jpg", 3, 4)
    jpg(voc / "JPEGImages/2008_000003.jpg", 3, 4)
    a = np.zeros((3, 4), np.uint8)
    a[0, :2] = 1  # category 2 (aeroplane -> 0)
    b = np.zeros((3, 4), np.uint8)
    b[1:, :] = 1  # category 458 (wood -> 58), painted last
    c = np.zeros((3, 4), np.uint8)
    c[2, 3] = 1  # category 1 (accordion, not in PC-59) -> ignore
    data = {
        "images": [
            {"image_id": 2, "file_name": "2008_000002.jpg", "height": 3, "width": 4, "phase": "val"},
            {"image_id": 3, "file_name": "2008_000003.jpg", "height": 3, "width": 4, "phase": "train"},
        ],
        "annos_segmentation": [
            {"image_id": 2, "category_id": 2, "segmentation": {"size": [3, 4], "counts": coco_rle_encode(a)}},
            {"image_id": 2, "category_id": 458, "segmentation": {"size": [3, 4], "counts": coco_rle_encode(b)}},
            {"image_id": 2, "category_id": 1, "segmentation": {"size": [3, 4], "counts": coco_rle_encode(c)}},
            {"image_id": 3, "category_id": 2, "segmentation": {"size": [3, 4], "counts": coco_rle_encode(a)}},
        ],
    }
    (voc / "trainval_merged.json").write_text(json.dumps(data))
    prep.convert("pc59", tmp_path, tmp_path / "out")
    labels, dd = labels_of(tmp_path / "out", "pc59")
    assert list(labels) == ["2008_000002"]  # train-phase image excluded
    np.testing.assert_array_equal(labels["2008_000002"], [[0, 0, 255, 255], [58, 58, 58, 58], [58, 58, 58, 255]])


def test_pc459_from_mat(tmp_path):
    import scipy.io as scipy_io

    voc = tmp_path / "VOC2010"
    jpg(voc / "JPEGImages/2008_000002.jpg", 2, 3)
    (voc / "trainval").mkdir(parents=True)
    scipy_io.savemat(voc / "trainval/2008_000002.mat", {"LabelMap": np.array([[1, 459, 2], [431, 5, 5]], np.uint16)})
    (voc / "pascalcontext_val.txt").write_text("2008_000002\n2008_000099\n")  # second id has no labels: skipped
    prep.convert("pc459", voc, tmp_path / "out")
    labels, _ = labels_of(tmp_path / "out", "pc459")
    lab = labels["2008_000002"]
    assert lab.dtype == np.uint16
    np.testing.assert_array_equal(lab, [[0, 458, 1], [430, 4, 4]])
    assert load_evaluation_dataset("pc459").class_names[430] == "unknown"


@pytest.mark.parametrize("name,bg", [("voc20", 255), ("voc20b", 20)])
def test_voc(tmp_path, name, bg):
    voc = tmp_path / "VOC2012"
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n2007_000042\n")
    png(voc / "SegmentationClass/2007_000033.png", np.array([[0, 1, 20], [255, 15, 0]], np.uint8), palette=True)
    png(voc / "SegmentationClass/2007_000042.png", np.array([[255, 255], [255, 255]], np.uint8), palette=True)
    for i in ("2007_000033", "2007_000042"):
        jpg(voc / f"JPEGImages/{i}.jpg", 2, 3)
    prep.convert(name, voc, tmp_path / "out")
    labels, _ = labels_of(tmp_path / "out", name)
    assert list(labels) == ["2007_000033"]  # all-void map dropped
    np.testing.assert_array_equal(labels["2007_000033"], [[bg, 0, 19], [255, 14, bg]])


def test_coco_stuff171_and_atomic_rewrite(tmp_path):
    root = tmp_path / "coco-stuff"
    png(root / "annotations/val2017/000000000139.png", np.array([[0, 11, 91], [181, 255, 12]], np.uint8))
    png(root / "annotations/train2017/000000000009.png", np.array([[1, 2]], np.uint8))
    jpg(root / "images/val2017/000000000139.jpg", 2, 3)
    jpg(root / "images/train2017/000000000009.jpg", 1, 2)
    out = tmp_path / "out"
    prep.convert("coco_stuff171", root, out)
    labels, dd = labels_of(out, "coco_stuff171")
    # 11 is an unused COCO id -> 255; 12 (stop sign) -> 11; 91 (banner) -> 80; 181 (wood) -> 170
    np.testing.assert_array_equal(labels["000000000139"], [[0, 255, 80], [170, 255, 11]])
    assert set(dd) == {"train", "validation"}
    # a failing conversion leaves the previous config intact and no temp folders behind
    (root / "annotations/val2017/000000000139.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="000000000139.png"):  # PIL's error names the unreadable file
        prep.convert("coco_stuff171", root, out)
    labels2, _ = labels_of(out, "coco_stuff171")
    np.testing.assert_array_equal(labels2["000000000139"], labels["000000000139"])
    assert [p.name for p in (out / "data").iterdir()] == ["coco_stuff171"]
    # the folder loads as a Hub-style repo with one config per evaluation dataset
    import datasets

    ds = datasets.load_dataset(str(out), "coco_stuff171", split="validation")
    assert len(ds) == 1


def test_missing_raw_layout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        prep.convert("ade150", tmp_path, tmp_path / "out")
