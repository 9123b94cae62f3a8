"""Semantic segmentation mIoU / mAcc / aAcc as an `evaluate` metric, loaded offline by path.

    >>> import evaluate
    >>> from selfpatch_hf.evaluation.evaluate_metrics import metric_path
    >>> seg_iou = evaluate.load(metric_path("segmentation_iou"))

Same definitions as the Hub's `mean_iou` (which needs the network to load); the computation lives in
`selfpatch_hf.evaluation.semseg_metrics`. For large evaluations use `semseg_metrics.ConfusionMatrix`
directly: `add_batch` stores every pixel.
"""

import datasets
import evaluate

from selfpatch_hf.evaluation.semseg_metrics import segmentation_scores

_DESCRIPTION = """
Mean intersection-over-union, mean per-class accuracy and overall pixel accuracy of semantic segmentation
label maps. Classes absent from both prediction and ground truth (IoU) or from the ground truth (accuracy)
are left out of the means. Ground-truth pixels equal to `ignore_index` are not counted.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of (H, W) integer label maps.
    references: list of (H, W) integer label maps of the same shapes.
    num_labels: number of classes.
    ignore_index: ground-truth value that is not scored (default 255).
    reduce_labels: map ground-truth 0 to ignore and l to l - 1 (ADE20K / scene_parse_150), default False.
Returns:
    "mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy".
"""

_CITATION = """
@software{MMSegmentation_Contributors_OpenMMLab_Semantic_Segmentation_2020,
  author = {MMSegmentation Contributors},
  title = {{OpenMMLab Semantic Segmentation Toolbox and Benchmark}},
  url = {https://github.com/open-mmlab/mmsegmentation},
  year = {2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SegmentationIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels, ignore_index=255, reduce_labels=False):
        scores = segmentation_scores(predictions, references, num_labels, ignore_index, reduce_labels)
        return scores.to_dict()
