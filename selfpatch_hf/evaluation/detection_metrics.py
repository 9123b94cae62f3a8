"""COCO box and mask AP with `pycocotools` (the official COCO evaluation code), from in-memory predictions.

`coco_scores(predictions, references, num_labels)` builds the ground truth and the detections as pycocotools
`COCO` objects (the same records `COCO.loadRes` makes from a results file) and runs `COCOeval` per IoU type:

- "bbox": boxes; "segm": masks (binary arrays or COCO RLE). Mask2Former's box AP uses the boxes of its masks.
- Returned per type: AP (IoU 0.50:0.95), AP50, AP75, APs / APm / APl (areas below 32^2, 32^2-96^2, above 96^2, of
  the ground truth's `area`), AR1, AR10, AR100, ARs / ARm / ARl, and per-category AP. pycocotools' -1 (no ground
  truth in that range, e.g. no small objects) is kept as -1.
- Crowd ground truth (`iscrowd`) is COCO's ignore region: detections matched to it count neither way.
- Images without ground truth are evaluated too: their detections are false positives.

Boxes are [x0, y0, x1, y1] pixels (the detectors' post-processing output), converted to COCO's [x, y, w, h] here.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet(function, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        return function(*args, **kwargs)


def to_rle(mask: Any) -> dict[str, Any]:
    """A binary (H, W) mask or a COCO RLE -> compressed RLE with `counts` as bytes (what pycocotools computes on)."""
    from pycocotools import mask as mask_utils

    if isinstance(mask, Mapping):
        counts = mask["counts"]
        if isinstance(counts, (list, tuple)):
            height, width = mask["size"]
            return mask_utils.frPyObjects({"size": list(mask["size"]), "counts": list(counts)}, height, width)
        return {
            "size": list(mask["size"]),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    array = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    if array.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {array.shape}.")
    return mask_utils.encode(array)


def _xywh(boxes: Any) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _image_entries(references: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    images, seen = [], set()
    for reference in references:
        image_id = int(reference["image_id"])
        if image_id in seen:
            raise ValueError(f"image_id {image_id} appears twice among the references.")
        seen.add(image_id)
        images.append({"id": image_id, "height": int(reference["height"]), "width": int(reference["width"])})
    return images


def _ground_truth(references: Sequence[Mapping[str, Any]], num_labels: int, with_masks: bool):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    annotations = []
    for reference in references:
        labels = np.asarray(reference["labels"], np.int64).reshape(-1)
        boxes = _xywh(reference["boxes"])
        crowd = np.asarray(reference.get("iscrowd", np.zeros(len(labels))), bool).reshape(-1)
        masks = reference.get("masks") if with_masks else None
        if with_masks and masks is None and len(labels):
            raise ValueError(f"image {reference['image_id']}: mask AP needs the references' masks.")
        areas = reference.get("areas")
        for index, label in enumerate(labels):
            if not 0 <= label < num_labels:
                raise ValueError(f"image {reference['image_id']}: label {label} outside 0..{num_labels - 1}.")
            annotation = {
                "id": len(annotations) + 1,
                "image_id": int(reference["image_id"]),
                "category_id": int(label) + 1,
                "bbox": boxes[index].tolist(),
                "iscrowd": int(crowd[index]),
            }
            if masks is not None:
                annotation["segmentation"] = to_rle(masks[index])
            if areas is not None:
                annotation["area"] = float(np.asarray(areas).reshape(-1)[index])
            elif masks is not None:
                annotation["area"] = float(mask_utils.area(annotation["segmentation"]))
            else:
                annotation["area"] = float(boxes[index, 2] * boxes[index, 3])
            annotations.append(annotation)
    coco = COCO()
    coco.dataset = {
        "images": _image_entries(references),
        "annotations": annotations,
        "categories": [{"id": label + 1, "name": str(label)} for label in range(num_labels)],
    }
    _quiet(coco.createIndex)
    return coco


def _detections(predictions: Sequence[Mapping[str, Any]], ground_truth, iou_type: str, num_labels: int):
    """The results `COCO` object `COCO.loadRes` would build (bbox: area w x h; segm: area and bbox of the RLE)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    known = set(ground_truth.getImgIds())
    annotations = []
    for prediction in predictions:
        image_id = int(prediction["image_id"])
        if image_id not in known:
            raise ValueError(f"a prediction for image_id {image_id}, which has no reference.")
        labels = np.asarray(prediction["labels"], np.int64).reshape(-1)
        scores = np.asarray(prediction["scores"], np.float64).reshape(-1)
        if len(scores) != len(labels):
            raise ValueError(f"image {image_id}: {len(scores)} scores for {len(labels)} labels.")
        if iou_type == "bbox":
            boxes = _xywh(prediction["boxes"])
            if len(boxes) != len(labels):
                raise ValueError(f"image {image_id}: {len(boxes)} boxes for {len(labels)} labels.")
        else:
            masks = prediction.get("masks")
            if masks is None or len(masks) != len(labels):
                raise ValueError(f"image {image_id}: mask AP needs one mask per predicted label.")
        for index, label in enumerate(labels):
            if not 0 <= label < num_labels:
                raise ValueError(f"image {image_id}: predicted label {label} outside 0..{num_labels - 1}.")
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(label) + 1,
                "score": float(scores[index]),
                "iscrowd": 0,
            }
            if iou_type == "bbox":
                annotation["bbox"] = boxes[index].tolist()
                annotation["area"] = float(boxes[index, 2] * boxes[index, 3])
            else:
                rle = to_rle(masks[index])
                annotation["segmentation"] = rle
                annotation["area"] = float(mask_utils.area(rle))
                annotation["bbox"] = mask_utils.toBbox(rle).tolist()
            annotations.append(annotation)
    results = COCO()
    results.dataset = {
        "images": list(ground_truth.dataset["images"]),
        "annotations": annotations,
        "categories": list(ground_truth.dataset["categories"]),
    }
    _quiet(results.createIndex)
    return results


