"""Image processor for DiSa: CLIP normalisation at the model's crop size, label maps resized by nearest neighbour,
and semantic post-processing. PIL/NumPy backend (no torchvision needed).

Input conventions (documented behaviour, tested):
- grayscale (PIL "L"/"1"/"P", 2-D or 1-channel arrays) is replicated to RGB; RGBA/LA drop the alpha channel
  (no compositing); CMYK/YCbCr are converted to RGB by PIL;
- 16-bit images (PIL "I;16", uint16 arrays) are scaled to 8 bits by /257 (65535 -> 255);
- floating-point data, whatever its container (NumPy/torch float arrays, PIL "F" images), follows one rule: values
  all in [0, 1] are taken as already rescaled (x255), anything else as 0-255;
- channel counts other than 1, 3 or 4, NaN/inf values, and images smaller than one CLIP patch are errors;
- the channel axis of arrays and tensors is guessed (a leading axis of 1, 3 or 4 whose last axis is not is taken as
  channels-first) unless `input_data_format` names it;
- `do_convert_rgb=True` composites transparency onto white, as transformers' `convert_to_rgb` does, instead of
  dropping the alpha channel (the default).

EXIF orientation is not applied here (as in transformers' image processors): loaders apply it
(`transformers.image_utils.load_image`, and the open-vocabulary pipeline for every input form).
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling
from transformers.processing_utils import ImagesKwargs

from .inference import upsampled_argmax

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
FLOAT_MODES = ("F",)
UPSAMPLE_MODES = ("probabilities", "logits")


class DiSaImageProcessorKwargs(ImagesKwargs, total=False):
    do_reduce_labels: bool
    ignore_index: int
    patch_size: int


def _channel_format(input_data_format) -> ChannelDimension | None:
    if input_data_format is None:
        return None
    try:
        channel_format = ChannelDimension(input_data_format)
    except ValueError:
        channel_format = None
    if channel_format not in (ChannelDimension.FIRST, ChannelDimension.LAST):
        raise ValueError(
            f"input_data_format must be 'channels_first' or 'channels_last' (or None to infer it), got "
            f"{input_data_format!r}."
        )
    return channel_format


def _has_transparency(image: Image.Image) -> bool:
    # transformers' `convert_to_rgb` test: an alpha band, or a palette / grayscale transparency entry
    return "A" in image.getbands() or image.info.get("transparency") is not None


def to_rgb_uint8(image, patch_size: int, do_convert_rgb: bool = False, input_data_format=None) -> np.ndarray:
    """Any supported image -> `(H, W, 3)` uint8 array (see the module docstring for the rules).

    `input_data_format` (`"channels_first"` / `"channels_last"`): the channel axis of a 3-D array or tensor
    (inferred when None); PIL images are channels-last. `do_convert_rgb`: composite transparency onto white (as
    transformers' `convert_to_rgb`) instead of dropping the alpha channel.
    """
    channel_format = _channel_format(input_data_format)
    float_data = False  # floating-point values, scaled by one rule below whatever the container
    if isinstance(image, Image.Image):
        if channel_format == ChannelDimension.FIRST:
            raise ValueError("input_data_format='channels_first' was given for a PIL image, which is channels-last.")
        if image.mode in SIXTEEN_BIT_MODES:
            array = np.asarray(image).astype(np.float64) / 257.0
        elif image.mode in FLOAT_MODES:
            array, float_data = np.asarray(image), True  # PIL's own convert("RGB") would clip to 0-255
        elif do_convert_rgb and _has_transparency(image):
            array = np.asarray(image.convert("RGBA"))  # composited below, like the RGBA arrays
        else:
            array = np.asarray(image.convert("RGB"))
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if channel_format is not None and array.ndim != 3:
            raise ValueError(
                f"input_data_format={input_data_format!r} names a channel axis, but the image has shape "
                f"{array.shape}; pass input_data_format=None for 2-D (grayscale) arrays."
            )
        if channel_format == ChannelDimension.FIRST or (
            channel_format is None
            and array.ndim == 3
            and array.shape[0] in (1, 3, 4)
            and array.shape[-1] not in (1, 3, 4)
        ):
            array = np.moveaxis(array, 0, -1)
        if array.dtype == np.uint16:
            array = array.astype(np.float64) / 257.0
        else:
            float_data = np.issubdtype(array.dtype, np.floating)
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: pass PIL images, NumPy arrays or tensors.")
    if float_data:
        if not np.isfinite(array).all():
            raise ValueError("the image contains NaN or inf values.")
        array = array * 255.0 if array.size and array.max() <= 1.0 else array

    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images must have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, got an array of shape {array.shape}."
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4 and do_convert_rgb:
        alpha = array[..., 3:4].astype(np.float64) / 255.0
        array = alpha * array[..., :3] + (1.0 - alpha) * 255.0  # onto white, transformers' `convert_to_rgb` blend
    array = array[..., :3]
    if min(array.shape[:2]) < patch_size:
        raise ValueError(f"image of size {array.shape[:2]} is smaller than one CLIP patch ({patch_size} pixels).")
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def label_map_to_array(label_map) -> np.ndarray:
    """A label map (PIL "L"/"P"/"I;16"/"I", array or tensor) -> `(H, W)` int64 array, values untouched."""
    if isinstance(label_map, Image.Image):
        array = np.asarray(label_map)
    elif isinstance(label_map, torch.Tensor):
        array = label_map.detach().cpu().numpy()
    else:
        array = np.asarray(label_map)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"segmentation maps must be 2-D class-id maps, got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.floating):
        raise TypeError("segmentation maps must hold integer class ids, got floating-point values.")
    return array.astype(np.int64)


class DiSaImageProcessor(PilBackend):
    r"""
    Prepares images (and optional segmentation maps) for [`DiSaForOpenVocabSegmentation`].

    Images are converted to RGB (see module docstring), resized to `size` (bilinear, aspect ratio not kept, as
    CAT-Seg's whole-image inference), rescaled to [0, 1] and normalised with OpenAI CLIP's mean/std. Every `size`
    form of the PIL backend works (`{"height", "width"}`, `{"shortest_edge"[, "longest_edge"]}`,
    `{"max_height", "max_width"}`), as do `do_center_crop` / `crop_size` and `do_pad` / `pad_size`.

    Maps go through the same geometry (resize with the backend's nearest-neighbour `resize`, centre crop, pad) and
    are returned as `labels` (int64); pixels that crop or pad add outside the map get `ignore_index`.
    `do_reduce_labels` maps 0 to `ignore_index` and shifts the others down by one (the ADE20K-150 convention).
    `resample`, `do_rescale` and `do_normalize` apply to images only.

    A keyword given as None at call time takes the processor's own value (as an omitted one does).
    `data_format="channels_last"` returns `pixel_values` as `(batch, height, width, 3)`; `device` moves the
    returned tensors (with `return_tensors="pt"`). `disable_grouping` and `image_seq_length` are torchvision-backend
    and vision-language options with no meaning here: they are refused.
    """

    valid_kwargs = DiSaImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 384, "width": 384}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = False
    do_reduce_labels = False
    ignore_index = 255
    patch_size = 16

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "DiSaImageProcessor":
        """The image processor that matches a `DiSaConfig`: images resized to `config.clip_resolution` (square),
        `patch_size` = `config.vision_config.patch_size` (the smallest image accepted), `ignore_index` =
        `config.ignore_index`. `kwargs` (e.g. `image_mean` / `image_std` of the CLIP checkpoint's own image
        processor) are passed to the constructor; the config holds no normalisation statistics, so the defaults
        are OpenAI CLIP's."""
        values = {
            "size": {"height": config.clip_resolution, "width": config.clip_resolution},
            "patch_size": config.vision_config.patch_size,
            "ignore_index": config.ignore_index,
        }
        clashing = sorted(set(values) & set(kwargs))
        if clashing:
            raise ValueError(
                f"{clashing} come from the model config; change them in the config instead of passing them here."
            )
        return cls(**values, **kwargs)

    def _merge_and_standardize_kwargs(self, **kwargs) -> dict:
        # A keyword set to None at call time means "not given" (the processor's own value), as in later transformers
        # releases; 5.x's merge keeps the None, which would silently switch a step such as `do_resize` off.
        return super()._merge_and_standardize_kwargs(
            **{key: value for key, value in kwargs.items() if value is not None}
        )

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, patch_size=None, **kwargs):
        """One image -> `(3, H, W)` uint8 array (channels-first, the backend's working format)."""
        rgb = to_rgb_uint8(
            image,
            self.patch_size if patch_size is None else patch_size,
            do_convert_rgb=self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb,
            input_data_format=input_data_format,
        )
        return np.ascontiguousarray(np.moveaxis(rgb, -1, 0))

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        # Own flattening: transformers' helper rejects 2-D (grayscale) arrays, which are supported here.
        def is_single(item):
            return isinstance(item, Image.Image) or (
                isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3)
            )

        if is_single(images):
            return [images]
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)
        if isinstance(images, (list, tuple)):
            flat = [img for item in images for img in (item if isinstance(item, (list, tuple)) else [item])]
            if not flat:
                raise ValueError("no images given.")
            for item in flat:
                if not is_single(item):
                    raise TypeError(
                        f"unsupported image {type(item).__name__}: pass PIL images, or 2-D/3-D NumPy arrays or "
                        "tensors "
                        "(paths and URLs are not opened here; load the image first)."
                    )
            return flat
        raise TypeError(
            f"unsupported image input {type(images).__name__}: pass PIL images, NumPy arrays or tensors "
            "(paths and URLs are not opened here; load the image first)."
        )

    def _preprocess_image_like_inputs(
        self,
        images,
        segmentation_maps=None,
        *,
        do_convert_rgb=None,
        input_data_format=None,
        patch_size=None,
        return_tensors=None,
        data_format=None,
        device=None,
        disable_grouping=None,
        image_seq_length=None,
        **kwargs,
    ) -> BatchFeature:
        for name, value in (("disable_grouping", disable_grouping), ("image_seq_length", image_seq_length)):
            if value is not None:
                raise ValueError(
                    f"{name} is not supported by DiSaImageProcessor (a PIL-backend processor for a segmentation "
                    f"model, which processes images one at a time and feeds no image tokens); leave it unset."
                )
        output_format = None if data_format is None else ChannelDimension(data_format)
        if output_format not in (None, ChannelDimension.FIRST, ChannelDimension.LAST):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}.")
        if device is not None and return_tensors != "pt":
            raise ValueError(f"device={device!r} needs return_tensors='pt' (NumPy arrays have no device).")
        prepared = self._prepare_image_like_inputs(
            images, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, patch_size=patch_size
        )
        pixel_values = self._preprocess(prepared, return_tensors=None, **kwargs)["pixel_values"]
        if output_format == ChannelDimension.LAST:
            pixel_values = [np.moveaxis(image, 0, -1) for image in pixel_values]
        data = {"pixel_values": pixel_values}
        if segmentation_maps is not None:
            maps = segmentation_maps if isinstance(segmentation_maps, (list, tuple)) else [segmentation_maps]
            if len(maps) != len(prepared):
                raise ValueError(f"got {len(maps)} segmentation maps for {len(prepared)} images.")
            data["labels"] = self._preprocess_segmentation_maps(
                maps, [image.shape[-2:] for image in prepared], **kwargs
            )
        batch = BatchFeature(data=data, tensor_type=return_tensors)
        return batch if device is None else batch.to(device)

    def _preprocess_segmentation_maps(
        self,
        maps,
        image_sizes,
        *,
        do_resize,
        size,
        do_center_crop,
        crop_size,
        do_pad,
        pad_size,
        do_reduce_labels,
        ignore_index,
        **kwargs,
    ) -> list[np.ndarray]:
        """Class-id maps -> `(H', W')` int64 arrays with the images' geometry (`_preprocess` of the backend, with
        nearest-neighbour resizing and `ignore_index` where crop or pad reach outside the map)."""
        labels = []
        for index, (label_map, image_size) in enumerate(zip(maps, image_sizes)):
            array = label_map_to_array(label_map)
            if array.shape != tuple(image_size):
                raise ValueError(
                    f"segmentation map {index} has size {array.shape} but its image has size {tuple(image_size)}."
                )
            if do_reduce_labels:
                array = np.where(array == 0, ignore_index, np.where(array == ignore_index, ignore_index, array - 1))
            if do_resize:
                array = self.resize_label_map(array, size)
            if do_center_crop:
                # the backend pads a crop larger than the map with zeros: crop the map's offset from
                # `ignore_index`, so that padding reads as `ignore_index` once the offset is added back
                array = self.center_crop((array - ignore_index)[None], crop_size)[0] + ignore_index
            labels.append(array)
        if do_pad:
            padded = self.pad([array[None] for array in labels], pad_size=pad_size, fill_value=ignore_index)
            labels = [array[0] for array in padded]
        return labels

    def resize_label_map(self, label_map: np.ndarray, size) -> np.ndarray:
        """`(H, W)` int64 class ids -> resized by the backend's nearest-neighbour `resize` (any `size` form).

        The backend resizes through 8-bit PIL images, which would clip ids above 255 (847 classes, 16-bit
        ignore 65535): the map is resized as indices into its distinct values, split into bytes. Nearest neighbour
        picks the same source pixel in every byte plane, so the ids come back exactly."""
        values, inverse = np.unique(label_map, return_inverse=True)
        inverse = inverse.reshape(label_map.shape)
        planes = max(1, (int(len(values) - 1).bit_length() + 7) // 8)
        resized = 0
        for plane in range(planes):
            byte = ((inverse >> (8 * plane)) & 0xFF).astype(np.uint8)[None]
            byte = self.resize(byte, size, resample=PILImageResampling.NEAREST)[0].astype(np.int64)
            resized = resized + (byte << (8 * plane))
        return values[resized]

    def preprocess(self, images, segmentation_maps=None, **kwargs) -> BatchFeature:
        """
        Args:
            images: one image or a list (PIL, NumPy or torch; see module docstring).
            segmentation_maps: optional class-id maps of the same sizes as the images.

        Returns:
            `BatchFeature` with `pixel_values` `(batch, 3, height, width)` and, with maps, `labels`
            `(batch, height, width)` int64.
        """
        return super().preprocess(images, image_like_kwargs={"segmentation_maps": segmentation_maps}, **kwargs)

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes=None,
        return_segmentation_scores: bool = False,
        upsample: str = "probabilities",
    ):
        """
        Label maps from DiSa's logits (the `post_process_semantic_segmentation` of transformers' semantic models,
        e.g. `SegformerImageProcessor`, with the same `return_segmentation_scores` option).

        Args:
            outputs: model output with `logits` `(batch, T, h, w)`.
            target_sizes: optional list of `(height, width)`, one per image; scores are bilinearly resized to it
                (`align_corners=False`).
            return_segmentation_scores (`bool`): return `SemanticSegmentationPostProcessorOutput`s with the
                `segmentation` and the `segmentation_scores` `(T, height, width)` it is the argmax of.
            upsample (`str`): `"probabilities"` (default, CAT-Seg's order for whole-image inference): per-class
                sigmoid at the logits' resolution, then the probabilities are resized; the scores are probabilities.
                `"logits"` (the order of transformers' semantic post-processing): logits resized, then argmax; the
                scores are the resized logits. Bilinear resizing does not commute with the sigmoid, so the label maps
                differ on some pixels.

        Returns:
            list of `(height, width)` long tensors of class ids, or with `return_segmentation_scores` a list of
            `SemanticSegmentationPostProcessorOutput`.

        Without `return_segmentation_scores` the classes are resized and reduced a few at a time
        (`inference.upsampled_argmax`): the same label map as the argmax of the full `(T, height, width)` scores,
        in working memory that does not grow with the number of classes (a block of 64 MiB of resized scores, or
        one class map if larger, plus the running maximum and the label map at the target size).
        """
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}.")
        logits = outputs.logits
        if target_sizes is not None and len(target_sizes) != logits.shape[0]:
            raise ValueError(f"got {len(target_sizes)} target sizes for {logits.shape[0]} images.")
        results = []
        for index in range(logits.shape[0]):
            size = None if target_sizes is None else tuple(int(s) for s in target_sizes[index])
            if return_segmentation_scores:  # the (T, height, width) scores are the output: no chunking to gain
                scores = class_scores(logits[index], size, upsample)
                results.append(
                    SemanticSegmentationPostProcessorOutput(
                        data={"segmentation": scores.argmax(dim=0), "segmentation_scores": scores}
                    )
                )
            else:
                before = torch.sigmoid if upsample == "probabilities" else None
                results.append(upsampled_argmax(logits[index], size, before=before)[0])
        return results


def class_scores(logits: torch.Tensor, size=None, upsample: str = "probabilities") -> torch.Tensor:
    """One image's `(T, h, w)` logits -> float32 `(T, *size)` scores: sigmoid probabilities resized bilinearly
    (`upsample="probabilities"`, CAT-Seg's order), or resized logits (`"logits"`)."""
    scores = logits.float()[None]
    if upsample == "probabilities":
        scores = scores.sigmoid()
    if size is not None and tuple(scores.shape[-2:]) != tuple(size):
        scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    return scores[0]


DiSaImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["DiSaImageProcessor", "class_scores"]
