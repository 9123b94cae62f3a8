"""DAVIS J&F as an `evaluate` metric, kept in this repository and loaded offline by path.

    >>> import evaluate
    >>> from selfpatch_hf.evaluation.evaluate_metrics import metric_path
    >>> davis_jf = evaluate.load(metric_path("davis_jf"))

The computation lives in `selfpatch_hf.evaluation.vos_metrics`; this module only adapts it to `evaluate`.
"""

import datasets
import evaluate
import numpy as np

from selfpatch_hf.evaluation.vos_metrics import db_statistics, sequence_scores

_DESCRIPTION = """
J (region similarity, IoU) and F (boundary F-measure with the DAVIS tolerance of ceil(0.008 x image
diagonal) pixels) of the frames of ONE video sequence, following the DAVIS 2017 toolkit. Each example is a
frame: an indexed mask (0 = background, 1..K = objects, 255 = void in the references). Per object the values
are averaged over frames; the reported means are over objects; J&F is the mean of J and F. The DAVIS
semi-supervised protocol leaves out the first (given) and last frames: pass only the frames to score.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of (H, W) integer masks.
    references: list of (H, W) integer masks of the same shapes.
    num_objects: number of objects (default: largest object id of the first reference frame).
    bound_th: boundary tolerance, a fraction of the image diagonal if < 1, else pixels (default 0.008).
Returns:
    "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay", "J&F-Mean", and "per_object":
    a list of {"J": mean, "F": mean} for objects 1..K.
"""

_CITATION = """
@article{Pont-Tuset_arXiv_2017,
  title={The 2017 DAVIS Challenge on Video Object Segmentation},
  author={Pont-Tuset, Jordi and Perazzi, Federico and Caelles, Sergi and Arbel\\'aez, Pablo and
          Sorkine-Hornung, Alexander and Van Gool, Luc},
  journal={arXiv:1704.00675},
  year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DavisJF(evaluate.Metric):
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

    def _compute(self, predictions, references, num_objects=None, bound_th=0.008):
        predictions = np.stack([np.asarray(p) for p in predictions])
        references = np.stack([np.asarray(r) for r in references])
        j, f = sequence_scores(references, predictions, num_objects=num_objects, bound_th=bound_th)
        j_stats = np.array([db_statistics(values) for values in j]).reshape(-1, 3)
        f_stats = np.array([db_statistics(values) for values in f]).reshape(-1, 3)
        j_mean, j_recall, j_decay = j_stats.mean(axis=0)
        f_mean, f_recall, f_decay = f_stats.mean(axis=0)
        return {
            "J-Mean": float(j_mean),
            "J-Recall": float(j_recall),
            "J-Decay": float(j_decay),
            "F-Mean": float(f_mean),
            "F-Recall": float(f_recall),
            "F-Decay": float(f_decay),
            "J&F-Mean": float((j_mean + f_mean) / 2),
            "per_object": [{"J": float(js[0]), "F": float(fs[0])} for js, fs in zip(j_stats, f_stats)],
        }
