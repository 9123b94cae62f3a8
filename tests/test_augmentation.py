"""The multi-crop recipe (docs/method.md section 9) against independent PIL / torchvision-semantics references."""

from __future__ import annotations

import math

import albumentations as A
import cv2
import numpy as np
import pytest
import skimage.data
import torch
from augmentation_probes import record_decisions
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from selfpatch_hf.data.augmentation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    PILGaussianBlur,
    pil_gaussian_kernel_1d,
    sample_crop_box,
)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photograph, small enough for fast tests."""
    return Image.fromarray(skimage.data.astronaut()).resize((120, 90), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def photo_array(photo) -> np.ndarray:
    return np.asarray(photo.resize((64, 64), Image.Resampling.BICUBIC))


def tiny_augmentation(**kwargs) -> MultiCropAugmentation:
    return MultiCropAugmentation(
        **{"global_crop_size": 32, "local_crop_size": 16, "num_local_crops": 3, **kwargs}
    )


def all_transforms(aug: MultiCropAugmentation):
    for pipeline in (aug.global_1_transforms, aug.global_2_transforms, aug.local_transforms):
        yield from pipeline.transforms


def unnormalize(crops: torch.Tensor) -> np.ndarray:
    """Float normalised (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (crops * std + mean) * 255.0
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------- shapes, seeds


@pytest.mark.parametrize(
    "global_size, local_size, num_local",
    [(32, 16, 3), ((40, 24), (12, 20), 2), (32, 16, 0)],
)
def test_shapes_and_dtypes(photo, global_size, local_size, num_local):
    aug = MultiCropAugmentation(global_size, local_size, num_local)
    global_crops, local_crops = aug(photo, rng=0)
    gh, gw = (global_size, global_size) if isinstance(global_size, int) else global_size
    lh, lw = (local_size, local_size) if isinstance(local_size, int) else local_size
    assert global_crops.shape == (2, 3, gh, gw) and global_crops.dtype == torch.float32
    assert local_crops.shape == (num_local, 3, lh, lw) and local_crops.dtype == torch.float32
    assert global_crops.is_contiguous() and local_crops.is_contiguous()


def test_same_seed_same_crops_and_different_seed_different_crops(photo):
    aug = tiny_augmentation()
    first, second = aug(photo, rng=123), aug(photo, rng=123)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # A Generator in the same state gives the same crops as its seed.
    from_generator = aug(photo, rng=np.random.default_rng(123))
    assert torch.equal(first[0], from_generator[0]) and torch.equal(first[1], from_generator[1])
    other = aug(photo, rng=124)
    assert not torch.equal(first[0], other[0])
    # A fresh instance (e.g. in another worker process) reproduces the crops too.
    again = tiny_augmentation()(photo, rng=123)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_array_input_equals_pil_input_and_bad_arrays_are_rejected(photo):
    aug = tiny_augmentation()
    from_pil = aug(photo, rng=5)
    from_array = aug(np.asarray(photo), rng=5)
    assert torch.equal(from_pil[0], from_array[0]) and torch.equal(from_pil[1], from_array[1])
    gray = aug(photo.convert("L"), rng=5)[0]
    assert gray.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="RGB uint8"):
        aug(np.zeros((10, 10), dtype=np.uint8), rng=0)
    with pytest.raises(ValueError, match="RGB uint8"):
        aug(np.zeros((10, 10, 3), dtype=np.float32), rng=0)


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError, match="num_local_crops"):
        MultiCropAugmentation(num_local_crops=-1)
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropAugmentation(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="local_crop_size"):
        MultiCropAugmentation(local_crop_size=(16, 0))


def test_normalize_matches_the_formula():
    aug = tiny_augmentation(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2))
    crops = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    expected = (crops / 255.0 - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 0.2])
    out = aug.normalize(crops)
    assert out.shape == (2, 3, 5, 7)
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- the crop geometry


