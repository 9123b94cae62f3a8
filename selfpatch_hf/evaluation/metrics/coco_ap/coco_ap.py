"""COCO box and mask AP as an `evaluate` metric, kept in this repository and loaded offline by path.

    >>> import evaluate
    >>> from selfpatch_hf.evaluation.evaluate_metrics import metric_path
    >>> coco_ap = evaluate.load(metric_path("coco_ap"))
    >>> coco_ap.add_batch(predictions=[...], references=[...])   # one dict per image, see below
    >>> coco_ap.compute(num_labels=80, iou_types=["bbox", "segm"])

The computation is pycocotools' `COCOeval`, driven by `selfpatch_hf.evaluation.detection_metrics`; this module only
adapts it to `evaluate`. Masks travel as COCO RLE (`detection_metrics.to_rle` turns a binary mask into one).
"""

import datasets
import evaluate

from selfpatch_hf.evaluation.detection_metrics import coco_scores

_DESCRIPTION = """
COCO detection metrics of the official COCO evaluation (pycocotools): AP averaged over IoU 0.50:0.95, AP50, AP75,
AP for small / medium / large ground-truth areas, the matching average recalls, and per-category AP, for boxes
("bbox") and / or masks ("segm"). Crowd references are ignore regions. -1 means nothing to score in that range.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one dict per image: image_id, boxes (M x [x0, y0, x1, y1] pixels), scores (M), labels (M, in
        0..num_labels-1), masks (M COCO RLEs {"size": [H, W], "counts": str}; [] for box AP only).
    references: one dict per image: image_id, height, width, boxes (N x [x0, y0, x1, y1]), labels (N), iscrowd (N),
        areas (N; [] to take the mask or box area), masks (N RLEs; [] for box AP only).
    num_labels: number of categories.
    iou_types: "bbox" and / or "segm" (default ["bbox"]).
    label_names: names for the per-category AP (default "0", "1", ...).
Returns:
    {"bbox": {"AP": ..., "AP50": ..., "AP75": ..., "APs": ..., "APm": ..., "APl": ..., "AR1": ..., "AR10": ...,
    "AR100": ..., "ARs": ..., "ARm": ..., "ARl": ..., "per_category": {name: AP}}, "segm": {...}}
"""

_CITATION = """
@inproceedings{lin2014microsoft,
  title={Microsoft {COCO}: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and Ramanan, Deva
          and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle={ECCV},
  year={2014}
}
"""

_RLE = {"size": datasets.List(datasets.Value("int64"), length=2), "counts": datasets.Value("string")}
_BOXES = datasets.List(datasets.List(datasets.Value("float64"), length=4))


def _masks_or_none(masks):
    return list(masks) if masks else None


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoAP(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "image_id": datasets.Value("int64"),
                        "boxes": _BOXES,
                        "scores": datasets.List(datasets.Value("float64")),
                        "labels": datasets.List(datasets.Value("int64")),
                        "masks": datasets.List(_RLE),
                    },
                    "references": {
                        "image_id": datasets.Value("int64"),
                        "height": datasets.Value("int64"),
                        "width": datasets.Value("int64"),
                        "boxes": _BOXES,
                        "labels": datasets.List(datasets.Value("int64")),
                        "iscrowd": datasets.List(datasets.Value("int64")),
                        "areas": datasets.List(datasets.Value("float64")),
                        "masks": datasets.List(_RLE),
                    },
                }
            ),
        )

    def _compute(self, predictions, references, num_labels, iou_types=("bbox",), label_names=None):
        predictions = [{**p, "masks": _masks_or_none(p["masks"])} for p in predictions]
        references = [
            {**r, "masks": _masks_or_none(r["masks"]), "areas": r["areas"] if r["areas"] else None}
            for r in references
        ]
        return coco_scores(
            predictions, references, num_labels, iou_types=list(iou_types), label_names=label_names
        )
