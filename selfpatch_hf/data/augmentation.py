"""DINO / SelfPatch multi-crop augmentation (docs/method.md section 9), and MoBY's two views as a recipe of it.

Public API
----------
`MultiCropAugmentation(global_crop_size=224, local_crop_size=96, num_local_crops=8, global_crops_scale=(0.25, 1.0),
local_crops_scale=(0.05, 0.25), mean=IMAGENET_MEAN, std=IMAGENET_STD, ratio=(3/4, 4/3))`

- `aug(image, rng=None) -> (global_crops, local_crops)`: `image` is a PIL image (any mode; converted to RGB) or an
  RGB `uint8` array `(H, W, 3)`; `rng` is an int seed or a `numpy.random.Generator` (None: fresh entropy).
  Returns float32 tensors `(2, 3, H, W)` and `(L, 3, h, w)` normalised with `mean`/`std` (`L` may be 0).
- `aug.crops_uint8(image, rng)` returns the same crops before normalisation as `uint8` arrays `(2, H, W, 3)` and
  `(L, h, w, 3)`; `aug.normalize(crops)` turns such an array into the normalised float tensor. The data loader
  uses the pair so that a whole batch is normalised at once.
- `sample_crop_box(rng, width, height, scale, ratio) -> (top, left, crop_height, crop_width)`: torchvision's
  `RandomResizedCrop.get_params` algorithm, drawn from a numpy Generator; `aug.crop_boxes(rng, width, height)` draws
  the boxes of all crops of one image, `aug.resize_crop(source, box, size)` resamples one (the pieces the
  device-side paths share with this one).
- `MultiCropAugmentation.from_recipe(recipe, **overrides)` with `recipe` a `CropRecipe` or a name of
  `AUGMENTATION_RECIPES`: "selfpatch" (the defaults), "dino" (DINO's crop scales) or "moby" (MoBY's BYOL views,
  below). The recipes, and the constructor's defaults, are the objectives' table
  (`selfpatch_hf.models.selfpatch.recipes`), which the training script reads too.

MoBY (public code Transformer-SSL, `data/build.py`, the "byol" SSL augmentation) is this recipe with two views and
no local crops: RandomResizedCrop to 224 with scale (0.08, 1) and torchvision's default BILINEAR resampling, then
the same flip, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, Gaussian blur (sigma in [0.1, 2]) p=1.0
on view 1 and p=0.1 on view 2, solarisation p=0.2 on view 2 only, ImageNet normalisation. So the photometric
pipelines below serve both methods unchanged; the "moby" recipe only sets the crop scale, `num_local_crops=0` and
`interpolation="bilinear"`.

The recipe, per crop (reference: DINO's `DataAugmentationDINO` on torchvision + PIL):
RandomResizedCrop (scale, ratio (3/4, 4/3), bicubic) -> horizontal flip p=0.5 -> colour jitter (brightness 0.4,
contrast 0.4, saturation 0.2, hue 0.1, random order) p=0.8 -> grayscale p=0.2 -> Gaussian blur (sigma uniform in
[0.1, 2.0]) with p=1.0 on global crop 1, p=0.1 on global crop 2, p=0.5 on local crops -> solarisation (threshold 128)
p=0.2 on global crop 2 only -> ImageNet normalisation.

Implementation choices (measured on the project's 2-core CPU machine, see BENCHMARKS.md):

- Crop + resize: the box is drawn with torchvision's algorithm (`sample_crop_box`), the pixels resampled with
  `torch.nn.functional.interpolate(mode="bicubic", antialias=True)` on uint8, which reproduces PIL's antialiased
  bicubic resize (what torchvision runs on PIL images) within one grey level, 5x faster than PIL on one core
  (a crop enlarged along one axis and shrunk along the other differs by 0.2 grey levels on average: Pillow 13
  runs its two passes in the other order then).
  OpenCV's `INTER_CUBIC` (albumentations' RandomResizedCrop) does not antialias when shrinking, and `INTER_AREA`
  is not bicubic.
- Flip, colour jitter, grayscale, blur and solarisation use albumentations (OpenCV underneath), 3-10x faster than
  PIL's ImageEnhance/ImageFilter. Same parameters, same random order of the four jitter ops; differences from the
  PIL ops that torchvision runs are at the rounding level (measured in tests/test_augmentation.py):
  * brightness/contrast/saturation round where PIL truncates, and contrast blends with the unrounded grey mean
    (PIL rounds the mean): at most 1 grey level;
  * hue: OpenCV's 8-bit HSV stores hue in 180 steps (PIL: 256), so a hue shift is quantised to 2 degrees instead
    of 1.4: mean difference below 1 grey level, at most about 10 on saturated pixels;
  * blur: albumentations' own GaussianBlur samples a Gaussian kernel, which for sigma < 0.7 blurs much less than
    PIL (at sigma 0.3 its kernel has a tenth of the variance). `PILGaussianBlur` (an albumentations GaussianBlur)
    instead applies the kernel PIL itself uses for `GaussianBlur(radius=sigma)` (three "extended box" passes of
    variance sigma^2 / 3, composed into one separable kernel) in a single OpenCV convolution: equal to PIL within
    3 grey levels inside the image; at the border, PIL's edge handling differs from the reflected border by a few
    levels in the outermost pixels.
  Solarisation (`x >= 128 -> 255 - x`), flip and grayscale (ITU-R 601 weights) match PIL exactly.
- Randomness: every transform of the three pipelines draws from ONE shared `numpy.random.Generator` /
  `random.Random` pair seeded per image. albumentations' own `seed=` / `set_random_seed` gives every transform an
  identically seeded generator, which correlates the decisions (with a shared seed, "flipped" would imply
  "colour-jittered"); `set_random_state` with shared generators avoids that.

Instances are not thread-safe (the pipelines hold the random state of the image being processed); DataLoader worker
processes each get their own copy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from selfpatch_hf.image_conventions import IMAGENET_MEAN, IMAGENET_STD, SizeLike, as_height_width
from selfpatch_hf.models.selfpatch.recipes import CROP_RECIPES, INTERPOLATIONS, NUM_GLOBAL_CROPS, CropRecipe

# albumentations asks PyPI for a newer version at import unless told not to (no network at run time).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

# Recipe constants of docs/method.md section 9 (identical to DINO's reference code).
FLIP_PROBABILITY = 0.5
COLOR_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
COLOR_JITTER_PROBABILITY = 0.8
GRAYSCALE_PROBABILITY = 0.2
BLUR_SIGMA_RANGE = (0.1, 2.0)
BLUR_PROBABILITY = {"global_1": 1.0, "global_2": 0.1, "local": 0.5}
SOLARIZE_PROBABILITY_GLOBAL_2 = 0.2
SOLARIZE_THRESHOLD = 128
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Resampling of the random resized crop (`INTERPOLATIONS`): DINO/SelfPatch ask torchvision for BICUBIC, MoBY keeps
# its BILINEAR default (both antialiased when shrinking, as PIL resizes).

# Named crop recipes of `MultiCropAugmentation.from_recipe` (the photometric ops are the same for all of them).
AUGMENTATION_RECIPES: dict[str, CropRecipe] = CROP_RECIPES
_DEFAULT = CROP_RECIPES["selfpatch"]  # the constructor's defaults

RngLike = int | np.random.Generator | None


def _as_range(
    values: Sequence[float], name: str, low: float = 0.0, high: float = math.inf
) -> tuple[float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 2 or not (low < values[0] <= values[1] <= high):
        raise ValueError(
            f"{name} must be a pair (min, max) with {low} < min <= max <= {high}, got {values!r}."
        )
    return values


def as_generator(rng: RngLike) -> np.random.Generator:
    """An int seed, a Generator or None -> a numpy Generator."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be an int seed, a numpy.random.Generator or None, got {type(rng).__name__}.")