def test_sample_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    width, height, scale, ratio = 500, 375, (0.25, 1.0), (3 / 4, 4 / 3)
    fractions = []
    for _ in range(2000):
        top, left, crop_height, crop_width = sample_crop_box(rng, width, height, scale, ratio)
        assert 0 <= top and top + crop_height <= height and 0 <= left and left + crop_width <= width
        fraction = crop_height * crop_width / (width * height)
        # Rounding the side lengths moves the area by at most about one row and one column.
        slack = (crop_height + crop_width + 1) / (width * height)
        assert scale[0] - slack <= fraction <= scale[1] + slack
        assert ratio[0] * 0.97 <= crop_width / crop_height <= ratio[1] * 1.03
        fractions.append(fraction)
    # Areas that do not fit are redrawn (torchvision's rejection loop), so large fractions are rarer than uniform.
    assert 0.45 < np.mean(fractions) < 0.625


def test_sample_crop_box_falls_back_to_a_central_crop():
    # A 1000 x 10 strip: no crop with aspect ratio in [3/4, 4/3] reaches 25% of its area.
    top, left, crop_height, crop_width = sample_crop_box(np.random.default_rng(0), 1000, 10, (0.25, 1.0))
    assert (crop_height, crop_width) == (10, round(10 * 4 / 3))
    assert (top, left) == (0, (1000 - crop_width) // 2)


def disable_photometric_ops(aug: MultiCropAugmentation, keep: type | None = None) -> None:
    for transform in all_transforms(aug):
        if keep is None or not isinstance(transform, keep):
            transform.p = 0.0
        else:
            transform.p = 1.0


@pytest.mark.parametrize("global_size, local_size", [((30, 34), (14, 18)), ((64, 72), (40, 40))])
def test_crops_are_pil_bicubic_resized_crops_of_torchvision_boxes(photo, global_size, local_size):
    """With the photometric ops off, every crop is PIL's crop(box).resize(size, BICUBIC) -- torchvision's semantics,
    antialiased when shrinking -- up to one grey level (torch's antialiased bicubic resampling). The second case
    enlarges most crops, some along one axis only."""
    aug = tiny_augmentation(global_crop_size=global_size, local_crop_size=local_size, num_local_crops=6)
    disable_photometric_ops(aug)
    global_crops, local_crops = aug.crops_uint8(photo, rng=7)
    replay = np.random.default_rng(7)
    replay.integers(0, 2**63)  # the per-image seed of the albumentations random stream
    for crop, size, scale in [
        (global_crops[0], global_size, aug.global_crops_scale),
        (global_crops[1], global_size, aug.global_crops_scale),
        *[(local, local_size, aug.local_crops_scale) for local in local_crops],
    ]:
        top, left, h, w = sample_crop_box(replay, photo.width, photo.height, scale, aug.ratio)
        expected = photo.crop((left, top, left + w, top + h)).resize(
            (size[1], size[0]), Image.Resampling.BICUBIC
        )
        same_direction = (h >= size[0]) == (w >= size[1])
        if same_direction:
            assert _diff(crop, expected).max() <= 1
        else:  # Pillow 13 runs its two passes in the other order here: rounding at strong edges differs
            assert _diff(crop, expected).mean() < 0.3
        # OpenCV's bicubic (albumentations' RandomResizedCrop) neither antialiases nor uses PIL's kernel.
        opencv = cv2.resize(
            np.asarray(photo)[top : top + h, left : left + w], (size[1], size[0]), cv2.INTER_CUBIC
        )
        assert _diff(opencv, expected).mean() > 3 * _diff(crop, expected).mean()


# ------------------------------------------------------------------------------------------- recipe structure


def test_recipe_op_lists_and_probabilities():
    aug = MultiCropAugmentation()
    for pipeline in (aug.global_1_transforms, aug.global_2_transforms, aug.local_transforms):
        flip, jitter, gray = pipeline.transforms[:3]
        assert isinstance(flip, A.HorizontalFlip) and flip.p == 0.5
        assert isinstance(jitter, A.ColorJitter) and jitter.p == 0.8
        assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
        assert jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)
        assert isinstance(gray, A.ToGray) and gray.p == 0.2 and gray.num_output_channels == 3
    blur_p = [[t.p for t in p.transforms if isinstance(t, PILGaussianBlur)] for p in _pipelines(aug)]
    assert blur_p == [[1.0], [0.1], [0.5]]
    for pipeline in _pipelines(aug):
        blur = next(t for t in pipeline.transforms if isinstance(t, PILGaussianBlur))
        assert blur.sigma_limit == (0.1, 2.0)
    solarize = [[t for t in p.transforms if isinstance(t, A.Solarize)] for p in _pipelines(aug)]
    assert [len(s) for s in solarize] == [0, 1, 0]  # global crop 2 only
    assert solarize[1][0].p == 0.2


