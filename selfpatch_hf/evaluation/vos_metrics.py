"""DAVIS video object segmentation metrics: J (region similarity) and F (contour accuracy).

These follow the DAVIS 2017 evaluation toolkit (`davis2017-evaluation`: `metrics.py` and
`utils.db_statistics`) so that numbers are comparable with published DAVIS results:

- J is the IoU of the object masks, void pixels excluded, and 1 when both masks are empty.
- F matches the one-pixel-wide boundaries of the two masks (`seg2bmap`) within a tolerance of
  `ceil(bound_th * image_diagonal)` pixels (bound_th = 0.008, 8 px at 480p) and is the F-measure of the
  boundary precision and recall.
- Per object: mean over frames (M), recall = fraction of frames above 0.5 (R), decay = mean of the first
  quarter of frames minus mean of the last quarter (D).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage


def region_similarity(
    annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None
) -> np.ndarray | float:
    """J: intersection over union of boolean masks over the last two axes ((H, W) or (T, H, W)).

    Empty-vs-empty counts as a perfect match (1.0), as in the DAVIS toolkit.
    """
    annotation = np.asarray(annotation).astype(bool)
    segmentation = np.asarray(segmentation).astype(bool)
    if annotation.shape != segmentation.shape:
        raise ValueError(
            f"Mask shapes differ: annotation {annotation.shape}, segmentation {segmentation.shape}."
        )
    valid = np.ones_like(annotation) if void_pixels is None else ~np.asarray(void_pixels).astype(bool)
    inter = np.sum(segmentation & annotation & valid, axis=(-2, -1))
    union = np.sum((segmentation | annotation) & valid, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inter / union
    j = np.where(union == 0, 1.0, j)
    return float(j) if j.ndim == 0 else j


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map of a binary mask (DAVIS `_seg2bmap` at the mask's own resolution).

    A pixel is a boundary pixel when it differs from its right, lower or lower-right neighbour; the last row
    and column compare only along the image border and the bottom-right corner is never a boundary.
    """
    seg = np.asarray(seg).astype(bool)
    if seg.ndim != 2:
        raise ValueError(f"seg2bmap expects a 2-D mask, got shape {seg.shape}.")
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def boundary_tolerance(shape: tuple[int, ...], bound_th: float = 0.008) -> int:
    """Matching tolerance in pixels: `bound_th` itself if >= 1, else ceil(bound_th * image diagonal)."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def _dilate(boundary: np.ndarray, radius: int) -> np.ndarray:
    # Dilation by skimage's disk(radius) (offsets with dy^2 + dx^2 <= radius^2) is exactly "Euclidean
    # distance to the nearest boundary pixel <= radius"; the distance transform avoids a large kernel.
    if not boundary.any():
        return np.zeros_like(boundary)
    return ndimage.distance_transform_edt(~boundary) <= radius


def boundary_f_measure(
    annotation: np.ndarray,
    segmentation: np.ndarray,
    void_pixels: np.ndarray | None = None,
    bound_th: float = 0.008,
) -> float:
    """F: boundary F-measure of one frame's binary masks (H, W), DAVIS `f_measure`."""
    annotation = np.asarray(annotation).astype(bool)
    segmentation = np.asarray(segmentation).astype(bool)
    if annotation.shape != segmentation.shape or annotation.ndim != 2:
        raise ValueError(
            f"Expected two (H, W) masks of the same shape, got {annotation.shape} and {segmentation.shape}."
        )
    valid = np.ones_like(annotation) if void_pixels is None else ~np.asarray(void_pixels).astype(bool)
    bound_pix = boundary_tolerance(segmentation.shape, bound_th)

    fg_boundary = seg2bmap(segmentation & valid)
    gt_boundary = seg2bmap(annotation & valid)
    n_fg = int(fg_boundary.sum())
    n_gt = int(gt_boundary.sum())
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0  # precision or recall is 0 while the other is 1
    precision = np.sum(fg_boundary & _dilate(gt_boundary, bound_pix)) / n_fg
    recall = np.sum(gt_boundary & _dilate(fg_boundary, bound_pix)) / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def boundary_f_measure_frames(
    annotation: np.ndarray,
    segmentation: np.ndarray,
    void_pixels: np.ndarray | None = None,
    bound_th: float = 0.008,
) -> np.ndarray:
    """F per frame for (T, H, W) masks."""
    annotation = np.asarray(annotation)
    segmentation = np.asarray(segmentation)
    if annotation.ndim == 2:
        return np.array([boundary_f_measure(annotation, segmentation, void_pixels, bound_th)])
    return np.array(
        [
            boundary_f_measure(
                annotation[t], segmentation[t], None if void_pixels is None else void_pixels[t], bound_th
            )
            for t in range(annotation.shape[0])
        ]
    )


def db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of per-frame J or F values of one object, DAVIS `db_statistics`."""
    values = np.asarray(per_frame_values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(int)
        bins = [values[ids[i] : ids[i + 1] + 1] for i in range(4)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


def sequence_scores(
    references: np.ndarray,
    predictions: np.ndarray,
    num_objects: int | None = None,
    bound_th: float = 0.008,
    void_label: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-object, per-frame J and F of one sequence of indexed masks.

    references, predictions: (T, H, W) integer masks, 0 = background, 1..K = objects, `void_label` = void
    (excluded from both metrics). num_objects defaults to the largest object id of the first reference frame
    (the objects given to a semi-supervised method). Returns (J, F), each of shape (K, T).
    """
    references = np.asarray(references)
    predictions = np.asarray(predictions)
    if references.shape != predictions.shape or references.ndim != 3:
        raise ValueError(
            f"Expected (T, H, W) reference and prediction masks of one shape, got {references.shape} "
            f"and {predictions.shape}."
        )
    void = references == void_label
    references = np.where(void, 0, references)
    if num_objects is None:
        num_objects = int(references[0].max())
    if predictions.max(initial=0) > num_objects:
        raise ValueError(
            f"The predictions contain object id {int(predictions.max())} but the sequence has only "
            f"{num_objects} objects."
        )
    j = np.zeros((num_objects, references.shape[0]))
    f = np.zeros_like(j)
    for k in range(1, num_objects + 1):
        gt, pred = references == k, predictions == k
        j[k - 1] = region_similarity(gt, pred, void)
        f[k - 1] = boundary_f_measure_frames(gt, pred, void, bound_th)
    return j, f
