"""Joint training augmentation of image, boxes and masks for detection and instance segmentation (albumentations).

The recipe is DETR's, which the SelfPatch reference's Mask R-CNN configuration uses too ("augmentation strategy
originates from DETR"): a horizontal flip, then with probability 1/2 either

- a multi-scale resize: the shorter side becomes one of `scales` (480, 512, ..., 800), the longer at most
  `max_size` (1333), aspect ratio kept; or
- a resize to one of `crop_scales` (400, 500, 600), a random crop of `crop_size` (384..600 pixels each side, an
  "absolute range" crop), and the multi-scale resize.

albumentations moves the boxes with the pixels (`BboxParams`: clipped to the crop, dropped when nothing is left) and
the masks with nearest-neighbour resampling; an object whose box leaves the crop is dropped with its mask, and one
whose mask leaves it empty is dropped too. Where there are masks, the boxes are then recomputed as the masks' tight
boxes (as detectron2 does after crops): a box clipped by a crop frames the whole cut object's box, not what is left
of the object in the crop. Crowd regions are left out of training targets (as DETR and mmdet do;
COCO evaluation still reads them). Every draw comes from the `numpy.random.Generator` passed in: each transform of
the pipeline is seeded from it, so an example's augmentation is a function of that generator's seed (resumable).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.augmentations.geometric.resize import MaxSizeTransform

from selfpatch_hf.data.detection.instances import Instances, mask_box
from selfpatch_hf.data.detection.sources import DetectionExample
from selfpatch_hf.image_conventions import IMAGENET_MEAN, IMAGENET_STD

COCO_SCALES = tuple(range(480, 801, 32))
COCO_CROP_SCALES = (400, 500, 600)


class ShortestEdgeResize(MaxSizeTransform):
    """Resize so that the shorter side is one of `sizes` (picked at random) and the longer at most `max_size`
    (mmdet's `Resize(img_scale=(size, max_size), keep_ratio=True)`, DETR's `RandomResize`)."""

    def __init__(self, sizes: Sequence[int], max_size: int, p: float = 1.0):
        super().__init__(
            max_size=list(sizes), interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, p=p
        )
        self.sizes = [int(size) for size in sizes]
        self.longest = int(max_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        short = self.py_random.choice(self.sizes)
        return {"scale": min(short / min(height, width), self.longest / max(height, width))}


class RandomSizeCrop(BaseCrop):
    """A crop whose height and width are drawn from [min_size, max_size] (capped by the image), placed at random
    (DETR's `RandomSizeCrop`, mmdet's `RandomCrop(crop_type="absolute_range")`)."""

    def __init__(self, min_size: int, max_size: int, p: float = 1.0):
        super().__init__(p=p)
        self.min_size, self.max_size = int(min_size), int(max_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        crop_h = self.py_random.randint(min(self.min_size, height), min(height, self.max_size))
        crop_w = self.py_random.randint(min(self.min_size, width), min(width, self.max_size))
        top = self.py_random.randint(0, height - crop_h)
        left = self.py_random.randint(0, width - crop_w)
        return {"crop_coords": (left, top, left + crop_w, top + crop_h)}


def _positive_ints(values: Sequence[int], name: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be positive sizes, got {values}.")
    return values


@dataclass
class DetectionAugmentation:
    """The joint augmentation recipe (see the module docstring); the defaults are COCO's (DETR's)."""

    scales: Sequence[int] = COCO_SCALES
    max_size: int = 1333
    crop_scales: Sequence[int] | None = COCO_CROP_SCALES  # None: no crop branch
    crop_size: tuple[int, int] = (384, 600)  # (min, max) side of the crop
    crop_prob: float = 0.5
    flip_prob: float = 0.5

    def __post_init__(self):
        self.scales = _positive_ints(self.scales, "scales")
        if self.crop_scales is not None:
            self.crop_scales = _positive_ints(self.crop_scales, "crop_scales")
        low, high = _positive_ints(self.crop_size, "crop_size")
        if low > high:
            raise ValueError(f"crop_size must be (min, max) with min <= max, got {self.crop_size}.")
        if self.max_size < max(self.scales):
            raise ValueError(f"max_size {self.max_size} is below the largest scale {max(self.scales)}.")
        for name in ("crop_prob", "flip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # also refuses NaN
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}.")

    @classmethod
    def for_short_side(cls, short_side: int, **overrides: Any) -> DetectionAugmentation:
        """COCO's recipe scaled so that its largest scale (800) becomes `short_side` (for small images)."""
        factor = short_side / max(COCO_SCALES)
        scaled = {
            "scales": sorted({max(1, round(s * factor)) for s in COCO_SCALES}),
            "max_size": max(1, round(1333 * factor)),
            "crop_scales": sorted({max(1, round(s * factor)) for s in COCO_CROP_SCALES}),
            "crop_size": (max(1, round(384 * factor)), max(1, round(600 * factor))),
        }
        return cls(**{**scaled, **overrides})

    def compose(self) -> A.Compose:
        resize = ShortestEdgeResize(self.scales, self.max_size)
        branches: list[A.BasicTransform] = [resize]
        if self.crop_scales is not None and self.crop_prob > 0:
            crop = A.Sequential(
                [
                    ShortestEdgeResize(self.crop_scales, self.max_size),
                    RandomSizeCrop(*self.crop_size),
                    ShortestEdgeResize(self.scales, self.max_size),
                ],
                p=self.crop_prob,
            )
            resize.p = 1.0 - self.crop_prob  # OneOf picks a branch with probability proportional to its p
            branches.append(crop)
        return A.Compose(
            [A.HorizontalFlip(p=self.flip_prob), A.OneOf(branches, p=1.0)],
            bbox_params=A.BboxParams(
                format="pascal_voc", label_fields=["instance_index"], clip=True, filter_invalid_bboxes=True
            ),
        )


