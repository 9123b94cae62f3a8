"""Semantic-segmentation fine-tuning transforms: image and mask moved together (mmsegmentation's ADE20K recipe).

Training (`SegmentationTrainTransform`), in mmseg's order:

1. `reduce_labels` (ADE20K / `scene_parse_150`): label 0 ("other") -> ignore, l -> l - 1;
2. random rescale: a target scale `scale` (long, short side bounds, e.g. 2048 x 512) times a ratio drawn from
   `ratio_range` (0.5 - 2.0); the image keeps its aspect ratio and fits within it. Image bilinear, mask nearest;
3. random crop of `crop_size`; up to 10 draws so that no single class covers more than `cat_max_ratio` of the
   crop's labelled pixels (mmseg's `RandomCrop(cat_max_ratio=0.75)`);
4. horizontal flip with probability `flip_prob`;
5. photometric distortion of the image only (mmseg's `PhotoMetricDistortion`): brightness +-32, contrast
   0.5-1.5 (before or after the colour changes, at random), saturation 0.5-1.5, hue +-18 degrees of 180, each with
   probability 1/2;
6. normalise (ImageNet statistics), then pad to `crop_size` (image 0, mask `ignore_index`).

Evaluation (`SegmentationEvalTransform`): resize the image so that it fits `scale` (aspect ratio kept; mmseg's test
`Resize(keep_ratio=True)`), normalise; the mask stays at its original resolution and the prediction is resized to it.

Every random draw comes from the `numpy.random.Generator` passed in, so a run is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from selfpatch_hf.evaluation.semseg_metrics import integer_labels, reduce_zero_label
from selfpatch_hf.image_conventions import IMAGENET_MEAN, IMAGENET_STD, as_height_width


def _fit_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image rescaled, aspect ratio kept, to fit a (long, short) bound (mmseg's
    `rescale_size`): the factor is min(long / long side, short / short side)."""
    long_bound, short_bound = max(scale), min(scale)
    factor = min(long_bound / max(height, width), short_bound / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(H, W, 3) uint8 or float in 0..255 -> (3, H, W) float32, (x / 255 - mean) / std."""
    array = image.astype(np.float32) / 255.0
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def prepare_mask(mask, reduce_labels: bool = False, ignore_index: int = 255) -> np.ndarray:
    """A mask (PIL image or array; a colour PNG's first channel) as (H, W) int64 class ids; a float mask (PIL mode
    F) with values that are no whole numbers is refused (`MaskValueError`) rather than truncated."""
    array = integer_labels(mask)
    if array.ndim == 3:
        array = array[..., 0]
    return reduce_zero_label(array, ignore_index) if reduce_labels else array


class SegmentationDataError(ValueError):
    """A mask that no setting can train on or score: labels outside the classes, another size than its image."""


def check_label_range(labels: np.ndarray, num_labels: int, ignore_index: int) -> None:
    """Every label is a class id (0 .. num_labels - 1) or `ignore_index`; else a `SegmentationDataError` with the
    fix (the loss would fail with an IndexError, or a label would be scored as a class that does not exist)."""
    scored = labels[labels != ignore_index]
    wrong = scored[(scored < 0) | (scored >= num_labels)]
    if wrong.size:
        raise SegmentationDataError(
            f"its mask holds label {int(wrong.flat[0])} but there are {num_labels} classes (0..{num_labels - 1}, "
            f"{ignore_index} = ignore): pass the dataset's class names with --label_names, --reduce_labels for "
            "ADE20K-style masks (0 = other), or the dataset's --ignore_index"
        )


def check_mask_size(image: Image.Image, labels: np.ndarray) -> None:
    if labels.shape != (image.height, image.width):
        raise SegmentationDataError(
            f"its mask is {labels.shape[1]}x{labels.shape[0]} pixels but its image {image.width}x{image.height}: "
            "every mask must have its image's size"
        )


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's `PhotoMetricDistortion` on an (H, W, 3) float32 image in 0..255; returns float32 in 0..255."""
    image = image.astype(np.float32)

    def contrast(array: np.ndarray) -> np.ndarray:
        if rng.random() < 0.5:
            array = np.clip(array * rng.uniform(0.5, 1.5), 0, 255)
        return array

    if rng.random() < 0.5:  # brightness
        image = np.clip(image + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.random() < 0.5
    if contrast_first:
        image = contrast(image)
    saturate, saturation = rng.random() < 0.5, rng.uniform(0.5, 1.5)
    shift_hue, hue = rng.random() < 0.5, rng.uniform(-18, 18)
    if saturate or shift_hue:
        hsv = np.asarray(Image.fromarray(image.round().astype(np.uint8)).convert("HSV")).astype(np.float32)
        if saturate:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if shift_hue:  # +-18 of OpenCV's 180 hue steps = +-25.5 of PIL's 256
            hsv[..., 0] = np.mod(hsv[..., 0] + hue * 256 / 180, 256)
        image = np.asarray(Image.fromarray(hsv.round().astype(np.uint8), "HSV").convert("RGB")).astype(
            np.float32
        )
    if not contrast_first:
        image = contrast(image)
    return image


@dataclass
class SegmentationTrainTransform:
    """Random rescale, crop, flip, photometric distortion, normalise and pad (see the module docstring)."""

    crop_size: tuple[int, int] = (512, 512)  # (height, width)
    scale: tuple[int, int] = (2048, 512)  # (long, short) bound before the random ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    reduce_labels: bool = False
    ignore_index: int = 255
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self):
        self.crop_size = as_height_width(self.crop_size, "crop_size")
        self.scale = as_height_width(self.scale, "scale")
        low, high = self.ratio_range
        if not 0 < low <= high:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {self.ratio_range}.")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}.")

    def _crop_box(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
        crop_h, crop_w = self.crop_size
        height, width = mask.shape
        box = (0, 0, min(crop_h, height), min(crop_w, width))
        for _ in range(10):
            top = int(rng.integers(0, max(height - crop_h, 0) + 1))
            left = int(rng.integers(0, max(width - crop_w, 0) + 1))
            box = (top, left, min(top + crop_h, height), min(left + crop_w, width))
            if self.cat_max_ratio >= 1:
                break
            crop = mask[box[0] : box[2], box[1] : box[3]]
            counts = np.bincount(crop[crop != self.ignore_index].ravel())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return box

    def __call__(self, image: Image.Image, mask, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """-> pixel values (3, crop_h, crop_w) float32 and labels (crop_h, crop_w) int64."""
        image = image.convert("RGB")
        labels = prepare_mask(mask, self.reduce_labels, self.ignore_index)
        check_mask_size(image, labels)
        ratio = rng.uniform(*self.ratio_range)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        height, width = _fit_size(image.height, image.width, target)
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        labels = np.asarray(
            Image.fromarray(labels.astype(np.int32)).resize((width, height), Image.Resampling.NEAREST)
        ).astype(np.int64)

        top, left, bottom, right = self._crop_box(labels, rng)
        pixels = np.asarray(image, dtype=np.float32)[top:bottom, left:right]
        labels = labels[top:bottom, left:right]
        if rng.random() < self.flip_prob:
            pixels, labels = pixels[:, ::-1], labels[:, ::-1]
        if self.photometric:
            pixels = photometric_distortion(pixels, rng)

        crop_h, crop_w = self.crop_size
        out_pixels = np.zeros((3, crop_h, crop_w), np.float32)
        out_labels = np.full((crop_h, crop_w), self.ignore_index, np.int64)
        out_pixels[:, : pixels.shape[0], : pixels.shape[1]] = _normalize(pixels, self.mean, self.std)
        out_labels[: labels.shape[0], : labels.shape[1]] = labels
        return out_pixels, out_labels


@dataclass
class SegmentationEvalTransform:
    """Resize to fit `scale` (aspect ratio kept) and normalise; the mask keeps its resolution."""

    scale: tuple[int, int] = (2048, 512)
    reduce_labels: bool = False
    ignore_index: int = 255
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self):
        self.scale = as_height_width(self.scale, "scale")

    def __call__(self, image: Image.Image, mask) -> tuple[np.ndarray, np.ndarray]:
        """-> pixel values (3, h, w) float32 at the evaluation scale and labels (H, W) int64 at full size."""
        image = image.convert("RGB")
        labels = prepare_mask(mask, self.reduce_labels, self.ignore_index)
        height, width = _fit_size(image.height, image.width, self.scale)
        resized = image.resize((width, height), Image.Resampling.BILINEAR)
        return _normalize(np.asarray(resized), self.mean, self.std), labels


__all__ = [
    "SegmentationDataError",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "photometric_distortion",
    "check_label_range",
    "check_mask_size",
    "prepare_mask",
]
