"""Sliding-window / whole-image inference against a stub model whose output is known in closed form."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from modeling_disa.model.inference import (
    UPSAMPLE_BLOCK_ELEMENTS,
    predict_segmentation,
    short_side_size,
    sliding_window_geometry,
    sliding_window_probs,
    upsampled_argmax,
    whole_image_probs,
    window_starts,
)


class ConstantStub:
    """Logits = per-view mean of channel 0 times a per-class weight, on a 4x4 grid (constant over space)."""

    def __init__(self, weights):
        self.weights = weights
        self.calls = []

    def __call__(self, pixel_values, text_embeds=None):
        self.calls.append(tuple(pixel_values.shape))
        assert text_embeds is not None and text_embeds.shape[0] == self.weights.numel()
        m = pixel_values.float().mean(dim=(1, 2, 3))  # (N,)
        logits = m[:, None, None, None] * self.weights[None, :, None, None].to(m)
        return SimpleNamespace(logits=logits.expand(-1, -1, 4, 4).to(pixel_values.dtype))


class PixelStub:
    """Logits = channel 0 of the view (per pixel), the same for every class but scaled: T classes."""

    def __init__(self, t):
        self.t = t

    def __call__(self, pixel_values, text_embeds=None):
        x = pixel_values[:, :1].float()
        scale = torch.arange(1, self.t + 1, dtype=x.dtype).view(1, -1, 1, 1)
        return SimpleNamespace(logits=x * scale)


def test_window_starts_protocol():
    assert window_starts(640, 384, 256) == [0, 256]
    assert window_starts(40, 24, 16) == [0, 16]
    assert window_starts(50, 24, 16) == [0, 16, 26]
    assert window_starts(20, 24, 16) == [0]
    assert short_side_size(480, 640, 640) == (640, 853)
    assert short_side_size(100, 5000, 640) == (51, 2560)


def test_sliding_window_geometry_scales_the_protocol():
    assert (
        sliding_window_geometry()
        == sliding_window_geometry(384)
        == {"warp_size": 640, "window_size": 384, "stride": 256}
    )
    for view in (64, 128, 336):
        g = sliding_window_geometry(view)
        assert window_starts(g["warp_size"], g["window_size"], g["stride"]) == [0, g["warp_size"] - view]  # 2x2 crops
    with pytest.raises(ValueError, match="positive"):
        sliding_window_geometry(0)


def test_sliding_window_matches_manual_computation():
    torch.manual_seed(0)
    img = torch.randn(1, 3, 30, 50)
    w = torch.tensor([1.0, -2.0, 0.5])
    stub = ConstantStub(w)
    probs = sliding_window_probs(stub, img, torch.randn(3, 8), warp_size=40, window_size=24, stride=16)
    assert probs.shape == (1, 3, 30, 50)
    # 4 crops + 1 global view in one model call
    assert stub.calls == [(5, 3, 24, 24)]
    # manual: warp, crop means, sigmoid, fold with overlap counts, global view, average, resize
    warped = F.interpolate(img, size=(40, 40), mode="bilinear", align_corners=False)
    canvas = torch.zeros(3, 40, 40)
    count = torch.zeros(40, 40)
    for y in (0, 16):
        for x in (0, 16):
            m = warped[0, :, y : y + 24, x : x + 24].mean()
            canvas[:, y : y + 24, x : x + 24] += torch.sigmoid(m * w)[:, None, None]
            count[y : y + 24, x : x + 24] += 1
    g = F.interpolate(warped, size=(24, 24), mode="bilinear", align_corners=False).mean()
    final = (canvas / count + torch.sigmoid(g * w)[:, None, None]) / 2
    expected = F.interpolate(final[None], size=(30, 50), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    # the centre (covered by 4 crops) is the average of 4 crop probabilities and the global one
    assert torch.all((probs >= 0) & (probs <= 1))


def test_windows_batched_and_chunking_is_invariant():
    torch.manual_seed(1)
    img = torch.randn(2, 3, 33, 41)
    stub = PixelStub(4)
    a = sliding_window_probs(stub, img, torch.zeros(4, 2), warp_size=40, window_size=24, stride=16)
    b = sliding_window_probs(stub, img, torch.zeros(4, 2), warp_size=40, window_size=24, stride=16, batch_size=3)
    one = torch.cat(
        [
            sliding_window_probs(stub, img[i : i + 1], torch.zeros(4, 2), warp_size=40, window_size=24, stride=16)
            for i in range(2)
        ]
    )
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, one)


def test_pruned_classes_never_win():
    """A model that gives -100 to pruned classes (as DiSa does above 256 classes) -> those classes never win."""
    t = 300

    def model(pixel_values, text_embeds=None):
        n = pixel_values.shape[0]
        logits = torch.full((n, t, 4, 4), -100.0)
        logits[:, 5] = pixel_values[:, 0, :4, :4]  # class 5 kept, the others pruned
        logits[:, 7] = -pixel_values[:, 0, :4, :4]
        return SimpleNamespace(logits=logits)

    img = torch.randn(1, 3, 40, 40)
    seg = predict_segmentation(model, img, torch.zeros(t, 2), short_side=None, warp_size=40, window_size=24, stride=16)
    assert set(seg.unique().tolist()) <= {5, 7}


def test_whole_image_and_predict_modes():
    torch.manual_seed(2)
    img = torch.randn(1, 3, 20, 28)
    stub = PixelStub(3)
    p = whole_image_probs(stub, img, torch.zeros(3, 2), input_size=16)
    view = F.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False)[:, :1]
    exp = F.interpolate(
        torch.sigmoid(view * torch.tensor([1.0, 2, 3]).view(1, 3, 1, 1)),
        size=(20, 28),
        mode="bilinear",
        align_corners=False,
    )
    torch.testing.assert_close(p, exp)
    seg = predict_segmentation(stub, img, torch.zeros(3, 2), mode="whole", short_side=32, input_size=16)
    assert seg.shape == (1, 20, 28) and seg.dtype == torch.int64
    # sliding mode = argmax of the probabilities of the short-side-resized image, resized back to 20x28
    seg2 = predict_segmentation(stub, img, torch.zeros(3, 2), short_side=32, warp_size=40, window_size=24, stride=16)
    x = F.interpolate(img, size=short_side_size(20, 28, 32), mode="bilinear", align_corners=False)
    assert x.shape[-2:] == (32, 45)
    probs = sliding_window_probs(
        stub, x, torch.zeros(3, 2), warp_size=40, window_size=24, stride=16, output_size=(20, 28)
    )
    assert torch.equal(seg2, probs.argmax(1))
    with pytest.raises(ValueError, match="Unknown inference mode"):
        predict_segmentation(stub, img, torch.zeros(3, 2), mode="tiles")


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(3)
    lin = torch.nn.Conv2d(3, 5, 1)

    def model(pixel_values, text_embeds=None):
        return SimpleNamespace(logits=lin(pixel_values))

    img = torch.randn(1, 3, 32, 32)
    a = sliding_window_probs(model, img, None, warp_size=40, window_size=24, stride=16)
    b = sliding_window_probs(model, img, None, warp_size=40, window_size=24, stride=16, autocast_dtype=torch.bfloat16)
    assert b.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


class CoarseStub:
    """Logits at a quarter of the view's resolution (as DiSa's): channel 0 average-pooled 4x4, scaled per class."""

    def __init__(self, t):
        self.t = t

    def __call__(self, pixel_values, text_embeds=None):
        x = F.avg_pool2d(pixel_values[:, :1].float(), 4)
        return SimpleNamespace(logits=4 * x * torch.linspace(-1, 1, self.t).view(1, -1, 1, 1))


def test_whole_image_orders_match_direct_computations():
    """Default: CAT-Seg's whole-image order (sigmoid at the logits' resolution, then one resize to the output);
    `upsample="logits"`: resize the logits, then the sigmoid."""
    torch.manual_seed(4)
    img = torch.randn(1, 3, 37, 53)
    stub = CoarseStub(5)
    view = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)
    logits = stub(view).logits  # (1, 5, 8, 8)
    expected = F.interpolate(logits.sigmoid(), size=(37, 53), mode="bilinear", align_corners=False)
    torch.testing.assert_close(whole_image_probs(stub, img, torch.zeros(5, 2), input_size=32), expected)
    other = F.interpolate(logits, size=(37, 53), mode="bilinear", align_corners=False).sigmoid()
    got = whole_image_probs(stub, img, torch.zeros(5, 2), input_size=32, upsample="logits")
    torch.testing.assert_close(got, other)
    assert (expected.argmax(1) != other.argmax(1)).any()  # the orders are distinguishable here
    seg = predict_segmentation(stub, img, torch.zeros(5, 2), mode="whole", short_side=None, input_size=32)
    assert torch.equal(seg, expected.argmax(1))
    with pytest.raises(ValueError, match="upsample"):
        whole_image_probs(stub, img, torch.zeros(5, 2), input_size=32, upsample="nearest")


def test_sliding_window_encodes_the_vocabulary_once(tiny_model, tiny_processor):
    tokens = dict(tiny_processor.tokenize_class_names(["cat", "sky", "road"]))
    calls = []
    handle = tiny_model.clip.text_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        image = torch.randn(1, 3, 96, 80)
        kwargs = dict(warp_size=160, window_size=128, stride=32, batch_size=2)  # 4 crops + global: 3 model calls
        from_ids = sliding_window_probs(tiny_model, image, **kwargs, **tokens)
        assert len(calls) == 1
        with torch.no_grad():
            embeds = tiny_model.get_text_embeddings(**tokens)
        from_embeds = sliding_window_probs(tiny_model, image, embeds, **kwargs)
    finally:
        handle.remove()
    torch.testing.assert_close(from_ids, from_embeds)


def tied_maps(classes: int = 11) -> torch.Tensor:
    """Class maps with ties: repeated classes (tied everywhere) and logits that the float32 sigmoid saturates to 1."""
    maps = 6 * torch.randn(classes, 7, 9, generator=torch.Generator().manual_seed(0))
    maps[1, :2] = 50.0  # class 1 and its copies lead in the top rows
    maps[4] = maps[9] = maps[1]
    maps[10] = maps[6]
    maps[7, :, :5] = 30.0
    maps[8, :, 3:] = 40.0  # sigmoid(30) == sigmoid(40) == 1.0 in float32
    return maps


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def torch_threads(request):
    """PyTorch's CPU bilinear kernel rounds differently for 3 channels on one thread: run both thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("block", [1, 2 * 130 * 140, 3 * 130 * 140 + 7, 10**9])  # 1, 2, 3 and all classes a block
