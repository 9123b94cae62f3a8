"""J / F (DAVIS) and mIoU / mAcc / aAcc on hand-worked masks, and the offline `evaluate` modules."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import disk

from selfpatch_hf.evaluation.semseg_metrics import ConfusionMatrix, reduce_zero_label, segmentation_scores
from selfpatch_hf.evaluation.vos_metrics import (
    _dilate,
    boundary_f_measure,
    boundary_tolerance,
    db_statistics,
    region_similarity,
    seg2bmap,
    sequence_scores,
)


def _square(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


# ---------------------------------------------------------------- J


def test_region_similarity_hand_worked():
    gt = _square((10, 10), (2, 6), (2, 6))  # 16 pixels
    pred = _square((10, 10), (2, 6), (3, 7))  # shifted right by one column
    assert region_similarity(gt, pred) == pytest.approx(12 / 20)
    void = np.zeros((10, 10), bool)
    void[2:4, 6] = True  # two pixels that only the prediction covers
    assert region_similarity(gt, pred, void) == pytest.approx(12 / 18)


def test_region_similarity_empty_conventions():
    empty = np.zeros((5, 5), bool)
    full = np.ones((5, 5), bool)
    assert region_similarity(empty, empty) == 1.0  # DAVIS: both empty is a perfect match
    assert region_similarity(full, empty) == 0.0
    assert region_similarity(empty, full) == 0.0
    stacked = region_similarity(np.stack([empty, full]), np.stack([empty, empty]))
    np.testing.assert_allclose(stacked, [1.0, 0.0])


# ---------------------------------------------------------------- F


def test_seg2bmap_hand_worked():
    seg = np.zeros((5, 5), bool)
    seg[1:3, 1:3] = True
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(seg2bmap(seg), expected)


def test_seg2bmap_has_no_image_border():
    full = np.ones((6, 7), bool)
    assert not seg2bmap(full).any()
    half = np.zeros((6, 10), bool)
    half[:, :5] = True
    boundary = seg2bmap(half)
    assert boundary[:, 4].all() and boundary.sum() == 6  # the vertical edge only, one pixel wide


def test_boundary_tolerance_matches_davis():
    assert boundary_tolerance((480, 854)) == 8  # ceil(0.008 * 979.7)
    assert boundary_tolerance((10, 10)) == 1
    assert boundary_tolerance((10, 10), bound_th=3) == 3


def test_boundary_f_measure_hand_worked():
    gt = np.zeros((6, 10), bool)
    gt[:, :5] = True  # boundary: column 4, 6 pixels
    shifted_1 = np.zeros_like(gt)
    shifted_1[:, :6] = True
    shifted_2 = np.zeros_like(gt)
    shifted_2[:, :7] = True
    assert boundary_f_measure(gt, gt) == 1.0
    assert boundary_f_measure(gt, shifted_1, bound_th=1) == 1.0  # within one pixel
    assert boundary_f_measure(gt, shifted_2, bound_th=1) == 0.0  # two pixels away
    assert boundary_f_measure(gt, shifted_2, bound_th=2) == 1.0
    # A step: the prediction's boundary is (0,4) (1,4) (2,4) (2,5) (2,6) (2,7) (3,7) (4,7) (5,7);
    # 4 of its 9 pixels lie within 1 px of the truth and 4 of the 6 true boundary pixels are matched.
    step = np.zeros_like(gt)
    step[:3, :5] = True
    step[3:, :8] = True
    precision, recall = 4 / 9, 4 / 6
    expected = 2 * precision * recall / (precision + recall)
    assert expected == pytest.approx(8 / 15)
    assert boundary_f_measure(gt, step, bound_th=1) == pytest.approx(expected)


def test_boundary_f_measure_empty_conventions():
    empty = np.zeros((8, 8), bool)
    obj = _square((8, 8), (2, 5), (2, 5))
    assert boundary_f_measure(empty, empty) == 1.0
    assert boundary_f_measure(obj, empty) == 0.0
    assert boundary_f_measure(empty, obj) == 0.0


def test_boundary_f_measure_void_removes_boundary():
    gt = _square((12, 12), (2, 8), (2, 8))
    pred = _square((12, 12), (2, 8), (2, 11))  # wrong right edge
    void = np.zeros_like(gt)
    void[:, 7:] = True  # everything right of the true edge is void
    assert boundary_f_measure(gt, pred, bound_th=1) < 0.8
    assert boundary_f_measure(gt, pred, void, bound_th=1) == 1.0


def test_dilation_equals_skimage_disk():
    rng = np.random.default_rng(0)
    for radius in (1, 2, 3, 5, 8):
        boundary = rng.random((40, 50)) > 0.97
        expected = ndimage.binary_dilation(boundary, structure=disk(radius))
        np.testing.assert_array_equal(_dilate(boundary, radius), expected)


# ---------------------------------------------------------------- statistics and sequences


def test_db_statistics_hand_worked():
    mean, recall, decay = db_statistics(np.array([1, 1, 1, 1, 0, 0, 0, 0], float))
    assert (mean, recall, decay) == (0.5, 0.5, 1.0)
    mean, recall, decay = db_statistics(np.array([0.6, 0.4, 0.8]))
    assert mean == pytest.approx(0.6) and recall == pytest.approx(2 / 3)


def test_sequence_scores_objects_void_and_errors():
    references = np.zeros((3, 10, 10), np.uint8)
    references[:, 1:5, 1:5] = 1
    references[:, 6:9, 6:9] = 2
    references[1, 0, :] = 255  # void row
    predictions = np.where(references == 255, 1, references)  # predicting inside the void costs nothing
    predictions[2][predictions[2] == 2] = 0  # object 2 lost in the last frame
    j, f = sequence_scores(references, predictions)
    np.testing.assert_allclose(j[0], [1, 1, 1])
    np.testing.assert_allclose(j[1], [1, 1, 0])
    np.testing.assert_allclose(f[1], [1, 1, 0])
    with pytest.raises(ValueError, match="object id 3"):
        sequence_scores(references, np.full_like(references, 3))


# ---------------------------------------------------------------- semantic segmentation


def test_segmentation_scores_hand_worked():
    reference = np.array([[0, 0, 1], [1, 2, 255]])
    prediction = np.array([[0, 1, 1], [1, 1, 0]])
    scores = segmentation_scores([prediction], [reference], num_labels=3)
    np.testing.assert_allclose(scores.per_category_iou, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(scores.per_category_accuracy, [0.5, 1.0, 0.0])
    assert scores.mean_iou == pytest.approx(1 / 3)
    assert scores.mean_accuracy == pytest.approx(0.5)
    assert scores.overall_accuracy == pytest.approx(3 / 5)
    # A class absent from both prediction and truth is left out of the means.
    wider = segmentation_scores([prediction], [reference], num_labels=4)
    assert np.isnan(wider.per_category_iou[3]) and wider.mean_iou == pytest.approx(1 / 3)


def test_reduce_labels_and_streaming():
    reference = np.array([[0, 1, 2], [3, 255, 1]])
    np.testing.assert_array_equal(reduce_zero_label(reference), [[255, 0, 1], [2, 255, 0]])
    prediction = np.array([[2, 0, 1], [0, 2, 1]])
    scores = segmentation_scores([prediction], [reference], num_labels=3, reduce_labels=True)
    # valid pixels: (0,1) gt0 pred0, (0,2) gt1 pred1, (1,0) gt2 pred0, (1,2) gt0 pred1
    np.testing.assert_allclose(scores.per_category_iou, [1 / 3, 1 / 2, 0.0])
    assert scores.overall_accuracy == pytest.approx(2 / 4)
    confusion = ConfusionMatrix(3, reduce_labels=True)
    for row in range(2):  # streaming in pieces gives the same matrix
        confusion.update(prediction[row], reference[row])
    np.testing.assert_allclose(confusion.compute().per_category_iou, scores.per_category_iou)


def test_segmentation_label_errors():
    with pytest.raises(ValueError, match="outside"):
        segmentation_scores([np.zeros((2, 2), int)], [np.full((2, 2), 7)], num_labels=3)
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores([np.zeros((2, 2), int)], [np.zeros((2, 3), int)], num_labels=3)


# ---------------------------------------------------------------- evaluate modules, offline


def test_evaluate_modules_load_offline_and_agree(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from selfpatch_hf.evaluation.evaluate_metrics import load_metric

    seg_metric = load_metric("segmentation_iou")
    reference = np.array([[0, 0, 1], [1, 2, 255]])
    prediction = np.array([[0, 1, 1], [1, 1, 0]])
    seg_metric.add_batch(predictions=[prediction], references=[reference])
    result = seg_metric.compute(num_labels=3)
    assert result["mean_iou"] == pytest.approx(1 / 3)
    assert result["overall_accuracy"] == pytest.approx(3 / 5)

    davis_metric = load_metric("davis_jf")
    references = np.zeros((4, 10, 10), np.uint16)
    references[:, 2:6, 2:6] = 1
    predictions = references.copy()
    predictions[1] = 0
    predictions[1, 2:6, 3:7] = 1  # frame 1 shifted: J = 12 / 20
    scores = davis_metric.compute(predictions=list(predictions), references=list(references))
    j, f = sequence_scores(references, predictions)
    assert scores["J-Mean"] == pytest.approx(j.mean()) and j[0, 1] == pytest.approx(0.6)
    assert scores["F-Mean"] == pytest.approx(f.mean())
    assert scores["J&F-Mean"] == pytest.approx((j.mean() + f.mean()) / 2)
