"""Detection / instance data: the offline instance set, COCO-layout sources (Hub layout and COCO json), the checks
on bad annotations, joint augmentation of image, boxes and masks, and the detectors' label formats."""

from __future__ import annotations

import json
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from transformers import DeformableDetrImageProcessorPil

from selfpatch_hf.data.detection.augmentation import (
    DetectionAugmentation,
    DetectionSample,
    DetectionTrainTransform,
    normalize_image,
)
from selfpatch_hf.data.detection.batching import collate_detection
from selfpatch_hf.data.detection.instances import AnnotationIssues, Instances, check_instances, mask_box
from selfpatch_hf.data.detection.sources import (
    CocoJsonSource,
    DetectionExample,
    HubDetectionSource,
    load_detection_source,
)
from selfpatch_hf.data.samples.instance_scenes import NEGATIVE_FRACTION, make_instance_dataset
from selfpatch_hf.data.samples.photo_cutouts import THING_CLASSES


@pytest.fixture(scope="module")
def instance_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instances")
    make_instance_dataset(
        folder, num_train=24, num_eval=6, image_size=(96, 128), max_objects=4, seed=0, coco_json=True
    )
    return folder


def test_offline_instances_in_the_hub_coco_layout(instance_set):
    loaded = datasets.load_dataset(str(instance_set))
    train = loaded["train"]
    assert set(train.column_names) == {"image_id", "image", "width", "height", "objects"}
    assert train.features["objects"]["category"].feature.names == list(THING_CLASSES)
    counts, ids = [], set()
    for row in train:
        assert row["image"].size == (128, 96) and (row["width"], row["height"]) == (128, 96)
        objects = row["objects"]
        counts.append(len(objects["id"]))
        ids.update(objects["id"])
        for box, area, rle in zip(objects["bbox"], objects["area"], objects["segmentation"]):
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            x0, y0, x1, y1 = mask_box(mask)
            assert box == pytest.approx([x0, y0, x1 - x0, y1 - y0])  # the box is the mask's
            assert area == mask.sum() >= 16
    assert max(counts) >= 3 and sum(counts) == len(ids)  # several objects per image, ids unique
    assert NEGATIVE_FRACTION > 0  # negatives exist in larger sets; 24 images may hold none


def test_coco_json_and_parquet_hold_the_same_instances(instance_set):
    hub = load_detection_source(instance_set, "validation")
    coco = load_detection_source(instance_set / "coco/annotations/instances_validation.json", "validation")
    assert isinstance(hub, HubDetectionSource) and isinstance(coco, CocoJsonSource)
    assert hub.label_names == coco.label_names == list(THING_CLASSES)
    assert coco.category_ids == list(range(1, len(THING_CLASSES) + 1))  # the json numbers categories from 1
    assert len(hub) == len(coco) == 6
    for index in range(len(hub)):
        a, b = hub[index], coco[index]
        assert a.image_id == b.image_id
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
        for field in ("boxes", "labels", "masks", "iscrowd", "areas", "ids"):
            np.testing.assert_array_equal(getattr(a.instances, field), getattr(b.instances, field))


def _objects(*boxes, category=0, **extra):
    return [{"bbox": box, "category": category, "id": index, **extra} for index, box in enumerate(boxes)]


def test_bad_boxes_are_clipped_or_dropped_counted_and_logged_once(caplog):
    issues = AnnotationIssues()
    with caplog.at_level(logging.WARNING, logger="selfpatch_hf.data.detection.instances"):
        instances = check_instances(
            _objects([-5, 10, 20, 20], [10, 10, 0, 5], [200, 10, 5, 5], [90, 80, 30, 30], [5, 5, 10, 10]),
            100, 100, 3, image_id=7, issues=issues,
        )  # fmt: skip
        check_instances(_objects([-1, -1, 5, 5]), 100, 100, 3, image_id=8, issues=issues)
    np.testing.assert_array_equal(instances.boxes, [[0, 10, 15, 30], [90, 80, 100, 100], [5, 5, 15, 15]])
    assert issues.clipped_boxes == 3 and issues.dropped_empty_boxes == 2 and issues.objects == 4
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # one line per kind, naming the first image
    assert any("image 7, object 0" in m and "clipped" in m for m in messages)
    assert any("image 7, object 1" in m and "dropped" in m for m in messages)
    xyxy = check_instances(_objects([10, 10, 30, 40]), 100, 100, 1, image_id=1, box_format="xyxy")
    np.testing.assert_array_equal(xyxy.boxes, [[10, 10, 30, 40]])