def _pipelines(aug):
    return (aug.global_1_transforms, aug.global_2_transforms, aug.local_transforms)


def test_solarisation_applies_to_global_crop_2_only(photo):
    """Force every solarisation op to p=1 and the rest to 0: only global crop 2 is PIL-solarised."""
    aug = tiny_augmentation()
    disable_photometric_ops(aug, keep=A.Solarize)
    global_crops, local_crops = aug.crops_uint8(photo, rng=3)
    reference = tiny_augmentation()
    disable_photometric_ops(reference)
    plain_globals, plain_locals = reference.crops_uint8(photo, rng=3)
    np.testing.assert_array_equal(global_crops[0], plain_globals[0])
    np.testing.assert_array_equal(
        global_crops[1], np.asarray(ImageOps.solarize(Image.fromarray(plain_globals[1])))
    )
    assert not np.array_equal(global_crops[1], plain_globals[1])
    np.testing.assert_array_equal(local_crops, plain_locals)


def test_decisions_are_independent_and_follow_the_recipe_probabilities(photo, monkeypatch):
    """Count every apply / skip decision over many images (albumentations' per-transform seeding would correlate
    them: with identical streams, 'flipped' would imply 'colour-jittered')."""
    aug = MultiCropAugmentation(global_crop_size=8, local_crop_size=8, num_local_crops=8)
    decisions = record_decisions(monkeypatch, zip(("global_1", "global_2", "local"), _pipelines(aug)))
    small = photo.resize((24, 18))
    for seed in range(300):
        aug.crops_uint8(small, rng=seed)

    def rate(crop: str, op: str) -> float:
        values = [applied for c, o, applied in decisions if c == crop and o == op]
        return float(np.mean(values)), len(values)

    def within(crop, op, p):
        value, n = rate(crop, op)
        assert abs(value - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (crop, op, value, p)

    for crop in ("global_1", "global_2", "local"):
        within(crop, "HorizontalFlip", 0.5)
        within(crop, "ColorJitter", 0.8)
        within(crop, "ToGray", 0.2)
    within("global_1", "PILGaussianBlur", 1.0)
    within("global_2", "PILGaussianBlur", 0.1)
    within("local", "PILGaussianBlur", 0.5)
    within("global_2", "Solarize", 0.2)
    # Joint decisions within a crop: flip and jitter are independent (P(flip and not jitter) = 0.1).
    per_crop = []
    for _, op, applied in decisions:
        if op == "HorizontalFlip":  # the first op of every crop's pipeline
            per_crop.append({})
        per_crop[-1][op] = applied
    assert len(per_crop) == 300 * 10
    flip_no_jitter = np.mean([crop["HorizontalFlip"] and not crop["ColorJitter"] for crop in per_crop])
    assert 0.07 < flip_no_jitter < 0.13


# ------------------------------------------------------------------------- op semantics vs PIL (torchvision's ops)


def _jitter(aug):
    return aug.global_1_transforms.transforms[1]


def _pil_adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    """torchvision.transforms.functional_pil.adjust_hue."""
    h, s, v = image.convert("HSV").split()
    hue = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        hue += np.int32(factor * 255).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


def _diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a).astype(np.int64) - np.asarray(b).astype(np.int64))