@pytest.mark.parametrize("before, after", [(None, None), (torch.sigmoid, None), (None, torch.sigmoid)])
@pytest.mark.parametrize("size", [(130, 140), (5, 4), None])
@pytest.mark.parametrize("classes", [11, 3, 14])  # 14 = 4 blocks of 3 + a last block of 2
def test_upsampled_argmax_equals_the_full_tensor_computation_ties_included(
    block, before, after, size, classes, torch_threads
):
    maps = {11: tied_maps(), 3: tied_maps()[[1, 4, 8]], 14: torch.cat([tied_maps(), tied_maps()[:3]])}[classes]
    full = maps if before is None else before(maps)
    if size is not None:
        full = F.interpolate(full[None], size=size, mode="bilinear", align_corners=False)[0]
    full = full if after is None else after(full)
    index, best = upsampled_argmax(maps, size, before=before, after=after, block_elements=block)
    assert torch.equal(index, full.argmax(0))  # argmax: the first maximal class
    assert torch.equal(best, full.max(0).values)
    assert ((full == full.max(0, keepdim=True).values).sum(0) > 1).any()  # there are ties to settle
    small, _ = upsampled_argmax(maps, size, before=before, after=after, index_dtype=torch.uint8, block_elements=block)
    assert small.dtype == torch.uint8 and torch.equal(small.long(), index)


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_predict_segmentation_resizes_a_bounded_block_of_classes(request, mode):
    """The label map of the whole-tensor resize and argmax, with no block resized at once that grows with the
    number of classes (600 classes at 256 x 256 would be 39M values)."""
    pixel_values = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    model = PixelStub(600)
    options = {"input_size": 32} if mode == "whole" else {"warp_size": 48, "window_size": 32, "stride": 16}
    if mode == "whole":
        reference = whole_image_probs(model, pixel_values, output_size=(256, 256), **options).argmax(1)
    else:
        reference = sliding_window_probs(model, pixel_values, output_size=(256, 256), **options).argmax(1)
    sizes = request.getfixturevalue("interpolate_sizes")  # recording from here on, after the references
    got = predict_segmentation(model, pixel_values, mode=mode, short_side=None, output_size=(256, 256), **options)
    assert torch.equal(got, reference)
    assert max(sizes) <= UPSAMPLE_BLOCK_ELEMENTS
