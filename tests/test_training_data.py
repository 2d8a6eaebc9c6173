"""Tests of training/data.py: augmentation keeps image and label aligned, ignore values survive, the photometric
distortion matches CAT-Seg's SSD colour augmentation (against a direct NumPy/OpenCV implementation of its rules),
normalisation is the model's image processor, datasets loading (in memory, parquet, save_to_disk) and bad-input
errors."""

import io
import json
import os

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest, chisquare, ks_2samp
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from modeling_disa import DiSaImageProcessor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402

import data as D  # noqa: E402

# 8 well-separated colours; class k is painted with PALETTE[k]
PALETTE = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255], [128, 64, 0], [0, 0, 0]],
    dtype=np.uint8,
)


def blocky_label(h, w, block, num_classes, seed, ignore=None, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, num_classes, size=(h // block + 1, w // block + 1))
    lab = np.kron(grid, np.ones((block, block), dtype=np.int64))[:h, :w].astype(dtype)
    if ignore is not None:
        lab[: h // 5, :] = ignore  # a band of ignore pixels
    return lab


def paint(label, ignore):
    img = PALETTE[np.where(label == ignore, 7, label).astype(np.int64) % 7]
    return np.ascontiguousarray(img)


PROC = DiSaImageProcessor()


def denorm(pixel_values, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    arr = pixel_values.numpy().transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return arr * 255.0


def interior_mask(label, r=2):
    """Pixels whose (2r+1)^2 neighbourhood has one label (no bilinear blending at block borders); the r-pixel frame
    of the crop is excluded too (its colour was blended with pixels outside the crop)."""
    lab = label.astype(np.int64)
    p = np.pad(lab, r, mode="constant", constant_values=-1)
    same = np.ones_like(lab, dtype=bool)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            same &= p[dy : dy + lab.shape[0], dx : dx + lab.shape[1]] == lab
    return same


@pytest.mark.parametrize("ignore,dtype", [(255, np.uint8), (65535, np.uint16)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_train_transform_keeps_image_and_label_aligned(ignore, dtype, seed):
    h, w = 150, 230  # not square, short side resized up to 96 then cropped to 64 (random offset + flip)
    label = blocky_label(h, w, 20, 7, seed, ignore=ignore, dtype=dtype)
    image = paint(label, ignore)
    tf = D.TrainTransform(
        PROC,
        crop_size=64,
        resize_short_side=96,
        max_long_side=1333,
        photometric=False,
        hflip_prob=0.5,
        ignore_index=ignore,
    )
    for k in range(6):
        rng = np.random.default_rng([seed, k])
        pv, lab = tf(image, label, rng)
        assert pv.shape == (3, 64, 64) and pv.dtype == torch.float32
        assert lab.shape == (64, 64) and lab.dtype == torch.int64
        lab = lab.numpy()
        values = set(np.unique(lab).tolist())
        assert values <= set(range(7)) | {ignore}, values  # nearest: no interpolated label values
        rgb = denorm(pv)
        inner = interior_mask(lab)
        assert inner.mean() > 0.25
        expected = paint(lab, ignore).astype(np.float64)
        err = np.abs(rgb - expected)[inner]
        # the colour under every interior pixel is its class colour (a one-pixel shift would give errors ~255;
        # PIL's antialiased bilinear downscale blends a few levels near block corners)
        assert err.max() < 16.0, err.max()
        assert np.median(err) < 0.01
    # the ignore band survives resizing (nearest) with its exact value
    label_full = blocky_label(h, w, 12, 7, seed, ignore=ignore, dtype=dtype)
    r = D.resize_label_nearest(label_full, 96, 147)
    assert r.dtype == label_full.dtype and (r == ignore).any()


def test_flip_and_crop_really_happen():
    label = blocky_label(100, 100, 10, 7, 0)
    image = paint(label, 255)
    tf = D.TrainTransform(PROC, crop_size=50, resize_short_side=100, photometric=False, hflip_prob=0.5)
    crops = {tf(image, label, np.random.default_rng(s))[1].numpy().tobytes() for s in range(10)}
    assert len(crops) > 5  # different offsets / flips
    tf_noflip = D.TrainTransform(PROC, crop_size=50, resize_short_side=100, photometric=False, hflip_prob=0.0)
    tf_flip = D.TrainTransform(PROC, crop_size=50, resize_short_side=100, photometric=False, hflip_prob=1.0)
    # with the same rng stream, the crop offset is the same; flip=1 must mirror it exactly
    a = tf_noflip(image, label, np.random.default_rng(5))
    b = tf_flip(image, label, np.random.default_rng(5))
    assert torch.equal(a[1].flip(-1), b[1]) and torch.allclose(a[0].flip(-1), b[0])


def test_small_image_is_padded_with_ignore():
    label = blocky_label(40, 300, 8, 7, 0)
    image = paint(label, 255)
    # short side 40 -> 48, long side capped at 100 -> scale by 100/300: 13 x 100; crop 64 -> pad
    tf = D.TrainTransform(PROC, crop_size=64, resize_short_side=48, max_long_side=100, photometric=False, hflip_prob=0)
    pv, lab = tf(image, label, np.random.default_rng(0))
    assert pv.shape == (3, 64, 64) and lab.shape == (64, 64)
    assert (lab[13:, :] == 255).all() and (lab[:, :] != 255).any()
    assert torch.all(pv[:, 13:, :] == 0)


def test_short_side_arithmetic_matches_detectron2():
    assert D.short_side_size(480, 640, 384, 1333) == (384, 512)
    assert D.short_side_size(100, 2000, 384, 1333) == (67, 1333)


# ------------------------------------------------------------- resize / crop / pad / flip: library vs hand-written


def pil_nearest(label, height, width):
    """detectron2's `ResizeTransform.apply_segmentation` on a uint8 label map: PIL's NEAREST."""
    return np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))


def test_label_resize_is_pil_nearest_as_detectron2_for_every_dtype():
    """Ties (a source coordinate exactly on a pixel border) included: the float index formula used before picked the
    other pixel than PIL on about a third of the size pairs below."""
    rng = np.random.default_rng(0)
    pairs = [(56, 28, 35, 337), (124, 136, 78, 75), (106, 6, 294, 93), (1, 1, 3, 5), (7, 3, 1, 1)]
    pairs += [tuple(int(v) for v in rng.integers(1, 160, 4)) for _ in range(60)]
    for h, w, height, width in pairs:
        small = rng.integers(0, 200, size=(h, w), dtype=np.uint8)
        expected = pil_nearest(small, height, width)
        np.testing.assert_array_equal(D.resize_label_nearest(small, height, width), expected, err_msg=str((h, w)))
        # wider dtypes keep their values (ignore 65535, int64 ids beyond 32 bits) and sample the same pixels
        for dtype, offset in ((np.uint16, 65000), (np.int64, 2**40)):
            wide = small.astype(dtype) + dtype(offset)
            out = D.resize_label_nearest(wide, height, width)
            assert out.dtype == dtype
            np.testing.assert_array_equal(out - dtype(offset), expected.astype(dtype))


def test_image_resize_stays_pil_because_albumentations_resizes_with_opencv():
    """Why `resize_image` / `short_side_size` are not albumentations' `SmallestMaxSize` / `LongestMaxSize`:
    detectron2 resizes uint8 images with PIL's bilinear filter, which antialiases when it shrinks; OpenCV's does
    not. And `LongestMaxSize` sets the long side to its value (enlarging too), where `ResizeShortestEdge` only caps
    it, so the pair cannot express the short-side-with-cap rule."""
    img = np.random.default_rng(0).integers(0, 256, size=(300, 410, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(img).resize((205, 150), Image.BILINEAR))
    np.testing.assert_array_equal(D.resize_image(img, 150, 205), pil)
    opencv = A.Resize(150, 205, interpolation=cv2.INTER_LINEAR)(image=img)["image"]
    assert np.abs(opencv.astype(int) - pil).max() > 32  # a noise image shrunk by 2: antialiased or not

    def detectron2_shape(h, w, short, max_size):  # ResizeShortestEdge.get_output_shape
        scale = short / min(h, w)
        newh, neww = (short, scale * w) if h < w else (scale * h, short)
        if max(newh, neww) > max_size:
            scale = max_size / max(newh, neww)
            newh, neww = newh * scale, neww * scale
        return int(newh + 0.5), int(neww + 0.5)

    pair = A.Compose([A.SmallestMaxSize(max_size=384), A.LongestMaxSize(max_size=1333)])
    for h, w in ((480, 640), (100, 2000), (333, 517)):
        assert D.short_side_size(h, w, 384, 1333) == detectron2_shape(h, w, 384, 1333)
    assert pair(image=np.zeros((480, 640, 3), np.uint8))["image"].shape[:2] == (1000, 1333)  # not (384, 512)


def ids_label(h, w):
    """Every pixel its own value: a (nearest-)downscaled crop of it tells its offset and whether it was flipped."""
    return np.arange(h * w, dtype=np.int64).reshape(h, w)


def find_crop(resized, out_label):
    """-> (top, left, flipped) of `out_label` (unpadded) inside `resized`."""
    ch, cw = out_label.shape
    found = [
        (top, left, flip)
        for top in range(resized.shape[0] - ch + 1)
        for left in range(resized.shape[1] - cw + 1)
        for flip in (False, True)
        if np.array_equal(
            resized[top : top + ch, left : left + cw][:, ::-1] if flip else resized[top:, left:][:ch, :cw], out_label
        )
    ]
    assert len(found) == 1, found
    return found[0]


def hand_written_chain(tf, image, label, top, left, flip):
    """`TrainTransform.__call__` as it was written out before albumentations drew the crop and flip (without the
    photometric step), given the crop offset and flip decision."""
    h, w = label.shape
    nh, nw = D.short_side_size(h, w, tf.resize_short_side, tf.max_long_side)
    image = D.resize_image(image, nh, nw)
    label = D.resize_label_nearest(label, nh, nw)
    ch, cw = min(tf.crop_size, nh), min(tf.crop_size, nw)
    image = image[top : top + ch, left : left + cw]
    label = label[top : top + ch, left : left + cw]
    if flip:
        image = image[:, ::-1]
        label = label[:, ::-1]
    pixel_values = D.to_pixel_values(tf.image_processor, np.ascontiguousarray(image))
    labels = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
    if ch < tf.crop_size or cw < tf.crop_size:
        pad = (0, tf.crop_size - cw, 0, tf.crop_size - ch)
        pixel_values = torch.nn.functional.pad(pixel_values, pad, value=0.0)
        labels = torch.nn.functional.pad(labels, pad, value=tf.ignore_index)
    return pixel_values, labels


@pytest.mark.parametrize(
    "size,crop,short,max_long",
    [
        ((150, 230), 64, 96, 1333),  # downscale, crop inside
        ((61, 97), 64, 61, 1333),  # no resize, crop taller than the image: pad rows
        ((37, 45), 48, 37, 1333),  # pad rows and columns
        ((203, 77), 48, 50, 100),  # long side capped, odd sizes
    ],
)
def test_albumentations_crop_and_flip_equal_the_hand_written_chain(size, crop, short, max_long):
    h, w = size
    label = ids_label(h, w)
    image = np.random.default_rng(h).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    tf = D.TrainTransform(
        PROC, crop_size=crop, resize_short_side=short, max_long_side=max_long, photometric=False, ignore_index=-1
    )
    nh, nw = D.short_side_size(h, w, short, max_long)
    resized = D.resize_label_nearest(label, nh, nw)
    for seed in range(6):
        pv, lab = tf(image, label, np.random.default_rng(seed))
        ch, cw = min(crop, nh), min(crop, nw)
        assert (lab[ch:, :] == -1).all() and (lab[:, cw:] == -1).all()  # padding at the bottom and right only
        top, left, flip = find_crop(resized, lab[:ch, :cw].numpy())
        ref_pv, ref_lab = hand_written_chain(tf, image, label, top, left, flip)
        assert torch.equal(pv, ref_pv) and torch.equal(lab, ref_lab)


def todays_chain(tf, image, label, rng):
    """`TrainTransform.__call__` as it was written by hand before albumentations applied the crop and flip: the
    same draws from `rng` in the same order (crop top, crop left, the colour jitter's seed, the flip)."""
    h, w = label.shape
    nh, nw = D.short_side_size(h, w, tf.resize_short_side, tf.max_long_side)
    image = D.resize_image(image, nh, nw)
    label = D.resize_label_nearest(label, nh, nw)
    ch, cw = min(tf.crop_size, nh), min(tf.crop_size, nw)
    top = int(rng.integers(0, nh - ch + 1))
    left = int(rng.integers(0, nw - cw + 1))
    image = image[top : top + ch, left : left + cw]
    label = label[top : top + ch, left : left + cw]
    if tf.photometric:
        image = D.photometric_distortion(image, rng, D.ssd_colour_distortion())
    if rng.random() < tf.hflip_prob:
        image = image[:, ::-1]
        label = label[:, ::-1]
    pixel_values = D.to_pixel_values(tf.image_processor, np.ascontiguousarray(image))
    labels = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
    if ch < tf.crop_size or cw < tf.crop_size:
        pad = (0, tf.crop_size - cw, 0, tf.crop_size - ch)
        pixel_values = torch.nn.functional.pad(pixel_values, pad, value=0.0)
        labels = torch.nn.functional.pad(labels, pad, value=tf.ignore_index)
    return pixel_values, labels


@pytest.mark.parametrize("photometric", [False, True])
def test_a_seed_gives_todays_samples(photometric):
    """The same rng gives bit for bit the sample the hand-written chain gave (crop, colour jitter, flip, padding)."""
    for h, w, crop, short in ((150, 230, 64, 96), (37, 45, 48, 37), (61, 97, 64, 61)):
        label = ids_label(h, w)
        image = np.random.default_rng(h).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        tf = D.TrainTransform(
            PROC, crop_size=crop, resize_short_side=short, photometric=photometric, hflip_prob=0.5, ignore_index=-1
        )
        for seed in range(8):
            pv, lab = tf(image, label, np.random.default_rng(seed))
            ref_pv, ref_lab = todays_chain(tf, image, label, np.random.default_rng(seed))
            assert torch.equal(pv, ref_pv) and torch.equal(lab, ref_lab), (h, w, seed)


def test_crop_offsets_and_flip_are_uniform_and_seeded():
    """Same distribution as detectron2's `RandomCrop` (offset uniform over every position) and `RandomFlip`; the same
    rng gives the same draw."""
    tf = D.TrainTransform(PROC, crop_size=12, resize_short_side=16, photometric=False, hflip_prob=0.3)
    label = ids_label(16, 19)
    image = np.zeros((16, 19, 3), np.uint8)
    draws = []
    for seed in range(600):
        lab = tf(image, label, np.random.default_rng(seed))[1].numpy()
        draws.append(find_crop(label, lab))
    tops, lefts, flips = (np.array(v) for v in zip(*draws))
    assert chisquare(np.bincount(tops, minlength=5)).pvalue > 1e-3 and set(tops) == set(range(5))
    assert chisquare(np.bincount(lefts, minlength=8)).pvalue > 1e-3 and set(lefts) == set(range(8))
    assert binomtest(int(flips.sum()), len(flips), 0.3).pvalue > 1e-3
    again = tf(image, label, np.random.default_rng(11))
    first = tf(image, label, np.random.default_rng(11))
    assert torch.equal(again[1], first[1])


def test_pad_if_needed_would_pad_before_the_flip():
    """Why the crop does not pad (albumentations' `Crop`, then padding after the augmentation):
    `RandomCrop(pad_if_needed=True)` pads before the flip (and the colour jitter), so a flipped small image has its
    padding on the left; CAT-Seg pads after the augmentation."""
    label = blocky_label(40, 50, 8, 7, 0)
    image = paint(label, 255)
    padded_first = A.Compose(
        [A.RandomCrop(64, 64, pad_if_needed=True, pad_position="top_left", fill_mask=255), A.HorizontalFlip(p=1.0)]
    )(image=image, mask=label)["mask"]
    assert (padded_first[:, :14] == 255).all()
    tf = D.TrainTransform(PROC, crop_size=64, resize_short_side=40, photometric=False, hflip_prob=1.0)
    labels = tf(image, label, np.random.default_rng(0))[1]
    assert (labels[:, 50:] == 255).all() and (labels[:40, :50] != 255).all()


def ssd_reference(img, rng):
    """MaskFormer / CAT-Seg `ColorAugSSDTransform.apply_image` on an RGB uint8 image, written from its rules with
    NumPy and OpenCV (the reference converts to BGR first; RGB2HSV of RGB is the same HSV image)."""

    def convert(a, alpha=1.0, beta=0.0):
        return np.clip(a.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(a):
        return convert(a, alpha=rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else a

    def saturation(a):
        if rng.random() < 0.5:
            hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return a

    def hue(a):
        if rng.random() < 0.5:
            hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(-18, 19))) % 180
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return a

    if rng.random() < 0.5:
        img = convert(img, beta=rng.uniform(-32, 32))
    if rng.random() < 0.5:
        return hue(saturation(contrast(img)))
    return contrast(hue(saturation(img)))


def test_ssd_pipeline_uses_the_reference_ranges_and_order():
    pipeline = D.ssd_colour_distortion()
    brightness, order = pipeline.transforms
    assert brightness.brightness_limit == pytest.approx((-32 / 255, 32 / 255)) and brightness.p == 0.5
    assert brightness.contrast_limit == (0.0, 0.0) and brightness.brightness_by_max
    first, last = order.transforms  # OneOf: contrast first or last, chosen with equal probability
    assert [type(t).__name__ for t in first.transforms] == [
        "RandomBrightnessContrast",
        "ScaleSaturation",
        "HueSaturationValue",
    ]
    assert [type(t).__name__ for t in last.transforms] == [
        "ScaleSaturation",
        "HueSaturationValue",
        "RandomBrightnessContrast",
    ]
    assert first.p == last.p and order.p == 1.0
    for seq in (first, last):
        contrast = [t for t in seq.transforms if isinstance(t, D.A.RandomBrightnessContrast)][0]
        saturation = [t for t in seq.transforms if isinstance(t, D.ScaleSaturation)][0]
        hue = [t for t in seq.transforms if isinstance(t, D.A.HueSaturationValue)][0]
        assert contrast.contrast_limit == pytest.approx((-0.5, 0.5)) and contrast.brightness_limit == (0.0, 0.0)
        assert saturation.saturation_range == (0.5, 1.5)
        assert hue.hue_shift_limit == (-18, 18) and hue.sat_shift_limit == (0, 0) and hue.val_shift_limit == (0, 0)
        assert contrast.p == saturation.p == hue.p == 0.5


def test_ssd_steps_match_the_reference_formulas():
    img = np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    brightness, order = D.ssd_colour_distortion().transforms
    contrast, saturation, hue = order.transforms[0].transforms
    for delta in (-32.0, -7.3, 20.5, 32.0):  # brightness: + delta, clipped (rounding vs truncation: 1 level)
        out = brightness.apply(img, alpha=1.0, beta=delta)
        expect = np.clip(img.astype(np.float32) + delta, 0, 255)
        assert np.abs(out.astype(np.float32) - expect).max() <= 1.0
    for alpha in (0.5, 0.83, 1.5):  # contrast: x alpha, clipped
        out = contrast.apply(img, alpha=alpha, beta=0.0)
        expect = np.clip(img.astype(np.float32) * alpha, 0, 255)
        assert np.abs(out.astype(np.float32) - expect).max() <= 1.0
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    for alpha in (0.5, 1.27, 1.5):  # saturation: HSV S x alpha, clipped, truncated to uint8 (exact)
        expect = hsv.copy()
        expect[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * alpha, 0, 255).astype(np.uint8)
        assert np.array_equal(saturation.apply(img, alpha=alpha), cv2.cvtColor(expect, cv2.COLOR_HSV2RGB))
    for shift in (-18, -5, 11, 18):  # hue: + shift modulo 180 in OpenCV units (exact for whole shifts)
        expect = hsv.copy()
        expect[..., 0] = (hsv[..., 0].astype(int) + shift) % 180
        out = hue.apply(img, hue_shift=shift, sat_shift=0, val_shift=0)
        assert np.array_equal(out, cv2.cvtColor(expect, cv2.COLOR_HSV2RGB))


def _draws(fn, img, n, seed):
    return [fn(img, np.random.default_rng([seed, k])) for k in range(n)]


def test_ssd_pipeline_distribution_matches_the_reference():
    """Same statistics as the reference over many draws: two-sample KS tests on per-image features."""
    n = 3000
    pipeline = D.ssd_colour_distortion()

    def ours(img, rng):
        return D.photometric_distortion(img, rng, pipeline)

    # a uniform grey image: only brightness and contrast act; the output stays uniform
    grey = np.full((8, 8, 3), 128, np.uint8)
    a = np.array([o[0, 0, 0] for o in _draws(ours, grey, n, 0)], np.float64)
    b = np.array([o[0, 0, 0] for o in _draws(ssd_reference, grey, n, 1)], np.float64)
    assert ks_2samp(a, b).pvalue > 1e-3
    assert abs((a == 128).mean() - 0.25) < 0.05 and abs((b == 128).mean() - 0.25) < 0.05  # neither step: 1/4
    assert a.min() >= (128 - 32) * 0.5 - 1 and a.max() <= (128 + 32) * 1.5 + 1
    # a dark saturated red (no channel reaches 255 under brightness and contrast, so clipping does not move the hue):
    # the hue shift (circular, OpenCV units) is 0 half of the time, else uniform in [-18, 18]
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 120
    red[..., 1:] = 30

    def hue_shift(outs):
        h = np.array([int(cv2.cvtColor(o, cv2.COLOR_RGB2HSV)[0, 0, 0]) for o in outs])
        return np.where(h > 90, h - 180, h).astype(np.float64)

    ha, hb = hue_shift(_draws(ours, red, n, 2)), hue_shift(_draws(ssd_reference, red, n, 3))
    assert np.abs(ha).max() <= 19 and np.abs(hb).max() <= 18
    assert abs((ha != 0).mean() - (hb != 0).mean()) < 0.06
    assert ks_2samp(ha[ha != 0], hb[hb != 0]).pvalue > 1e-3
    # a random colour image: mean of each RGB channel and of the HSV saturation
    img = np.random.default_rng(4).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)

    def features(outs):
        return np.array([[*o.reshape(-1, 3).mean(0), cv2.cvtColor(o, cv2.COLOR_RGB2HSV)[..., 1].mean()] for o in outs])

    fa, fb = features(_draws(ours, img, n, 5)), features(_draws(ssd_reference, img, n, 6))
    for k in range(fa.shape[1]):
        assert ks_2samp(fa[:, k], fb[:, k]).pvalue > 1e-3, k


def test_photometric_distortion_is_seeded_and_leaves_the_label_alone():
    img = np.random.default_rng(0).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    outs = [D.photometric_distortion(img, np.random.default_rng(s)) for s in range(40)]
    assert all(o.dtype == np.uint8 and o.shape == img.shape for o in outs)
    changed = sum(not np.array_equal(o, img) for o in outs)
    assert 30 <= changed <= 40  # P(no op at all) = 1/16
    again = D.photometric_distortion(img, np.random.default_rng(7))
    assert np.array_equal(again, outs[7])  # same generator state, same draw
    label = blocky_label(32, 48, 8, 7, 0)
    a = D.TrainTransform(PROC, crop_size=24, resize_short_side=32, photometric=True, hflip_prob=0.0)(
        img, label, np.random.default_rng(3)
    )
    b = D.TrainTransform(PROC, crop_size=24, resize_short_side=32, photometric=False, hflip_prob=0.0)(
        img, label, np.random.default_rng(3)
    )
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


def test_normalisation_is_the_image_processor():
    """The training and validation transforms normalise with the model's processor (one preprocessing path)."""
    img = np.random.default_rng(1).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    label = blocky_label(48, 48, 8, 7, 0)
    tf = D.TrainTransform(PROC, crop_size=48, resize_short_side=48, photometric=False, hflip_prob=0.0)
    pv, _ = tf(img, label, np.random.default_rng(0))
    expect = PROC(images=img, do_resize=False, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(pv, expect)
    independent = (
        torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    ) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    assert torch.allclose(pv, independent, atol=1e-5)
    pv, lab = D.EvalTransform(PROC, size=32)(img, label)
    out = PROC(images=img, segmentation_maps=label, size={"height": 32, "width": 32}, return_tensors="pt")
    assert torch.equal(pv, out["pixel_values"][0]) and torch.equal(lab, out["labels"][0])


def test_eval_transform_and_reduce_labels():
    label = blocky_label(50, 70, 10, 7, 0, ignore=255)
    image = paint(label, 255)
    pv, lab = D.EvalTransform(PROC, size=32)(image, label)
    assert pv.shape == (3, 32, 32) and lab.shape == (32, 32)
    red = D.reduce_label_values(np.array([[0, 1, 2, 255]]), 255)
    assert red.tolist() == [[255, 0, 1, 255]]


# ------------------------------------------------------------------ datasets and bad input


def make_ds(n=6, size=(40, 56), num_classes=5, ignore=255, label_dtype=np.uint8, class_label=False):
    imgs, labs = [], []
    for i in range(n):
        lab = blocky_label(*size, 8, num_classes, i, ignore=ignore, dtype=label_dtype)
        labs.append(Image.fromarray(lab))
        imgs.append(Image.fromarray(paint(lab, ignore)))
    feats = {"image": datasets.Image(), "annotation": datasets.Image()}
    data = {"image": imgs, "annotation": labs}
    if class_label:
        feats["category"] = datasets.ClassLabel(names=[f"c{k}" for k in range(num_classes)])
        data["category"] = [0] * n
    return datasets.Dataset.from_dict(data, features=datasets.Features(feats))


def preparer(num_classes=5, ignore=255, transform=None, **kw):
    return D.SamplePreparer(
        "image", "annotation", num_classes, ignore, transform or D.EvalTransform(PROC, size=32), **kw
    )


def test_dataset_wrapper_augmentation_is_keyed_by_seed_epoch_and_row():
    ds = D.disable_image_decoding(make_ds(8), ["image", "annotation"])
    tf = D.TrainTransform(PROC, crop_size=24, resize_short_side=32)
    w = D.SegmentationDataset(ds, preparer(transform=tf), seed=3)
    a = [w[i]["pixel_values"] for i in range(8)]
    w2 = D.SegmentationDataset(ds, preparer(transform=tf), seed=3)
    b = [w2[i]["pixel_values"] for i in reversed(range(8))][::-1]  # access order does not matter
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    w.set_epoch(1)
    assert sum(not torch.equal(w[i]["pixel_values"], a[i]) for i in range(8)) >= 6  # a new draw per epoch
    batch = D.collate_segmentation([w[0], w[1]])
    assert batch["pixel_values"].shape == (2, 3, 24, 24) and batch["num_skipped"].tolist() == [0, 0]


def test_load_parquet_folder_and_save_to_disk(tmp_path):
    ds = make_ds(4)
    pq = tmp_path / "pq"
    pq.mkdir()
    ds.to_parquet(str(pq / "train-00000-of-00001.parquet"))
    ds.select(range(2)).to_parquet(str(pq / "validation-00000-of-00001.parquet"))
    splits = D.load_raw_splits(str(pq), cache_dir=str(tmp_path / "cache"))
    assert len(splits["train"]) == 4 and len(splits["validation"]) == 2
    disk = tmp_path / "disk"
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(1))}).save_to_disk(str(disk))
    splits = D.load_raw_splits(str(disk))
    assert len(splits["train"]) == 4 and len(splits["validation"]) == 1
    streamed = D.load_raw_splits(str(disk), streaming=True)
    assert isinstance(streamed["train"], datasets.IterableDataset)
    w = D.StreamingSegmentationDataset(
        D.disable_image_decoding(streamed["train"], ["image", "annotation"]), preparer()
    )
    assert len(list(w)) == 4
    with pytest.raises(D.DataError, match="split 'test' not found"):
        D.load_raw_splits(str(disk), validation_split="test")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(D.DataError, match="neither parquet"):
        D.load_raw_splits(str(empty))


def test_missing_columns_are_named():
    ds = make_ds(2)
    with pytest.raises(D.DataError, match=r"missing column\(s\) \['label'\]"):
        D.check_columns(ds, "image", "label")
    with pytest.raises(D.DataError, match=r"\['img', 'label'\]"):
        D.check_columns(ds, "img", "label")
    D.check_columns(ds, "image", "annotation")


def test_empty_dataset_errors():
    with pytest.raises(D.DataError, match="empty"):
        D.check_not_empty(make_ds(2).select([]), "train")


def corrupt_ds():
    ds = make_ds(4)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(buf, format="PNG")
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"][2] = {"bytes": buf.getvalue()[:40], "path": None}  # truncated PNG
    return datasets.Dataset.from_dict(
        rows, features=datasets.Features({"image": datasets.Image(decode=False), "annotation": datasets.Image()})
    )


def test_corrupted_image_errors_or_is_counted_when_skipped():
    ds = D.disable_image_decoding(corrupt_ds(), ["image", "annotation"])
    w = D.SegmentationDataset(ds, preparer(), on_bad_sample="error")
    w[1]
    with pytest.raises(D.BadSampleError, match="index 2: image cannot be decoded") as caught:
        w[2]
    # the decoder's own exception stays attached (its traceback shows where decoding failed)
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(D.BadSampleError, match="label cannot be decoded") as caught:
        D.decode_label({"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}, 0)
    assert isinstance(caught.value.__cause__, OSError)
    w = D.SegmentationDataset(ds, preparer(), on_bad_sample="skip")
    item = w[2]
    assert item["num_skipped"] == 1 and torch.equal(item["labels"], w[3]["labels"])
    with pytest.raises(D.DataError, match="bad samples skipped"):
        D.check_bad_fraction(num_skipped=11, num_seen=20, max_fraction=0.1)
    D.check_bad_fraction(num_skipped=1, num_seen=20, max_fraction=0.1)


def test_label_values_out_of_range_error():
    ds = D.disable_image_decoding(make_ds(2, num_classes=5), ["image", "annotation"])
    w = D.SegmentationDataset(ds, preparer(num_classes=3))  # labels go up to 4
    with pytest.raises(D.BadSampleError, match=r"outside \[0, 3\) and are not the ignore value 255"):
        w[0]
    # 16-bit labels keep their 65535 ignore value through decoding, resizing and checking
    ds16 = D.disable_image_decoding(
        make_ds(2, num_classes=5, ignore=65535, label_dtype=np.uint16), ["image", "annotation"]
    )
    item = D.SegmentationDataset(ds16, preparer(num_classes=5, ignore=65535))[0]
    assert (item["labels"] == 65535).any() and item["labels"].max() == 65535
    with pytest.raises(D.BadSampleError, match="not the ignore value 255"):
        D.SegmentationDataset(ds16, preparer(num_classes=5, ignore=255))[0]


def test_colour_label_and_size_mismatch_are_bad_samples():
    lab_rgb = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(D.BadSampleError, match="colour image"):
        D.decode_label(lab_rgb, 0)
    p = preparer()
    row = {
        "image": Image.fromarray(np.zeros((8, 8, 3), np.uint8)),
        "annotation": Image.fromarray(np.zeros((9, 8), np.uint8)),
    }
    with pytest.raises(D.BadSampleError, match="label map is"):
        p(row, 0, np.random.default_rng(0))


def test_class_names_resolution(tmp_path):
    ds = make_ds(2, class_label=True)
    from_ds = D.class_names_from_features(ds, "annotation", "category")
    assert from_ds == ["c0", "c1", "c2", "c3", "c4"]
    assert D.resolve_class_names(None, from_ds) == from_ds
    assert D.resolve_class_names(["c0", "c1", "c2", "c3", "c4"], from_ds) == from_ds
    with pytest.raises(D.DataError, match="disagrees"):
        D.resolve_class_names(["c0", "x", "c2", "c3", "c4"], from_ds)
    with pytest.raises(D.DataError, match="no class names"):
        D.resolve_class_names(None, None)
    with pytest.raises(D.DataError, match="duplicate"):
        D.resolve_class_names(["a", "a"], None)
    f = tmp_path / "id2label.json"
    f.write_text(json.dumps({"1": "b", "0": "a"}))
    assert D.read_class_names(str(f)) == ["a", "b"]
    g = tmp_path / "names.txt"
    g.write_text("wall\nsky, heaven\n")
    assert D.read_class_names([str(g)]) == ["wall", "sky, heaven"]
