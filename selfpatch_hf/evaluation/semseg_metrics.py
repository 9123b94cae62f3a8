"""Semantic segmentation metrics: mIoU, mAcc and aAcc from a streaming confusion matrix.

Definitions match the Hub's `mean_iou` metric (and mmseg): per class, IoU = |pred & gt| / |pred | gt|
and accuracy = |pred & gt| / |gt|, both NaN for a class absent from the union / the ground truth and left
out of the means; aAcc = correctly labelled pixels / labelled pixels. Pixels whose ground truth is
`ignore_index` count nowhere. `reduce_labels` maps 0 (ADE20K's "other") to ignore and shifts every other
label down by one, as `scene_parse_150` needs.

Counting into a (K, K) confusion matrix keeps memory constant, which matters for dense predictions:
`evaluate`'s `add_batch` would store every pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class MaskValueError(ValueError):
    """A segmentation mask that is no map of class ids (non-integer values, labels outside the classes)."""


def integer_labels(mask) -> np.ndarray:
    """A mask (PIL image or array) as int64 class ids; float masks (PIL mode F) must hold whole numbers, since a
    cast would silently turn 2.7 into class 2."""
    array = np.asarray(mask)
    if np.issubdtype(array.dtype, np.floating):
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all():
            value = float(array[~whole].flat[0])
            kind = f"PIL mode {mask.mode}" if hasattr(mask, "mode") else f"dtype {array.dtype}"
            raise MaskValueError(
                f"its mask holds values that are no class ids (e.g. {value:g}; a float mask, {kind}): masks must "
                "hold whole class ids, e.g. 8- or 16-bit PNGs (mode L, P or I;16)"
            )
    return array.astype(np.int64)


def reduce_zero_label(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """ADE20K convention: label 0 becomes `ignore_index`, every other label l becomes l - 1."""
    labels = integer_labels(labels)
    reduced = labels - 1
    reduced[labels == 0] = ignore_index
    reduced[labels == ignore_index] = ignore_index
    return reduced


@dataclass
class SegmentationScores:
    mean_iou: float
    mean_accuracy: float
    overall_accuracy: float
    per_category_iou: np.ndarray  # (K,), NaN for classes absent from prediction and ground truth
    per_category_accuracy: np.ndarray  # (K,), NaN for classes absent from the ground truth

    def to_dict(self) -> dict:
        return {
            "mean_iou": self.mean_iou,
            "mean_accuracy": self.mean_accuracy,
            "overall_accuracy": self.overall_accuracy,
            "per_category_iou": self.per_category_iou.tolist(),
            "per_category_accuracy": self.per_category_accuracy.tolist(),
        }


class ConfusionMatrix:
    """Accumulates a (num_labels, num_labels) confusion matrix (rows: ground truth, columns: prediction)."""

    def __init__(self, num_labels: int, ignore_index: int = 255, reduce_labels: bool = False):
        if num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {num_labels}.")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.reduce_labels = reduce_labels
        self.matrix = np.zeros((num_labels, num_labels), dtype=np.int64)

    def update(self, prediction: np.ndarray, reference: np.ndarray) -> None:
        """Add one prediction / ground-truth pair (any equal shapes, integer labels)."""
        prediction = np.asarray(prediction).astype(np.int64)
        reference = np.asarray(reference).astype(np.int64)
        if prediction.shape != reference.shape:
            raise ValueError(
                f"Prediction shape {prediction.shape} differs from reference shape {reference.shape}."
            )
        if self.reduce_labels:
            reference = reduce_zero_label(reference, self.ignore_index)
        valid = reference != self.ignore_index
        reference = reference[valid]
        prediction = prediction[valid]
        k = self.num_labels
        if reference.size and (reference.min() < 0 or reference.max() >= k):
            bad = int(reference.max() if reference.max() >= k else reference.min())
            raise ValueError(
                f"Ground-truth label {bad} is outside [0, {k}) and is not the ignore index {self.ignore_index}; "
                "set num_labels, ignore_index or reduce_labels to match the dataset."
            )
        if prediction.size and (prediction.min() < 0 or prediction.max() >= k):
            raise ValueError(f"Predicted labels must lie in [0, {k}).")
        self.matrix += np.bincount(reference * k + prediction, minlength=k * k).reshape(k, k)

    def compute(self) -> SegmentationScores:
        matrix = self.matrix.astype(np.float64)
        intersection = np.diag(matrix)
        area_label = matrix.sum(axis=1)
        area_prediction = matrix.sum(axis=0)
        union = area_label + area_prediction - intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, intersection / union, np.nan)
            accuracy = np.where(area_label > 0, intersection / area_label, np.nan)
            overall = intersection.sum() / area_label.sum() if area_label.sum() > 0 else float("nan")

        def nanmean(values: np.ndarray) -> float:
            return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

        return SegmentationScores(
            mean_iou=nanmean(iou),
            mean_accuracy=nanmean(accuracy),
            overall_accuracy=float(overall),
            per_category_iou=iou,
            per_category_accuracy=accuracy,
        )


def segmentation_scores(
    predictions,
    references,
    num_labels: int,
    ignore_index: int = 255,
    reduce_labels: bool = False,
) -> SegmentationScores:
    """mIoU / mAcc / aAcc of a list of predicted and ground-truth label maps."""
    confusion = ConfusionMatrix(num_labels, ignore_index, reduce_labels)
    for prediction, reference in zip(predictions, references, strict=True):
        confusion.update(prediction, reference)
    return confusion.compute()
