"""Joint image / mask transforms of segmentation fine-tuning keep the mask on the pixels it labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selfpatch_hf.data.segmentation.augmentation import (
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    photometric_distortion,
    prepare_mask,
)
from selfpatch_hf.image_conventions import IMAGENET_MEAN, IMAGENET_STD

# class k is painted in PALETTE[k]: the mask is computable from the pixels (none is black, the padding colour)
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]], np.uint8
)


def _blocky_scene(rng: np.random.Generator, height: int, width: int, cell: int = 16):
    """An image of coloured cells and its mask; label 255 (ignore) on one cell to follow it too."""
    grid = rng.integers(0, len(PALETTE), size=(height // cell + 1, width // cell + 1))
    labels = np.kron(grid, np.ones((cell, cell), np.int64))[:height, :width]
    image = PALETTE[labels]
    labels[:cell, :cell] = 255  # ignored pixels keep their colour
    return Image.fromarray(image), Image.fromarray(labels.astype(np.uint8))


def _colours(pixel_values: np.ndarray) -> np.ndarray:
    """Normalised (3, H, W) -> (H, W, 3) colours in 0..255."""
    return pixel_values.transpose(1, 2, 0) * np.array(IMAGENET_STD) * 255 + np.array(IMAGENET_MEAN) * 255


@pytest.mark.parametrize("seed", range(12))
def test_rescale_crop_flip_and_padding_keep_the_mask_on_its_pixels(seed):
    rng = np.random.default_rng(seed)
    image, mask = _blocky_scene(rng, int(rng.integers(60, 140)), int(rng.integers(60, 140)))
    transform = SegmentationTrainTransform(
        crop_size=(96, 80), scale=(128, 96), ratio_range=(0.5, 2.0), photometric=False
    )
    pixel_values, labels = transform(image, mask, rng)
    assert pixel_values.shape == (3, 96, 80) and labels.shape == (96, 80)

    colours = _colours(pixel_values)
    distance = np.linalg.norm(colours[:, :, None, :] - PALETTE[None, None].astype(float), axis=-1)
    nearest, gap = distance.argmin(-1), distance.min(-1)
    pure = gap < 1.0  # away from bilinear blends at cell borders
    scored = pure & (labels != 255)
    assert scored.mean() > 0.3, "too few pure pixels to judge"
    # every pure-coloured labelled pixel carries the class of its colour
    np.testing.assert_array_equal(labels[scored], nearest[scored])
    # padding: black pixels, ignored labels, and nothing else is black
    black = np.linalg.norm(colours, axis=-1) < 1.0
    np.testing.assert_array_equal(labels[black], 255)


def test_flip_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    image, mask = _blocky_scene(rng, 64, 64)
    plain = SegmentationTrainTransform(
        crop_size=64, scale=64, ratio_range=(1, 1), flip_prob=0.0, photometric=False
    )
    flipped = SegmentationTrainTransform(
        crop_size=64, scale=64, ratio_range=(1, 1), flip_prob=1.0, photometric=False
    )
    pixels_a, labels_a = plain(image, mask, np.random.default_rng(1))
    pixels_b, labels_b = flipped(image, mask, np.random.default_rng(1))
    np.testing.assert_array_equal(labels_b, labels_a[:, ::-1])
    np.testing.assert_allclose(pixels_b, pixels_a[:, :, ::-1])
    np.testing.assert_array_equal(labels_a, np.asarray(mask))  # ratio 1, crop = image: untouched


def test_photometric_distortion_changes_colours_only():
    rng = np.random.default_rng(0)
    image, mask = _blocky_scene(rng, 64, 64)
    kwargs = dict(crop_size=48, scale=64, ratio_range=(0.75, 1.5), flip_prob=0.5)
    with_jitter = SegmentationTrainTransform(photometric=True, **kwargs)
    without = SegmentationTrainTransform(photometric=False, **kwargs)
    changed = 0
    for seed in range(6):
        # same geometry: the photometric draws come after the geometric ones
        pixels_a, labels_a = with_jitter(image, mask, np.random.default_rng(seed))
        pixels_b, labels_b = without(image, mask, np.random.default_rng(seed))
        np.testing.assert_array_equal(labels_a, labels_b)
        changed += not np.allclose(pixels_a, pixels_b)
    assert changed >= 4
    jittered = photometric_distortion(np.asarray(image, np.float32), np.random.default_rng(3))
    assert jittered.min() >= 0 and jittered.max() <= 255


def test_reduce_labels_and_evaluation_resize():
    image = Image.fromarray(np.zeros((30, 60, 3), np.uint8))
    mask = np.array([[0, 1, 150, 255]] * 30, np.uint8).repeat(15, axis=1)
    pixels, labels = SegmentationEvalTransform(scale=(64, 16), reduce_labels=True)(image, mask)
    assert pixels.shape == (3, 16, 32)  # short side 16, aspect ratio kept
    assert labels.shape == (30, 60)  # ground truth at full resolution
    assert set(np.unique(labels)) == {255, 0, 149}
    with pytest.raises(ValueError, match="its mask is 60x10 pixels but its image 60x30"):
        SegmentationTrainTransform(crop_size=16, scale=16)(image, mask[:10], np.random.default_rng(0))


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="TIFF" if array.dtype == np.float32 else "PNG")
    return buffer.getvalue()


def _dataset(masks: list[bytes], images: list[bytes] | None = None):
    import datasets

    from selfpatch_hf.data.samples.synthetic_scenes import segmentation_features

    images = images or [_png(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(len(masks))]
    rows = {
        "image": [{"bytes": data, "path": None} for data in images],
        "mask": [{"bytes": data, "path": None} for data in masks],
        "label": [0] * len(masks),
    }
    return datasets.Dataset.from_dict(rows, features=segmentation_features())


def test_float_masks_must_hold_whole_class_ids_not_be_truncated():
    from selfpatch_hf.evaluation.linear_probe import _mask_array
    from selfpatch_hf.evaluation.semseg_metrics import MaskValueError

    whole = Image.fromarray(np.array([[0.0, 3.0], [255.0, 7.0]], np.float32), mode="F")
    assert prepare_mask(whole).tolist() == [[0, 3], [255, 7]]
    assert _mask_array(whole).tolist() == [[0, 3], [255, 7]]
    fractional = Image.fromarray(np.array([[0.0, 2.7], [1.0, 1.0]], np.float32), mode="F")
    for read in (prepare_mask, _mask_array):
        with pytest.raises(MaskValueError, match=r"no class ids \(e.g. 2.7; a float mask, PIL mode F\)"):
            read(fractional)
    with pytest.raises(MaskValueError, match="e.g. nan"):
        prepare_mask(np.array([[np.nan, 1.0]]))


def test_training_examples_that_cannot_be_decoded_are_replaced_and_bad_labels_are_named():
    from selfpatch_hf.data.segmentation.loading import SegmentationTrainSet, collate_segmentation
    from selfpatch_hf.data.unreadable_examples import SKIPPED_KEY, SkipUnreadable, collate_with_skipped

    good = _png(np.array([[0, 1] * 4] * 8, np.uint8))
    masks = [good, good[:20], good, good, _png(np.full((8, 8), 9, np.uint8))]
    images = [_png(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(5)]
    images[2] = images[2][:30]  # truncated image bytes
    transform = SegmentationTrainTransform(crop_size=8, scale=8, ratio_range=(1, 1), photometric=False)
    examples = SegmentationTrainSet(_dataset(masks, images), "image", "mask", transform, 0, num_labels=3)
    with pytest.raises(OSError, match="cannot decode example 1"):
        examples[(0, 1)]  # a truncated mask
    with pytest.raises(
        ValueError, match="training example 4: its mask holds label 9 but there are 3 classes"
    ):
        examples[(0, 4)]
    readable = SkipUnreadable(examples)
    (pixels, _), reasons = readable[(0, 1)]  # 1 and 2 cannot be decoded: 3 takes their place
    assert [reason.split(":")[0] for reason in reasons] == ["training example 1", "training example 2"]
    assert "cannot decode example 1" in reasons[0]
    assert pixels.mean() == pytest.approx(examples[(0, 3)][0].mean())
    (_, labels), reasons = readable[(0, 0)]
    assert reasons == [] and set(np.unique(labels)) <= {0, 1}
    batch = collate_with_skipped(collate_segmentation)([readable[(0, 0)], readable[(0, 1)]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and len(batch[SKIPPED_KEY]) == 2


def test_evaluation_masks_are_all_checked_before_training():
    from selfpatch_hf.data.segmentation.loading import SegmentationDataError, check_evaluation_masks

    good = _png(np.array([[0, 1] * 4] * 8, np.uint8))
    prepare = prepare_mask
    indices, skipped = check_evaluation_masks(
        _dataset([good, b"not a png", good]), "image", "mask", 2, 255, prepare
    )
    assert indices == [0, 2] and [item.index for item in skipped] == [1]
    for mask, message in (
        (
            _png(np.full((8, 8), 2, np.uint8)),
            "evaluation example 1: its mask holds label 2 but there are 2 classes",
        ),
        (_png(np.zeros((8, 6), np.uint8)), "evaluation example 1: its mask is 6x8 pixels but its image 8x8"),
        (
            _png(np.full((8, 8), 0.5, np.float32), "F"),
            "evaluation example 1: its mask holds values that are no",
        ),
    ):
        with pytest.raises(SegmentationDataError, match=message):
            check_evaluation_masks(_dataset([good, mask]), "image", "mask", 2, 255, prepare)
