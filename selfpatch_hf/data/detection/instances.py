"""The annotations of one image as checked arrays, and what was wrong with the raw ones.

`Instances` holds, in absolute pixels of its image, the boxes as [x0, y0, x1, y1], the contiguous labels 0..K-1, the
masks (when the source has them), the crowd flags, the areas COCO evaluation sorts by (the source's `area`, else the
mask's or the box's) and the source's annotation ids. `check_instances` builds it from
COCO-style raw objects (`bbox` in [x, y, width, height] or [x0, y0, x1, y1], `category`, `segmentation` as polygons
or RLE, `iscrowd`) and settles bad input the same way every time:

- a box partly outside the image is clipped to it; a box of zero size (after clipping, or as given, e.g. wholly
  outside the image) is dropped with its object; both are counted in `AnnotationIssues` and logged once per kind,
  naming the first image;
- a category id outside the label map is refused (`ValueError` naming the id, the image and the label map's range):
  a silent wrong label would poison training;
- a mask that does not match its box (empty, or its tight box overlaps the given box by IoU < `MASK_BOX_MIN_IOU`) is
  dropped with its object, counted and logged; a small disagreement (polygon rounding) is normal and kept;
- an image with no objects is kept: a negative example (counted).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

BoxFormat = Literal["xywh", "xyxy"]
MASK_BOX_MIN_IOU = 0.5


@dataclass
class Instances:
    """Objects of one image: boxes (N, 4) float32 [x0, y0, x1, y1] in pixels, labels (N,) int64, masks (N, H, W)
    uint8 or None, iscrowd (N,) bool, areas (N,) float32, ids (N,) int64 (the source's annotation ids, -1 where it
    has none)."""

    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    iscrowd: np.ndarray
    areas: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray) -> Instances:
        """The objects where `keep` (a boolean or index array) says so."""
        return Instances(
            boxes=self.boxes[keep],
            labels=self.labels[keep],
            masks=None if self.masks is None else self.masks[keep],
            iscrowd=self.iscrowd[keep],
            areas=self.areas[keep],
            ids=self.ids[keep],
        )

    @classmethod
    def empty(cls, height: int, width: int, with_masks: bool) -> Instances:
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            labels=np.zeros(0, np.int64),
            masks=np.zeros((0, height, width), np.uint8) if with_masks else None,
            iscrowd=np.zeros(0, bool),
            areas=np.zeros(0, np.float32),
            ids=np.zeros(0, np.int64),
        )


@dataclass
class AnnotationIssues:
    """Counts of what `check_instances` repaired or dropped, over every image it saw."""

    images: int = 0
    objects: int = 0
    images_without_objects: int = 0
    clipped_boxes: int = 0
    dropped_empty_boxes: int = 0
    dropped_mask_mismatches: int = 0
    _logged: set[str] = field(default_factory=set, repr=False)

    def note(self, kind: str, message: str) -> None:
        """Count one issue of `kind` and log `message` the first time that kind occurs."""
        setattr(self, kind, getattr(self, kind) + 1)
        if kind not in self._logged:
            self._logged.add(kind)
            logger.warning("%s (further cases are counted, not logged)", message)

    def to_dict(self) -> dict[str, int]:
        return {name: value for name, value in vars(self).items() if not name.startswith("_")}

    def summary(self) -> str:
        return (
            f"{self.images} images, {self.objects} objects kept; {self.images_without_objects} images without "
            f"objects (kept as negatives); {self.clipped_boxes} boxes clipped to their image, "
            f"{self.dropped_empty_boxes} empty boxes and {self.dropped_mask_mismatches} mask/box mismatches dropped"
        )


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons: a list of flat [x1, y1, x2, y2, ...] lists; RLE: {"size", "counts"} with
    counts a compressed string or an uncompressed list) -> (height, width) uint8 mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, Mapping):
        size = [int(v) for v in segmentation.get("size", ())]
        if size != [height, width]:
            raise ValueError(f"its RLE mask is {size} (height, width), the image is {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, (list, tuple)):  # uncompressed RLE (COCO's crowd regions)
            rle = mask_utils.frPyObjects({"size": size, "counts": list(counts)}, height, width)
        else:
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        return mask_utils.decode(rle).astype(np.uint8)
    polygons = [list(map(float, polygon)) for polygon in segmentation or ()]
    if not polygons or any(len(p) < 6 or len(p) % 2 for p in polygons):
        raise ValueError("its polygons must be flat [x1, y1, x2, y2, ...] lists of at least 3 points")
    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight [x0, y0, x1, y1] box of a mask (pixel i covers [i, i + 1)), None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def check_instances(
    objects: Sequence[Mapping[str, Any]],
    height: int,
    width: int,
    num_labels: int,
    *,
    image_id: Any,
    box_format: BoxFormat = "xywh",
    with_masks: bool = False,
    issues: AnnotationIssues | None = None,
) -> Instances:
    """Checked `Instances` of one image from raw objects (dicts with `bbox`, `category` as a label 0..K-1, and, with
    `with_masks`, `segmentation`; optional `iscrowd`, `area`, `id`). See the module docstring for what is repaired or
    refused. `box_format`: "xywh" (COCO's [x, y, width, height]) or "xyxy" ([x0, y0, x1, y1])."""
    issues = issues if issues is not None else AnnotationIssues()
    issues.images += 1
    boxes, labels, masks, iscrowd, areas, ids = [], [], [], [], [], []
    for index, obj in enumerate(objects):
        where = f"image {image_id!r}, object {obj.get('id', index)!r}"
        label = obj["category"]
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_labels:
            raise ValueError(
                f"{where}: category id {label!r} is outside the label map (ids 0..{num_labels - 1}); give label "
                "names that cover every category of the dataset."
            )
        raw = np.asarray(obj["bbox"], dtype=np.float64).reshape(-1)
        if raw.shape != (4,) or not np.isfinite(raw).all():
            raise ValueError(f"{where}: bbox must be 4 finite numbers, got {obj['bbox']!r}.")
        box = (
            raw.copy()
            if box_format == "xyxy"
            else np.array([raw[0], raw[1], raw[0] + raw[2], raw[1] + raw[3]])
        )
        clipped = np.clip(box, 0, [width, height, width, height])
        if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
            issues.note(
                "dropped_empty_boxes",
                f"{where}: box {raw.tolist()} ({box_format}) has no area inside the {width}x{height} image; dropped",
            )
            continue
        if not np.allclose(clipped, box):
            issues.note(
                "clipped_boxes",
                f"{where}: box {raw.tolist()} ({box_format}) reaches outside the {width}x{height} image; clipped",
            )
        crowd = bool(obj.get("iscrowd", 0))
        if with_masks:
            try:
                mask = decode_segmentation(obj.get("segmentation"), height, width)
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{where}: cannot read its segmentation: {error}.") from error
            tight = mask_box(mask)
            if tight is None or (not crowd and _box_iou(tight, clipped) < MASK_BOX_MIN_IOU):
                described = (
                    "is empty" if tight is None else f"spans {tight.tolist()}, its box {clipped.tolist()}"
                )
                issues.note("dropped_mask_mismatches", f"{where}: its mask {described} (xyxy); dropped")
                continue
            masks.append(mask)
        area = obj.get("area")
        if area is None or not np.isfinite(float(area)) or float(area) <= 0:
            area = float(masks[-1].sum()) if with_masks else float(np.prod(clipped[2:] - clipped[:2]))
        areas.append(float(area))
        boxes.append(clipped)
        labels.append(int(label))
        iscrowd.append(crowd)
        ids.append(int(obj.get("id", -1)) if obj.get("id") is not None else -1)
    if not labels:
        issues.images_without_objects += 1
        return Instances.empty(height, width, with_masks)
    issues.objects += len(labels)
    return Instances(
        boxes=np.asarray(boxes, np.float32),
        labels=np.asarray(labels, np.int64),
        masks=np.stack(masks) if with_masks else None,
        iscrowd=np.asarray(iscrowd, bool),
        areas=np.asarray(areas, np.float32),
        ids=np.asarray(ids, np.int64),
    )


__all__ = [
    "MASK_BOX_MIN_IOU",
    "AnnotationIssues",
    "BoxFormat",
    "Instances",
    "check_instances",
    "decode_segmentation",
    "mask_box",
]