def test_category_ids_beyond_the_label_map_are_refused():
    with pytest.raises(
        ValueError, match=r"image 3, object 0: category id 5 is outside the label map \(ids 0..4\)"
    ):
        check_instances(_objects([1, 1, 5, 5], category=5), 10, 10, 5, image_id=3)


def test_images_without_objects_are_kept_as_negatives():
    issues = AnnotationIssues()
    instances = check_instances([], 40, 60, 2, image_id=1, with_masks=True, issues=issues)
    assert len(instances) == 0 and instances.masks.shape == (0, 40, 60) and issues.images_without_objects == 1


def test_masks_are_read_from_polygons_and_rle_and_checked_against_their_box():
    height, width = 40, 50
    square = np.zeros((height, width), np.uint8)
    square[10:20, 5:25] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    objects = [
        {"bbox": [5, 10, 20, 10], "category": 0, "segmentation": [[5, 10, 25, 10, 25, 20, 5, 20]]},  # polygon
        {"bbox": [5, 10, 20, 10], "category": 1, "segmentation": {"size": [40, 50], "counts": rle["counts"].decode()}},
        {"bbox": [5, 10, 20, 10], "category": 1, "iscrowd": 1,  # uncompressed RLE, COCO's crowd regions
         "segmentation": {"size": [40, 50], "counts": [10 * 40 + 10 + 0, 10, 30, 10]}},
        {"bbox": [30, 25, 15, 10], "category": 0, "segmentation": {"size": [40, 50], "counts": rle["counts"].decode()}},
    ]  # fmt: skip
    issues = AnnotationIssues()
    instances = check_instances(objects, height, width, 2, image_id=4, with_masks=True, issues=issues)
    assert len(instances) == 3 and issues.dropped_mask_mismatches == 1  # the last mask lies elsewhere
    assert instances.masks[1].sum() == 200 and (instances.masks[0] == square).mean() > 0.95
    assert instances.iscrowd.tolist() == [False, False, True]
    assert instances.areas.tolist() == [instances.masks[0].sum(), 200, instances.masks[2].sum()]
    with pytest.raises(ValueError, match="image 4, object 0: cannot read its segmentation"):
        check_instances([{"bbox": [1, 1, 2, 2], "category": 0, "segmentation": [[1, 2]]}], 10, 10, 1, image_id=4,
                        with_masks=True)  # fmt: skip


def _toy_dataset(objects_feature, rows):
    features = datasets.Features({"image": datasets.Image(), "objects": objects_feature})
    image = Image.new("RGB", (32, 24))
    return datasets.Dataset.from_dict({"image": [image] * len(rows), "objects": rows}, features=features)


def test_hub_sources_find_or_name_their_columns():
    box = datasets.List(datasets.Value("float32"), length=4)
    dict_of_lists = _toy_dataset(
        datasets.Sequence({"bbox": box, "category": datasets.ClassLabel(names=["a", "b"]), "keypoints": box}),
        [{"bbox": [[1, 1, 4, 4]], "category": [1], "keypoints": [[0, 0, 0, 0]]}],
    )
    source = HubDetectionSource(dict_of_lists)
    assert source.label_names == ["a", "b"] and not source.with_masks
    assert source[0].instances.labels.tolist() == [1]
    by_name = _toy_dataset(
        datasets.List({"bbox": box, "label": datasets.Value("string")}),
        [[{"bbox": [1, 1, 4, 4], "label": "cat"}, {"bbox": [2, 2, 3, 3], "label": "dog"}]],
    )
    source = HubDetectionSource(by_name, label_names=["dog", "cat"])
    assert source[0].instances.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="no category field 'cls'; its fields are"):
        HubDetectionSource(dict_of_lists, category_field="cls")
    with pytest.raises(ValueError, match="no image column 'picture'"):
        HubDetectionSource(dict_of_lists, image_column="picture")
    with pytest.raises(ValueError, match="pass label_names"):
        HubDetectionSource(
            _toy_dataset(datasets.List({"bbox": box, "category": datasets.Value("int64")}), [[]])
        )
    with pytest.raises(ValueError, match="no segmentation field"):
        HubDetectionSource(dict_of_lists, with_masks=True)
    with pytest.raises(ValueError, match="image 0: category 'cat' is not in label_names"):
        HubDetectionSource(by_name, label_names=["dog"])[0]