@pytest.mark.parametrize("factor", [0.6, 0.85, 1.2, 1.4])
def test_brightness_contrast_saturation_match_pil_enhance(photo_array, factor):
    jitter = _jitter(MultiCropAugmentation())
    pil = Image.fromarray(photo_array)
    neutral = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "order": [0, 1, 2, 3]}
    cases = {
        "brightness": ImageEnhance.Brightness(pil).enhance(factor),
        "contrast": ImageEnhance.Contrast(pil).enhance(factor),
        "saturation": ImageEnhance.Color(pil).enhance(factor),
    }
    for name, expected in cases.items():
        out = jitter.apply(photo_array.copy(), **{**neutral, name: factor})
        assert _diff(out, expected).max() <= 1, name
        assert _diff(out, photo_array).max() > 5, name  # the op did something


@pytest.mark.parametrize("factor", [-0.1, -0.04, 0.05, 0.1])
def test_hue_shift_matches_torchvision_pil_hue_up_to_quantisation(photo_array, factor):
    jitter = _jitter(MultiCropAugmentation())
    neutral = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "order": [0, 1, 2, 3]}
    out = jitter.apply(photo_array.copy(), hue=factor, **neutral)
    expected = _pil_adjust_hue(Image.fromarray(photo_array), factor)
    difference = _diff(out, expected)
    assert difference.mean() < 1.0 and difference.max() <= 12
    assert _diff(expected, photo_array).mean() > 2.5 * difference.mean() + 1.0  # far from "no shift"


def test_grayscale_matches_pil_luma(photo_array):
    gray = MultiCropAugmentation().global_1_transforms.transforms[2]
    out = gray.apply(photo_array.copy())
    expected = np.asarray(Image.fromarray(photo_array).convert("L"))
    assert out.shape == photo_array.shape
    assert _diff(out, np.stack([expected] * 3, axis=-1)).max() <= 1


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.6, 1.2, 2.0])
def test_blur_matches_pil_gaussian_blur_radius(photo_array, sigma):
    blur = PILGaussianBlur(sigma_limit=(sigma, sigma), p=1.0)
    out = blur(image=photo_array.copy())["image"]
    expected = np.asarray(Image.fromarray(photo_array).filter(ImageFilter.GaussianBlur(sigma)))
    inner = (slice(4, -4), slice(4, -4))
    assert _diff(out, expected)[inner].max() <= 3  # PIL rounds after each of its 6 box passes
    assert _diff(out, expected).mean() < 0.6
    if sigma >= 0.3:  # a radius off by a factor 2 is clearly distinguishable
        for other in (sigma / 2, sigma * 2):
            wrong = np.asarray(Image.fromarray(photo_array).filter(ImageFilter.GaussianBlur(other)))
            assert _diff(out, wrong).mean() > 2 * _diff(out, expected).mean()


def test_pil_kernel_has_unit_mass_and_the_requested_variance():
    for sigma in (0.1, 0.5, 1.0, 1.7, 2.0):
        kernel = pil_gaussian_kernel_1d(sigma)
        offsets = np.arange(len(kernel)) - len(kernel) // 2
        assert kernel.sum() == pytest.approx(1.0)
        assert (kernel * offsets**2).sum() == pytest.approx(sigma**2, rel=1e-6)


def test_solarize_matches_pil_threshold_128():
    aug = MultiCropAugmentation()
    solarize = next(t for t in aug.global_2_transforms.transforms if isinstance(t, A.Solarize))
    ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    out = A.Compose([A.Solarize(threshold_range=solarize.threshold_range, p=1.0)])(image=ramp)["image"]
    np.testing.assert_array_equal(out, np.asarray(ImageOps.solarize(Image.fromarray(ramp), threshold=128)))