def sample_crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params`: returns `(top, left, crop_height, crop_width)`.

    Ten tries at an area fraction uniform in `scale` and a log-uniform aspect ratio (width / height) in `ratio`; if
    none fits, a central crop clamped to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width = width
        crop_height = int(round(crop_width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_height = height
        crop_width = int(round(crop_height * max(ratio)))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def pil_gaussian_kernel_1d(radius: float, passes: int = 3) -> np.ndarray:
    """The 1-D kernel of PIL's `ImageFilter.GaussianBlur(radius)` (Pillow's `ImagingGaussianBlur`).

    PIL runs `passes` box blurs of variance `radius**2 / passes` with fractional ("extended") box radius
    `l + a` (Gwosdek et al., SSVM 2011): weights 1 on the `2 l + 1` central taps and `a` on the two next ones,
    normalised by `2 (l + a) + 1`. Their composition has variance `radius**2`.
    """
    sigma2 = radius * radius / passes
    box_length = math.sqrt(12.0 * sigma2 + 1.0)
    integer_radius = math.floor((box_length - 1.0) / 2.0)
    fraction = (2 * integer_radius + 1) * (integer_radius * (integer_radius + 1) - 3 * sigma2)
    fraction /= 6 * (sigma2 - (integer_radius + 1) ** 2)
    box = np.ones(2 * integer_radius + 3, dtype=np.float64)
    box[0] = box[-1] = fraction
    box /= 2 * (integer_radius + fraction) + 1
    kernel = np.ones(1, dtype=np.float64)
    for _ in range(passes):
        kernel = np.convolve(kernel, box)
    return kernel


class PILGaussianBlur(A.GaussianBlur):
    """albumentations' GaussianBlur with PIL's kernel: sigma uniform in `sigma_limit` = PIL's `radius`."""

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        sigma = self.py_random.uniform(*self.sigma_limit)
        return {"kernel": pil_gaussian_kernel_1d(sigma)}

    def apply(self, img: np.ndarray, kernel: np.ndarray, **params) -> np.ndarray:
        # BORDER_REFLECT is the OpenCV border closest to PIL's box-blur edge handling (measured).
        return cv2.sepFilter2D(img, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT)


def _photometric_pipeline(blur_probability: float, solarize_probability: float) -> A.Compose:
    """The per-crop ops after the resized crop, in the reference order."""
    ops: list[A.BasicTransform] = [
        A.HorizontalFlip(p=FLIP_PROBABILITY),
        A.ColorJitter(**COLOR_JITTER, p=COLOR_JITTER_PROBABILITY),
        A.ToGray(num_output_channels=3, method="weighted_average", p=GRAYSCALE_PROBABILITY),
    ]
    if blur_probability > 0:
        ops.append(PILGaussianBlur(sigma_limit=BLUR_SIGMA_RANGE, p=blur_probability))
    if solarize_probability > 0:
        # albumentations inverts values >= threshold * 255; 127.5 inverts exactly the values >= 128, as PIL's
        # ImageOps.solarize(threshold=128) does.
        threshold = (SOLARIZE_THRESHOLD - 0.5) / 255
        ops.append(A.Solarize(threshold_range=(threshold, threshold), p=solarize_probability))
    return A.Compose(ops)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image (any mode PIL can convert) or an RGB uint8 array `(H, W, 3)` -> writable RGB uint8 array."""
    if isinstance(image, Image.Image):
        return np.array(image if image.mode == "RGB" else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"Array images must be RGB uint8 of shape (H, W, 3), got dtype {image.dtype} and shape {image.shape}; "
                "decode other formats with selfpatch_hf.data.streaming.decode_image first."
            )
        return image if image.flags.writeable else image.copy()
    raise TypeError(f"Expected a PIL image or a numpy array, got {type(image).__name__}.")


class MultiCropAugmentation:
    """Two global crops and `num_local_crops` local crops of one image, with the DINO/SelfPatch recipe.

    Args:
        global_crop_size: output size of the global crops, an int or `(height, width)`.
        local_crop_size: output size of the local crops, an int or `(height, width)`.
        num_local_crops: number of local crops (0 allowed).
        global_crops_scale: area fraction range of the global crops (SelfPatch: (0.25, 1.0); DINO: (0.4, 1.0)).
        local_crops_scale: area fraction range of the local crops (SelfPatch: (0.05, 0.25); DINO: (0.05, 0.4)).
        mean, std: per-channel normalisation, in [0, 1] units.
        ratio: aspect ratio range (width / height) of the random crops.
        interpolation: resampling of the resized crops, "bicubic" (DINO/SelfPatch) or "bilinear" (MoBY).
    """

    def __init__(
        self,
        global_crop_size: SizeLike = _DEFAULT.global_crop_size,
        local_crop_size: SizeLike = _DEFAULT.local_crop_size,
        num_local_crops: int = _DEFAULT.num_local_crops,
        global_crops_scale: Sequence[float] = _DEFAULT.global_crops_scale,
        local_crops_scale: Sequence[float] = _DEFAULT.local_crops_scale,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ratio: Sequence[float] = DEFAULT_RATIO,
        interpolation: str = _DEFAULT.interpolation,
    ):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}.")
        if int(num_local_crops) != num_local_crops or num_local_crops < 0:
            raise ValueError(f"num_local_crops must be a non-negative int, got {num_local_crops!r}.")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0), got mean={mean!r}, std={std!r}.")
        self.global_crop_size = as_height_width(global_crop_size, "global_crop_size")
        self.local_crop_size = as_height_width(local_crop_size, "local_crop_size")
        self.num_local_crops = int(num_local_crops)
        self.global_crops_scale = _as_range(global_crops_scale, "global_crops_scale", high=1.0)
        self.local_crops_scale = _as_range(local_crops_scale, "local_crops_scale", high=1.0)
        self.ratio = _as_range(ratio, "ratio")
        self.interpolation = interpolation
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # x_normalised = (x_uint8 - 255 mean) / (255 std)
        self._shift = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._scale = 1.0 / (torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

        self.global_1_transforms = _photometric_pipeline(BLUR_PROBABILITY["global_1"], 0.0)
        self.global_2_transforms = _photometric_pipeline(
            BLUR_PROBABILITY["global_2"], SOLARIZE_PROBABILITY_GLOBAL_2
        )
        self.local_transforms = _photometric_pipeline(BLUR_PROBABILITY["local"], 0.0)

    @classmethod
    def from_recipe(cls, recipe: str | CropRecipe, **overrides) -> MultiCropAugmentation:
        """The augmentation of a `CropRecipe` (e.g. an objective's, `OBJECTIVE_RECIPES["moby"].crops`) or of a
        named one of `AUGMENTATION_RECIPES` ("selfpatch", "dino", "moby"), with `overrides` on top (e.g.
        `global_crop_size`)."""
        if isinstance(recipe, str):
            if recipe not in AUGMENTATION_RECIPES:
                raise ValueError(
                    f"Unknown augmentation recipe {recipe!r}; choose one of {', '.join(AUGMENTATION_RECIPES)}."
                )
            recipe = AUGMENTATION_RECIPES[recipe]
        return cls(**{**dataclasses.asdict(recipe), **overrides})

    @property
    def num_global_crops(self) -> int:
        return NUM_GLOBAL_CROPS

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_crop_size={self.global_crop_size}, local_crop_size={self.local_crop_size}, "
            f"num_local_crops={self.num_local_crops}, global_crops_scale={self.global_crops_scale}, "
            f"local_crops_scale={self.local_crops_scale}, ratio={self.ratio}, interpolation={self.interpolation!r}, "
            f"mean={self.mean}, std={self.std})"
        )

    def resize_crop(self, source: torch.Tensor, box: Sequence[int], size: tuple[int, int]) -> np.ndarray:
        """The crop `box = (top, left, height, width)` of `source` (1, 3, H, W) uint8, antialiased resized to `size`
        with this recipe's interpolation -> (h, w, 3) uint8."""
        top, left, crop_height, crop_width = (int(v) for v in box)
        crop = source[:, :, top : top + crop_height, left : left + crop_width]
        resized = torch.nn.functional.interpolate(crop, size=size, mode=self.interpolation, antialias=True)
        return resized[0].permute(1, 2, 0).numpy()

    def crop_boxes(self, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
        """The random boxes `(top, left, height, width)` of every crop of a `width` x `height` image, drawn from `rng`
        in order (the 2 global crops, then the local ones): `(2 + L, 4)` int64.

        The paths that finish the crops elsewhere (`selfpatch_hf.data.batched_photometric`,
        `selfpatch_hf.data.device_crops`) draw them this way; `crops_uint8` draws each box just before its
        photometric ops instead."""
        scales = [self.global_crops_scale] * 2 + [self.local_crops_scale] * self.num_local_crops
        boxes = [sample_crop_box(rng, width, height, scale, self.ratio) for scale in scales]
        return np.asarray(boxes, dtype=np.int64).reshape(len(scales), 4)

    @property
    def crop_sizes(self) -> list[tuple[int, int]]:
        """Output `(height, width)` of every crop, globals first."""
        return [self.global_crop_size] * 2 + [self.local_crop_size] * self.num_local_crops

    def crops_uint8(
        self, image: Image.Image | np.ndarray, rng: RngLike = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augmented crops before normalisation: `uint8` arrays `(2, H, W, 3)` and `(L, h, w, 3)`."""
        # (1, 3, H, W) view of the (H, W, 3) pixels: channels-last memory, which torch's uint8 resampling wants.
        source = torch.from_numpy(to_rgb_array(image)).permute(2, 0, 1).unsqueeze(0)
        height, width = source.shape[-2:]
        rng = as_generator(rng)
        # One shared random stream for every op of every pipeline (see the module docstring).
        py_random = random.Random(int(rng.integers(0, 2**63)))
        for pipeline in (self.global_1_transforms, self.global_2_transforms, self.local_transforms):
            pipeline.set_random_state(rng, py_random)

        global_crops = np.empty((NUM_GLOBAL_CROPS, *self.global_crop_size, 3), dtype=np.uint8)
        for index, pipeline in enumerate((self.global_1_transforms, self.global_2_transforms)):
            box = sample_crop_box(rng, width, height, self.global_crops_scale, self.ratio)
            crop = self.resize_crop(source, box, self.global_crop_size)
            global_crops[index] = pipeline(image=crop)["image"]
        local_crops = np.empty((self.num_local_crops, *self.local_crop_size, 3), dtype=np.uint8)
        for index in range(self.num_local_crops):
            box = sample_crop_box(rng, width, height, self.local_crops_scale, self.ratio)
            crop = self.resize_crop(source, box, self.local_crop_size)
            local_crops[index] = self.local_transforms(image=crop)["image"]
        return global_crops, local_crops

    def normalize(
        self,
        crops: np.ndarray | torch.Tensor,
        device: str | torch.device | None = None,
        pin_memory: bool = False,
    ) -> torch.Tensor:
        """`uint8` crops `(..., H, W, 3)` -> normalised float32 `(..., 3, H, W)` (contiguous), on `device`."""
        crops = torch.as_tensor(crops)
        if device is not None:
            crops = crops.to(device, non_blocking=True)
        leading = crops.shape[:-3]
        height, width = crops.shape[-3:-1]
        flat = crops.reshape(-1, height, width, 3).permute(0, 3, 1, 2)
        pin_memory = pin_memory and crops.device.type == "cpu"
        out = torch.empty(flat.shape, dtype=torch.float32, device=crops.device, pin_memory=pin_memory)
        # non_blocking: constant host tensors, so the copy need not wait for the GPU's queue
        shift, scale = (
            self._shift.to(out.device, non_blocking=True),
            self._scale.to(out.device, non_blocking=True),
        )
        out.copy_(flat).sub_(shift).mul_(scale)
        return out.reshape(*leading, 3, height, width)

    def __call__(
        self, image: Image.Image | np.ndarray, rng: RngLike = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(global_crops (2, 3, H, W), local_crops (L, 3, h, w))`, float32, normalised."""
        global_crops, local_crops = self.crops_uint8(image, rng)
        return self.normalize(global_crops), self.normalize(local_crops)


__all__ = [
    "AUGMENTATION_RECIPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropAugmentation",
    "PILGaussianBlur",
    "as_generator",
    "pil_gaussian_kernel_1d",
    "sample_crop_box",
    "to_rgb_array",
]
