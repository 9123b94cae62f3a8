"""MoBY's two-view BYOL augmentation as a recipe of `MultiCropAugmentation` (public code: Transformer-SSL,
`data/build.py`): two 224 px views, RandomResizedCrop scale (0.08, 1) with bilinear resampling, flip, colour jitter
(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, blur p=1.0 / 0.1, solarisation p=0 / 0.2, no local crops."""

from __future__ import annotations

import io
import math

import albumentations as A
import datasets
import numpy as np
import pytest
import skimage.data
import torch
from augmentation_probes import record_decisions
from PIL import Image

from selfpatch_hf.data import augmentation as augmentation_module
from selfpatch_hf.data.augmentation import AUGMENTATION_RECIPES, MultiCropAugmentation, PILGaussianBlur
from selfpatch_hf.data.streaming import build_pretraining_dataloader


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((120, 90), Image.Resampling.BICUBIC)


def _pipelines(aug):
    return aug.global_1_transforms, aug.global_2_transforms


def _off(aug: MultiCropAugmentation) -> MultiCropAugmentation:
    """Every photometric op off: the crops are bare resized crops."""
    for pipeline in (aug.global_1_transforms, aug.global_2_transforms, aug.local_transforms):
        for transform in pipeline.transforms:
            transform.p = 0.0
    return aug


def _diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a).astype(np.int64) - np.asarray(b).astype(np.int64))


def test_moby_recipe_parameters(photo):
    aug = MultiCropAugmentation.from_recipe("moby")
    assert aug.global_crop_size == (224, 224) and aug.num_global_crops == 2 and aug.num_local_crops == 0
    assert aug.global_crops_scale == (0.08, 1.0) and aug.ratio == pytest.approx((3 / 4, 4 / 3))
    assert aug.interpolation == "bilinear"  # torchvision's RandomResizedCrop default, which MoBY keeps
    assert aug.mean == (0.485, 0.456, 0.406) and aug.std == (0.229, 0.224, 0.225)
    for pipeline in _pipelines(aug):
        flip, jitter, gray = pipeline.transforms[:3]
        assert isinstance(flip, A.HorizontalFlip) and flip.p == 0.5
        assert isinstance(jitter, A.ColorJitter) and jitter.p == 0.8
        assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
        assert jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)
        assert isinstance(gray, A.ToGray) and gray.p == 0.2
    blur = [[t for t in p.transforms if isinstance(t, PILGaussianBlur)] for p in _pipelines(aug)]
    assert [b[0].p for b in blur] == [1.0, 0.1] and all(b[0].sigma_limit == (0.1, 2.0) for b in blur)
    solarize = [[t.p for t in p.transforms if isinstance(t, A.Solarize)] for p in _pipelines(aug)]
    assert solarize == [[], [0.2]]

    views, local = MultiCropAugmentation.from_recipe("moby", global_crop_size=32)(photo, rng=0)
    assert views.shape == (2, 3, 32, 32) and local.shape[0] == 0

    # the other recipes keep their reference values
    assert MultiCropAugmentation.from_recipe("selfpatch").global_crops_scale == (0.25, 1.0)
    dino = MultiCropAugmentation.from_recipe("dino")
    assert dino.global_crops_scale == (0.4, 1.0) and dino.local_crops_scale == (0.05, 0.4)
    assert dino.interpolation == "bicubic" and set(AUGMENTATION_RECIPES) == {"selfpatch", "dino", "moby"}
    with pytest.raises(
        ValueError, match="Unknown augmentation recipe 'byol'; choose one of selfpatch, dino, moby"
    ):
        MultiCropAugmentation.from_recipe("byol")
    with pytest.raises(ValueError, match="interpolation must be one of"):
        MultiCropAugmentation(interpolation="nearest")


