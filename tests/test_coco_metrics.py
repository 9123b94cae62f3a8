"""COCO box / mask AP (`selfpatch_hf.evaluation.detection_metrics` and the `coco_ap` evaluate module) on hand-made
cases with known values, and against pycocotools driven directly through COCO json files."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from selfpatch_hf.evaluation.detection_metrics import STAT_NAMES, coco_scores, to_rle
from selfpatch_hf.evaluation.evaluate_metrics import load_metric


def _box_mask(height, width, box):
    mask = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = 1
    return mask


def _reference(image_id, boxes, labels, size=(200, 240), iscrowd=None):
    height, width = size
    return {
        "image_id": image_id,
        "height": height,
        "width": width,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int64),
        "iscrowd": np.zeros(len(labels), bool) if iscrowd is None else np.asarray(iscrowd, bool),
        "masks": [_box_mask(height, width, box) for box in boxes],
    }


def _prediction(image_id, boxes, labels, scores, size=(200, 240)):
    return {
        "image_id": image_id,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int64),
        "scores": np.asarray(scores, np.float64),
        "masks": [_box_mask(*size, box) for box in boxes],
    }


def test_perfect_predictions_score_one_at_every_size():
    # areas 20x20 = 400 (small, < 32^2), 60x60 = 3600 (medium), 120x120 = 14400 (large)
    boxes = [[10, 10, 30, 30], [40, 40, 100, 100], [110, 60, 230, 180]]
    references = [_reference(1, boxes, [0, 1, 1]), _reference(2, [[5, 5, 65, 65]], [0])]
    predictions = [
        _prediction(1, boxes, [0, 1, 1], [0.9, 0.8, 0.7]),
        _prediction(2, [[5, 5, 65, 65]], [0], [0.5]),
    ]
    scores = coco_scores(predictions, references, num_labels=2, iou_types=["bbox", "segm"])
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
            assert scores[iou_type][name] == pytest.approx(1.0), (iou_type, name)
        assert scores[iou_type]["per_category"] == {"0": pytest.approx(1.0), "1": pytest.approx(1.0)}


def test_a_shifted_box_scores_the_thresholds_its_iou_passes():
    # two 100 x 100 boxes 20 px apart: IoU = 80 / 120 = 0.667, a match at IoU 0.50, 0.55, 0.60, 0.65 of the ten
    # thresholds 0.50:0.05:0.95, each with precision 1 at recall 1: AP = 4 / 10
    references = [_reference(1, [[20, 20, 120, 120]], [0])]
    predictions = [_prediction(1, [[40, 20, 140, 120]], [0], [0.9])]
    scores = coco_scores(predictions, references, num_labels=1, iou_types=["bbox", "segm"])
    for iou_type in ("bbox", "segm"):
        assert scores[iou_type]["AP"] == pytest.approx(0.4)
        assert scores[iou_type]["AP50"] == pytest.approx(1.0)
        assert scores[iou_type]["AP75"] == pytest.approx(0.0)
        assert (
            scores[iou_type]["APs"] == -1 and scores[iou_type]["APm"] == -1
        )  # no ground truth of those sizes
        assert scores[iou_type]["APl"] == pytest.approx(0.4)


def test_a_detection_on_a_crowd_region_is_ignored():
    references = [_reference(1, [[10, 10, 70, 70], [100, 50, 220, 190]], [0, 0], iscrowd=[False, True])]
    perfect = _prediction(1, [[10, 10, 70, 70]], [0], [0.8])
    on_crowd = _prediction(1, [[10, 10, 70, 70], [120, 60, 180, 120]], [0, 0], [0.8, 0.95])
    assert coco_scores([perfect], references, 1)["bbox"]["AP"] == pytest.approx(1.0)
    assert coco_scores([on_crowd], references, 1, iou_types=["bbox", "segm"])["bbox"]["AP"] == pytest.approx(
        1.0
    )
    assert coco_scores([on_crowd], references, 1, iou_types=["segm"])["segm"]["AP"] == pytest.approx(1.0)
    # the same region as an ordinary object: the detection on it (IoU 0.21) is a false positive ranked first and
    # that object is missed: precision 1/2 up to recall 1/2, nothing beyond; on COCO's 101 recall points
    # 0, 0.01, ..., 1 that is 51 points at 1/2
    not_crowd = [{**references[0], "iscrowd": np.zeros(2, bool)}]
    assert coco_scores([on_crowd], not_crowd, 1)["bbox"]["AP50"] == pytest.approx(0.5 * 51 / 101)


def test_detections_on_an_image_without_objects_are_false_positives():
    references = [_reference(1, [[10, 10, 70, 70]], [0]), _reference(2, [], [])]
    predictions = [
        _prediction(1, [[10, 10, 70, 70]], [0], [0.5]),
        _prediction(2, [[30, 30, 90, 90]], [0], [0.9]),
    ]
    scores = coco_scores(predictions, references, 1, iou_types=["bbox", "segm"])
    for iou_type in ("bbox", "segm"):
        # ranked: FP (0.9), TP (0.5): precision 1/2 at recall 1 -> interpolated precision 1/2 everywhere
        assert scores[iou_type]["AP"] == pytest.approx(0.5)
    # no detections at all: AP 0; an image without objects and without detections changes nothing
    assert coco_scores([], references, 1)["bbox"]["AP"] == 0.0
    alone = coco_scores(predictions[:1], references, 1)["bbox"]["AP"]
    assert alone == pytest.approx(1.0)


def _direct_pycocotools(tmp_path, references, predictions, num_labels, iou_type):
    """The official path: a ground-truth json and a results json through COCO, loadRes and COCOeval."""
    images, annotations = [], []
    for reference in references:
        images.append(
            {"id": reference["image_id"], "height": reference["height"], "width": reference["width"]}
        )
        for index, label in enumerate(reference["labels"]):
            x0, y0, x1, y1 = (float(v) for v in reference["boxes"][index])
            rle = mask_utils.encode(np.asfortranarray(reference["masks"][index]))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": reference["image_id"],
                    "category_id": int(label) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": int(reference["iscrowd"][index]),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                }
            )
    categories = [{"id": i + 1, "name": str(i)} for i in range(num_labels)]
    (tmp_path / "gt.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    results = []
    for prediction in predictions:
        for index, label in enumerate(prediction["labels"]):
            x0, y0, x1, y1 = (float(v) for v in prediction["boxes"][index])
            entry = {"image_id": prediction["image_id"], "category_id": int(label) + 1,
                     "score": float(prediction["scores"][index])}  # fmt: skip
            if iou_type == "bbox":
                entry["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            else:
                rle = mask_utils.encode(np.asfortranarray(prediction["masks"][index]))
                entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            results.append(entry)
    (tmp_path / "results.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(tmp_path / "gt.json"))
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(tmp_path / "results.json")), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(STAT_NAMES, evaluator.stats.tolist()))


def test_matches_pycocotools_on_a_mixed_case(tmp_path):
    rng = np.random.default_rng(0)
    references, predictions = [], []
    for image_id in range(1, 7):
        count = int(rng.integers(0, 5))  # some images without objects
        boxes, labels = [], []
        for _ in range(count):
            x0, y0 = rng.uniform(0, 180), rng.uniform(0, 140)
            side = rng.choice([12, 40, 110])  # small, medium and large objects
            boxes.append([x0, y0, min(240, x0 + side), min(200, y0 + side * rng.uniform(0.6, 1.4))])
            labels.append(int(rng.integers(3)))
        crowd = [index == 0 and image_id == 3 for index in range(count)]
        boxes = np.round(np.asarray(boxes, np.float32).reshape(-1, 4))
        references.append(_reference(image_id, boxes, labels, iscrowd=crowd))
        # predictions: jittered copies (some with wrong labels), plus random false positives
        noisy = boxes + rng.normal(0, 4, boxes.shape)
        extra = rng.uniform(0, 150, (int(rng.integers(0, 3)), 2))
        noisy = np.concatenate([noisy, np.concatenate([extra, extra + 30], axis=1)])
        noisy = np.round(np.clip(noisy, 0, [240, 200, 240, 200]))
        noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
        predicted = [c if rng.random() > 0.2 else int(rng.integers(3)) for c in labels]
        predicted += [int(rng.integers(3)) for _ in range(len(extra))]
        predictions.append(_prediction(image_id, noisy, predicted, rng.uniform(0.05, 1.0, len(noisy))))
    ours = coco_scores(predictions, references, num_labels=3, iou_types=["bbox", "segm"])
    for iou_type in ("bbox", "segm"):
        expected = _direct_pycocotools(tmp_path, references, predictions, 3, iou_type)
        assert expected["AP"] > 0.05  # a real case, not all zeros
        for name in STAT_NAMES:
            assert ours[iou_type][name] == pytest.approx(expected[name], abs=1e-12), (iou_type, name)


def test_the_evaluate_module_gives_the_same_scores():
    references = [_reference(1, [[20, 20, 120, 120], [5, 5, 25, 25]], [0, 1]), _reference(2, [], [])]
    predictions = [
        _prediction(1, [[40, 20, 140, 120], [5, 5, 25, 25]], [0, 1], [0.9, 0.6]),
        _prediction(2, [[30, 30, 90, 90]], [1], [0.7]),
    ]
    expected = coco_scores(predictions, references, 2, iou_types=["bbox", "segm"], label_names=["a", "b"])
    metric = load_metric("coco_ap")

    def as_record(item, fields):
        record = {k: np.asarray(item[k]).tolist() for k in fields}
        record["masks"] = [
            {"size": list(r["size"]), "counts": r["counts"].decode()} for r in map(to_rle, item["masks"])
        ]
        return record

    metric.add_batch(
        predictions=[as_record(p, ("image_id", "boxes", "scores", "labels")) for p in predictions],
        references=[
            {**as_record(r, ("image_id", "height", "width", "boxes", "labels")), "iscrowd": [0] * len(r["labels"]),
             "areas": []}
            for r in references
        ],
    )  # fmt: skip
    result = metric.compute(num_labels=2, iou_types=["bbox", "segm"], label_names=["a", "b"])
    assert result == expected
    # category b: the false positive on image 2 (0.7) outranks the true one (0.6): precision 1/2 at recall 1
    assert result["bbox"]["per_category"]["b"] == pytest.approx(0.5)


def test_bad_input_is_named():
    references = [_reference(1, [[20, 20, 120, 120]], [0])]
    with pytest.raises(ValueError, match="outside 0..0"):
        coco_scores([_prediction(1, [[0, 0, 5, 5]], [3], [0.5])], references, 1)
    with pytest.raises(ValueError, match="no reference"):
        coco_scores([_prediction(9, [[0, 0, 5, 5]], [0], [0.5])], references, 1)
    with pytest.raises(ValueError, match="iou_types"):
        coco_scores([], references, 1, iou_types=["keypoints"])
