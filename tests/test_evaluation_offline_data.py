"""Offline evaluation data: real-photograph cut-outs, DAVIS-layout sequences and the parquet segmentation set."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from selfpatch_hf.data.samples.synthetic_scenes import (
    IGNORE_INDEX,
    SEGMENTATION_CLASSES,
    STUFF_CLASSES,
    THING_CLASSES,
    Cutout,
    make_offline_data,
    make_segmentation_dataset,
    make_sequences,
    object_cutouts,
    render_cutout,
)
from selfpatch_hf.evaluation.davis import list_sequences, load_sequence, read_indexed_mask


def test_cutouts_are_real_images_with_masks():
    cutouts = object_cutouts()
    assert set(cutouts) == set(THING_CLASSES)
    assert len(cutouts["coin"]) >= 10  # individual coins segmented from the coins photograph
    for options in cutouts.values():
        for cutout in options:
            assert cutout.rgb.dtype == np.uint8 and cutout.rgb.shape[:2] == cutout.alpha.shape
            assert 0.0 <= cutout.alpha.min() and cutout.alpha.max() <= 1.0
            inside = cutout.alpha > 0.5
            assert 0.2 < inside.mean() < 1.0  # a real object region, not the whole rectangle
            assert cutout.rgb[inside].std() > 10  # photographic texture, not a flat colour


def test_render_cutout_geometry():
    alpha = np.zeros((20, 40), np.float32)
    alpha[:, :20] = 1.0  # left half is the object
    cutout = Cutout("test", np.full((20, 40, 3), 200, np.uint8), alpha)
    rgb, mask = render_cutout(cutout, (100, 100), center=(50, 50), size=80)  # scale 2
    assert mask.shape == (100, 100) and rgb.shape == (100, 100, 3)
    assert abs((mask > 0.5).sum() - 40 * 40) < 100
    assert mask[50, 30] > 0.5 and mask[50, 70] < 0.5  # object left of the centre
    _, rotated = render_cutout(cutout, (100, 100), center=(50, 50), size=80, angle=90)
    assert abs((rotated > 0.5).sum() - 40 * 40) < 100
    assert rotated[70, 50] > 0.5 and rotated[30, 50] < 0.5  # counter-clockwise on screen: left -> bottom
    _, flipped = render_cutout(cutout, (100, 100), center=(50, 50), size=80, flip=True)
    assert flipped[50, 70] > 0.5 and flipped[50, 30] < 0.5


def test_sequences_in_davis_layout(tmp_path):
    names = make_sequences(
        tmp_path, num_sequences=3, num_frames=8, frame_size=(48, 64), max_objects=3, seed=3
    )
    assert list_sequences(tmp_path) == names and len(set(names)) == 3
    for index, name in enumerate(names):
        sequence = load_sequence(tmp_path, name)
        assert len(sequence.frames) == len(sequence.annotations) == 8
        with Image.open(sequence.frames[0]) as frame:
            assert frame.format == "JPEG" and frame.size == (64, 48)
        masks = np.stack([read_indexed_mask(p) for p in sequence.annotations])
        num_objects = 1 + index % 3
        assert masks[0].max() == num_objects
        assert set(np.unique(masks[0])) == set(range(num_objects + 1))  # every object visible in frame 0
        assert (masks[0] != masks[-1]).mean() > 0.01  # the objects move
    again = tmp_path / "again"
    make_sequences(again, num_sequences=1, num_frames=4, frame_size=(48, 64), seed=3)
    np.testing.assert_array_equal(
        read_indexed_mask(again / "Annotations/480p" / names[0] / "00003.png"),
        read_indexed_mask(tmp_path / "Annotations/480p" / names[0] / "00003.png"),
    )
    with pytest.raises(ValueError, match="num_frames"):
        make_sequences(tmp_path / "x", num_frames=2)


def test_segmentation_dataset(tmp_path):
    dataset = make_segmentation_dataset(tmp_path, num_train=10, num_eval=4, image_size=64, seed=0)
    assert dataset["train"].num_rows == 10 and dataset["validation"].num_rows == 4
    loaded = datasets.load_dataset(str(tmp_path))
    assert loaded["validation"].num_rows == 4
    assert isinstance(loaded["train"].features["mask"], datasets.Image)
    assert loaded["train"].features["label"].names == list(THING_CLASSES)
    for example in loaded["train"]:
        assert example["image"].size == (64, 64) and example["image"].mode == "RGB"
        mask = np.asarray(example["mask"])
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(SEGMENTATION_CLASSES))) | {IGNORE_INDEX}
        assert len(STUFF_CLASSES) + example["label"] in values  # the image's thing is in its mask
        assert IGNORE_INDEX in values and (mask == IGNORE_INDEX).mean() < 0.2  # only blended edges


def test_make_offline_data_says_synthetic(tmp_path):
    info = make_offline_data(
        tmp_path, num_sequences=1, num_frames=3, frame_size=(32, 48), num_train=2, num_eval=2, image_size=32
    )
    readme = (tmp_path / "README.md").read_text()
    assert "Synthetic compositions of real photographs" in readme and "Not DAVIS" in readme
    saved = json.loads((tmp_path / "offline_data.json").read_text())
    assert saved["sequences"] == info["sequences"] and "synthetic" in saved["note"].lower()
    assert (tmp_path / "davis/ImageSets/2017/val.txt").is_file()
    assert (tmp_path / "segmentation/data/train-00000-of-00001.parquet").is_file()