def _seed_each(node: Any, rng: np.random.Generator) -> None:
    """Give a pipeline and each of its transforms its own seed: albumentations' `set_random_seed` hands one seed to
    every transform, which would tie their draws together (the flip to the scale)."""
    seed = int(rng.integers(2**32))
    node.random_generator = np.random.default_rng(seed)
    node.py_random = random.Random(seed)
    for child in getattr(node, "transforms", ()):
        _seed_each(child, rng)


def normalize_image(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32, (x / 255 - mean) / std."""
    array = image.astype(np.float32) / 255.0
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


@dataclass
class DetectionSample:
    """One augmented image: pixel values (3, H, W) float32 (normalised) and its instances in those pixels."""

    image_id: Any
    pixel_values: np.ndarray
    instances: Instances


@dataclass
class DetectionTrainTransform:
    """`DetectionExample` + generator -> `DetectionSample` (flip, multi-scale resize / crop, normalise)."""

    recipe: DetectionAugmentation = field(default_factory=DetectionAugmentation)
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self):
        self._pipeline = self.recipe.compose()

    def augment(
        self, image: np.ndarray, instances: Instances, rng: np.random.Generator
    ) -> tuple[np.ndarray, Instances]:
        """The geometric part on a (H, W, 3) uint8 image: -> augmented image and instances (crowd left out)."""
        instances = instances.select(~instances.iscrowd)
        _seed_each(self._pipeline, rng)
        inputs: dict[str, Any] = {
            "image": image,
            "bboxes": instances.boxes.reshape(-1, 4),
            "instance_index": np.arange(len(instances)),
        }
        if instances.masks is not None and len(instances):
            inputs["masks"] = list(instances.masks)  # albumentations cannot stack an empty list of masks
        output = self._pipeline(**inputs)
        augmented = output["image"]
        kept = np.asarray(output["instance_index"], np.int64)
        result = instances.select(kept)
        result.boxes = np.asarray(output["bboxes"], np.float32).reshape(-1, 4)
        if instances.masks is not None:
            height, width = augmented.shape[:2]
            masks = (
                np.asarray(output["masks"], np.uint8)[kept]
                if len(instances)
                else np.zeros((0, height, width))
            )
            result.masks = masks.reshape(-1, height, width).astype(np.uint8)
            result = result.select(result.masks.any(axis=(1, 2)))  # a mask cropped away
            result.boxes = np.asarray([mask_box(mask) for mask in result.masks], np.float32).reshape(-1, 4)
        return augmented, result

    def __call__(self, example: DetectionExample, rng: np.random.Generator) -> DetectionSample:
        image, instances = self.augment(np.asarray(example.image.convert("RGB")), example.instances, rng)
        return DetectionSample(example.image_id, normalize_image(image, self.mean, self.std), instances)


__all__ = [
    "COCO_CROP_SCALES",
    "COCO_SCALES",
    "DetectionAugmentation",
    "DetectionSample",
    "DetectionTrainTransform",
    "RandomSizeCrop",
    "ShortestEdgeResize",
    "normalize_image",
]