def coco_scores(
    predictions: Sequence[Mapping[str, Any]],
    references: Sequence[Mapping[str, Any]],
    num_labels: int,
    iou_types: Sequence[str] = ("bbox",),
    label_names: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """COCO AP of `predictions` against `references`, per IoU type (see the module docstring).

    references: one dict per image: `image_id`, `height`, `width`, `boxes` (N, 4) [x0, y0, x1, y1], `labels`
        (N,) in 0..num_labels-1, optional `iscrowd` (N,), `areas` (N,) and, for "segm", `masks` (N binary (H, W)
        arrays or RLEs).
    predictions: one dict per image (images may be missing: no detections): `image_id`, `scores` (M,), `labels`
        (M,), `boxes` (M, 4) for "bbox", `masks` (M masks) for "segm".
    Returns {iou_type: {"AP": ..., ..., "per_category": {name: AP}}} with values in [0, 1] (-1: nothing to score).
    """
    from pycocotools.cocoeval import COCOeval

    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ValueError(f"iou_types must be among {IOU_TYPES}, got {list(iou_types)}.")
    names = [str(n) for n in label_names] if label_names is not None else [str(i) for i in range(num_labels)]
    if len(names) != num_labels:
        raise ValueError(f"{len(names)} label names for {num_labels} labels.")
    ground_truth = _ground_truth(references, num_labels, with_masks="segm" in iou_types)
    scores: dict[str, dict[str, Any]] = {}
    for iou_type in iou_types:
        detections = _detections(predictions, ground_truth, iou_type, num_labels)
        evaluator = COCOeval(ground_truth, detections, iou_type)
        evaluator.params.imgIds = sorted(ground_truth.getImgIds())
        _quiet(evaluator.evaluate)
        _quiet(evaluator.accumulate)
        _quiet(evaluator.summarize)
        result: dict[str, Any] = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
        # precision: (IoU thresholds, recall points, categories, area ranges, max detections); "all" areas, 100 dets
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        per_category = {}
        for index, name in enumerate(names):
            values = precision[:, :, index]
            values = values[values > -1]
            per_category[name] = float(values.mean()) if values.size else -1.0
        result["per_category"] = per_category
        scores[iou_type] = result
    return scores


__all__ = ["IOU_TYPES", "STAT_NAMES", "coco_scores", "to_rle"]