def test_views_are_pil_bilinear_resized_crops_of_scale_008_to_1(photo, monkeypatch):
    """With the photometric ops off, each view is PIL's crop(box).resize(size, BILINEAR) (what torchvision runs on
    a PIL image) within one grey level, and visibly not the bicubic resampling of the DINO recipe."""
    boxes = []

    def recording(rng, width, height, scale, ratio):
        box = sample(rng, width, height, scale, ratio)
        boxes.append((scale, box))
        return box

    sample = augmentation_module.sample_crop_box
    monkeypatch.setattr(augmentation_module, "sample_crop_box", recording)
    aug = _off(MultiCropAugmentation.from_recipe("moby", global_crop_size=(24, 28)))
    bicubic_gap, bilinear_gap = [], []
    for seed in range(6):
        boxes.clear()
        views, _ = aug.crops_uint8(photo, rng=seed)
        assert len(boxes) == 2 and all(scale == (0.08, 1.0) for scale, _ in boxes)
        for view, (_, (top, left, h, w)) in zip(views, boxes):
            crop = photo.crop((left, top, left + w, top + h))
            bilinear = crop.resize((28, 24), Image.Resampling.BILINEAR)
            if (h >= 24) == (w >= 28):  # same direction on both axes (else Pillow's pass order rounds apart)
                assert _diff(view, bilinear).max() <= 1
            bilinear_gap.append(_diff(view, bilinear).mean())
            bicubic_gap.append(_diff(view, crop.resize((28, 24), Image.Resampling.BICUBIC)).mean())
    assert np.mean(bilinear_gap) < 0.3 < np.mean(bicubic_gap)


def test_moby_crop_areas_and_photometric_decisions_follow_the_recipe(photo, monkeypatch):
    """Over many images: the crop area fraction spans (0.08, 1), and every op is applied at the recipe's rate (blur
    1.0 / 0.1, solarisation 0 / 0.2)."""
    aug = MultiCropAugmentation.from_recipe("moby", global_crop_size=8)
    decisions = record_decisions(monkeypatch, enumerate(_pipelines(aug)))
    fractions = []
    sample = augmentation_module.sample_crop_box

    def recording(rng, width, height, scale, ratio):
        top, left, h, w = sample(rng, width, height, scale, ratio)
        fractions.append(h * w / (width * height))
        return top, left, h, w

    monkeypatch.setattr(augmentation_module, "sample_crop_box", recording)
    large = photo.resize((400, 400))
    for seed in range(300):
        aug.crops_uint8(large, rng=seed)

    fractions = np.asarray(fractions)
    assert len(fractions) == 600 and fractions.min() >= 0.075 and fractions.max() <= 1.0
    # a uniform area draw in (0.08, 1) puts 18% below 0.25 (a little more after torchvision's rejection of boxes that
    # do not fit); the SelfPatch/DINO recipes never go below 0.25 / 0.4
    assert 0.12 < (fractions < 0.25).mean() < 0.35 and fractions.max() > 0.9

    def within(view: int, op: str, p: float) -> None:
        values = [applied for v, o, applied in decisions if v == view and o == op]
        assert len(values) == 300
        rate = float(np.mean(values))
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / 300) + 1e-9, (view, op, rate, p)

    for view in (0, 1):
        within(view, "HorizontalFlip", 0.5)
        within(view, "ColorJitter", 0.8)
        within(view, "ToGray", 0.2)
    within(0, "PILGaussianBlur", 1.0)
    within(1, "PILGaussianBlur", 0.1)
    within(1, "Solarize", 0.2)
    assert not any(op == "Solarize" for view, op, _ in decisions if view == 0)


def test_the_data_pipeline_takes_the_recipe_by_name(tmp_path):
    rows = []
    for seed in range(5):
        pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        rows.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image()})
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(
        str(tmp_path / "data/train-00000.parquet")
    )
    loader = build_pretraining_dataloader(
        str(tmp_path / "data"), "moby", batch_size=2, num_workers=0, shuffle_buffer_size=0
    )
    assert loader.augmentation.interpolation == "bilinear" and loader.augmentation.num_local_crops == 0
    views, local = next(iter(loader))
    assert views.shape == (2, 2, 3, 224, 224) and views.dtype == torch.float32 and local.shape[1] == 0