def _painted_scene(rng):
    """A scene whose instances are computable from its pixels: flat, distinct colours on black."""
    height, width = 120, 160
    image = np.zeros((height, width, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    masks, boxes = [], []
    yy, xx = np.mgrid[:height, :width]
    for colour in colours:
        cy, cx = rng.uniform(20, height - 20), rng.uniform(20, width - 20)
        ry, rx = rng.uniform(8, 18), rng.uniform(8, 25)
        mask = (
            (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & ~np.any(masks, axis=0)
            if masks
            else (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
        )
        image[mask] = colour
        masks.append(mask)
        boxes.append(mask_box(mask))
    instances = Instances(
        boxes=np.stack(boxes), labels=np.arange(4), masks=np.stack(masks).astype(np.uint8),
        iscrowd=np.zeros(4, bool), areas=np.stack(masks).sum((1, 2)).astype(np.float32), ids=np.arange(4),
    )  # fmt: skip
    return image, instances, colours


def test_joint_augmentation_keeps_boxes_and_masks_on_their_objects():
    transform = DetectionTrainTransform(
        DetectionAugmentation(
            scales=(96, 128, 160), max_size=240, crop_scales=(100, 120), crop_size=(60, 100)
        )
    )
    seen_sizes, crops = set(), 0
    for seed in range(12):
        image, instances, colours = _painted_scene(np.random.default_rng(seed))
        out_image, out = transform.augment(image, instances, np.random.default_rng([seed, 1]))
        seen_sizes.add(out_image.shape[:2])
        crops += len(out) < len(instances)
        assert out.masks.shape == (len(out), *out_image.shape[:2])
        for box, label, mask in zip(out.boxes, out.labels, out.masks):
            # pixels of the object's colour (bilinear edges blend: take clearly coloured pixels)
            painted = np.all(np.abs(out_image.astype(int) - colours[label]) < 60, axis=-1)
            iou = (painted & (mask > 0)).sum() / ((painted | (mask > 0)).sum())
            assert iou > 0.75, (seed, label, iou)
            np.testing.assert_array_equal(box, mask_box(mask))  # boxes are the masks' after crops
        # without masks the boxes alone move with the pixels: each frames its object's painted pixels
        boxes_only = instances.select(np.arange(len(instances)))
        boxes_only.masks = None
        out_image, out = transform.augment(image, boxes_only, np.random.default_rng([seed, 1]))
        for box, label in zip(out.boxes, out.labels):
            painted = np.all(np.abs(out_image.astype(int) - colours[label]) < 60, axis=-1)
            inside = painted[int(box[1]) : int(np.ceil(box[3])), int(box[0]) : int(np.ceil(box[2]))].sum()
            assert inside >= 0.97 * painted.sum() > 0  # nothing of the object outside its box
            if (
                box[0] > 1
                and box[1] > 1
                and box[2] < out_image.shape[1] - 1
                and box[3] < out_image.shape[0] - 1
            ):
                # an object no crop cut: its box is its painted extent (to the blended edge pixels)
                np.testing.assert_allclose(box, mask_box(painted), atol=2.0)
    assert len(seen_sizes) > 3 and crops > 0  # multi-scale, and some crops cut objects away
    # reproducible from the generator's seed, and not the same for another seed
    image, instances, _ = _painted_scene(np.random.default_rng(0))
    first = transform.augment(image, instances, np.random.default_rng(5))
    again = transform.augment(image, instances, np.random.default_rng(5))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1].boxes, again[1].boxes)
    others = {transform.augment(image, instances, np.random.default_rng(s))[0].shape for s in range(8)}
    assert len(others) > 1


def test_crowd_regions_stay_out_of_training_targets():
    image, instances, _ = _painted_scene(np.random.default_rng(0))
    instances.iscrowd[1] = True
    transform = DetectionTrainTransform(DetectionAugmentation(scales=(120,), max_size=200, crop_scales=None))
    _, out = transform.augment(image, instances, np.random.default_rng(0))
    assert 1 not in out.labels.tolist() and len(out) == 3


def test_detr_labels_equal_the_image_processors():
    rng = np.random.default_rng(0)
    samples, images, annotations = [], [], []
    for index, (height, width) in enumerate([(40, 60), (50, 30)]):
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        boxes = np.array([[10, 5, 30, 15], [2, 3, 20, 35]], np.float32)[: index + 1]
        labels = np.array([3, 1])[: index + 1]
        instances = Instances(boxes, labels, None, np.zeros(len(labels), bool), np.ones(len(labels)), labels)
        samples.append(DetectionSample(index, normalize_image(image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                       instances))  # fmt: skip
        images.append(image)
        annotations.append({"image_id": index, "annotations": [
            {"bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "category_id": int(c), "area": 1.0, "iscrowd": 0}
            for b, c in zip(boxes, labels)]})  # fmt: skip
    processor = DeformableDetrImageProcessorPil(do_resize=False, format="coco_detection")
    expected = processor(images=images, annotations=annotations, return_tensors="pt")
    batch = collate_detection(samples, "detr", size_divisor=1)
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch["pixel_mask"], expected["pixel_mask"].long())
    for ours, theirs in zip(batch["labels"], expected["labels"]):
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours["class_labels"], theirs["class_labels"])
    padded = collate_detection(samples, "detr", size_divisor=32)
    assert padded["pixel_values"].shape[2:] == (64, 64) and padded["pixel_mask"][1, :50, :30].all()
    assert not padded["pixel_mask"][1, :, 30:].any() and not padded["pixel_mask"][0, 40:].any()


def test_mask2former_labels_are_padded_binary_masks():
    masks = np.zeros((2, 30, 40), np.uint8)
    masks[0, 2:10, 3:12] = 1
    masks[1, 15:28, 20:38] = 1
    instances = Instances(np.zeros((2, 4), np.float32), np.array([4, 0]), masks, np.zeros(2, bool), np.ones(2),
                          np.arange(2))  # fmt: skip
    empty = Instances.empty(20, 20, with_masks=True)
    batch = collate_detection(
        [DetectionSample(0, np.zeros((3, 30, 40), np.float32), instances),
         DetectionSample(1, np.zeros((3, 20, 20), np.float32), empty)], "mask2former",
    )  # fmt: skip
    assert batch["pixel_values"].shape == (2, 3, 32, 64)
    assert batch["mask_labels"][0].shape == (2, 32, 64) and batch["mask_labels"][1].shape == (0, 32, 64)
    torch.testing.assert_close(batch["mask_labels"][0][:, :30, :40], torch.from_numpy(masks).float())
    assert batch["mask_labels"][0][:, 30:].sum() == 0 and batch["class_labels"][0].tolist() == [4, 0]
    with pytest.raises(ValueError, match="has none"):
        collate_detection([DetectionSample(0, np.zeros((3, 8, 8), np.float32), Instances.empty(8, 8, False))],
                          "mask2former")  # fmt: skip


def test_a_coco_json_that_is_not_one_is_named(tmp_path):
    (tmp_path / "annotations").mkdir()
    bad = tmp_path / "annotations" / "instances_val.json"
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="lists no categories"):
        load_detection_source(bad, "val")
    with pytest.raises(FileNotFoundError, match="no image folder"):
        load_detection_source(bad, "val", image_dir=tmp_path / "missing")


def test_detection_example_round_trip_through_the_transform(instance_set):
    source = load_detection_source(instance_set, "train")
    transform = DetectionTrainTransform(DetectionAugmentation.for_short_side(128))
    sample = transform(source[0], np.random.default_rng(0))
    assert isinstance(source[0], DetectionExample) and sample.pixel_values.dtype == np.float32
    assert (
        sample.pixel_values.shape[0] == 3
        and sample.instances.masks.shape[1:] == sample.pixel_values.shape[1:]
    )
