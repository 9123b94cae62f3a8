"""COCO box / mask AP of a saved detector or instance segmenter over one split, through its own image processor.

`evaluate_coco(model, source, config)` takes any `AutoModelForObjectDetection` folder (boxes: box AP) or
`AutoModelForUniversalSegmentation` folder (masks: mask AP, and box AP of the masks' boxes), a
`DetectionSource` (`selfpatch_hf.data.detection.sources`: a Hub COCO-layout dataset, a COCO json, the offline
instances) and a `CocoEvalConfig`, and returns `CocoEvalResult` with pycocotools' AP, AP50, AP75, APs / APm / APl
(and recalls) per IoU type.

Each image goes through the folder's image processor (its evaluation resize and normalisation) and the model; the
outputs go through the processor's own post-processing (`post_process_object_detection`,
`post_process_instance_segmentation`) with the original image size as target, exactly as
`pipeline("object-detection")` / `pipeline("image-segmentation", subtask="instance")` do:

- detection: every query above `threshold` (default 0: all, and COCOeval keeps the 100 best per image). The
  pipeline also rounds boxes down to whole pixels; this function keeps them as floats unless `pipeline_boxes`.
  On small images that rounding matters: a box 20 pixels wide whose IoU is near 0.5 can cross it either way.
- instance masks: `overlapping_masks=True` (default, Mask2Former's own COCO evaluation) keeps each query's binary
  mask (`return_binary_maps`); `overlapping_masks=False` is the pipeline's reading: one segmentation map in which
  later masks cover earlier ones, each segment's mask taken from it. transformers' post-processing stretches the
  mask logits of the whole (padded) input over the image; the processor pads to multiples of 32, so this function
  first crops the logits to the image's own extent (`pixel_mask`). For inputs whose sides are multiples of 32 there
  is nothing to crop and the pipeline's masks are reproduced exactly.

Images with the same processed size are run together (`batch_size`), so nothing is padded within a batch. The model's
label names must equal the source's (in any order): predictions are mapped to the source's labels by name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from selfpatch_hf.data.detection.instances import mask_box
from selfpatch_hf.evaluation.configs import CocoEvalConfig
from selfpatch_hf.evaluation.detection_metrics import STAT_NAMES, coco_scores, to_rle

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from selfpatch_hf.data.detection.sources import DetectionSource

logger = logging.getLogger(__name__)


def _percent(scores: Any) -> Any:
    """pycocotools' fractions (nested: per IoU type, per category) in percent; -1 (nothing to score) stays -1."""
    if isinstance(scores, dict):
        return {key: _percent(value) for key, value in scores.items()}
    return 100 * scores if scores >= 0 else scores


@dataclass
class CocoEvalResult:
    task: str  # "detection" or "instance_segmentation"
    scores: dict[str, dict[str, Any]]  # per IoU type: coco_scores' dict
    num_images: int
    label_names: list[str]
    annotation_issues: dict[str, int]
    predictions: list[dict[str, Any]] = field(default_factory=list, repr=False)  # with keep_predictions

    def to_dict(self) -> dict[str, Any]:
        """What `selfpatch eval coco` writes: the scores in percent, as every evaluation command writes them
        (pycocotools' -1, a statistic without ground truth, stays -1)."""
        payload = asdict(self)
        payload.pop("predictions")
        payload["scores"] = _percent(self.scores)
        return payload

    def to_markdown(self) -> str:
        header = "| | " + " | ".join(STAT_NAMES[:6]) + " |\n|---|" + "---|" * 6
        rows = [
            f"| {'box' if iou_type == 'bbox' else 'mask'} | "
            + " | ".join(f"{100 * values[name]:.1f}" if values[name] >= 0 else "-" for name in STAT_NAMES[:6])
            + " |"
            for iou_type, values in self.scores.items()
        ]
        return "\n".join([header, *rows])


def _load(model: str | os.PathLike | PreTrainedModel, image_processor: Any, device: str):
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForObjectDetection,
        AutoModelForUniversalSegmentation,
    )

    if isinstance(model, (str, os.PathLike)):
        source = str(model)
        architectures = AutoConfig.from_pretrained(source).architectures or []
        if any("ObjectDetection" in name for name in architectures):
            model = AutoModelForObjectDetection.from_pretrained(source)
        else:
            model = AutoModelForUniversalSegmentation.from_pretrained(source)
        if image_processor is None:
            image_processor = AutoImageProcessor.from_pretrained(source)
    if image_processor is None:
        raise ValueError("a model given in memory needs its image_processor.")
    return model.to(device).eval(), image_processor


def _label_map(model, source: DetectionSource) -> dict[int, int]:
    """Model label id -> source label id, matched by name."""
    names = {int(index): str(name) for index, name in model.config.id2label.items()}
    source_ids = {name: index for index, name in enumerate(source.label_names)}
    if set(names.values()) != set(source_ids):
        raise ValueError(
            f"the model's labels {sorted(names.values())[:8]} differ from the data's {sorted(source_ids)[:8]}: "
            "evaluate on data with the categories the model was trained on."
        )
    return {index: source_ids[name] for index, name in names.items()}


def _reference(image_id: int, example, with_masks: bool) -> dict[str, Any]:
    instances = example.instances
    reference = {
        "image_id": image_id,
        "height": example.image.height,
        "width": example.image.width,
        "boxes": instances.boxes,
        "labels": instances.labels,
        "iscrowd": instances.iscrowd,
        "areas": instances.areas,
    }
    if with_masks:
        reference["masks"] = [to_rle(mask) for mask in instances.masks]
    return reference


def _detections(
    processor, outputs, sizes, labels: dict[int, int], config: CocoEvalConfig
) -> list[dict[str, Any]]:
    results = processor.post_process_object_detection(outputs, threshold=config.threshold, target_sizes=sizes)
    # the pipeline's int() of each coordinate: truncation toward zero
    whole = np.trunc if config.pipeline_boxes else np.asarray
    return [
        {
            "boxes": whole(result["boxes"].detach().cpu().numpy().astype(np.float64).reshape(-1, 4)),
            "scores": result["scores"].detach().cpu().numpy().astype(np.float64),
            "labels": np.asarray([labels[int(label)] for label in result["labels"]], np.int64),
        }
        for result in results
    ]


def _crop_padding(outputs, pixel_mask) -> list:
    """Per image: its outputs with the mask logits cut to the image's own extent (the processor pads to 32s)."""
    logits = outputs.masks_queries_logits  # (batch, queries, H / s, W / s)
    pad_h, pad_w = pixel_mask.shape[-2:]
    cropped = []
    for index in range(logits.shape[0]):
        valid_h = int(pixel_mask[index].any(dim=1).sum())
        valid_w = int(pixel_mask[index].any(dim=0).sum())
        rows = max(1, round(logits.shape[-2] * valid_h / pad_h))
        cols = max(1, round(logits.shape[-1] * valid_w / pad_w))
        single = type(outputs)(
            class_queries_logits=outputs.class_queries_logits[index : index + 1],
            masks_queries_logits=logits[index : index + 1, :, :rows, :cols],
        )
        cropped.append(single)
    return cropped


def _segments(
    processor, outputs, pixel_mask, sizes, labels: dict[int, int], config: CocoEvalConfig
) -> list[dict]:
    predictions = []
    for single, size in zip(_crop_padding(outputs, pixel_mask), sizes, strict=True):
        (result,) = processor.post_process_instance_segmentation(
            single,
            threshold=config.threshold,
            mask_threshold=config.mask_threshold,
            overlap_mask_area_threshold=config.overlap_mask_area_threshold,
            target_sizes=[size],
            return_binary_maps=config.overlapping_masks,
        )
        segments = result["segments_info"]
        segmentation = result["segmentation"]
        if not segments:
            masks = []
        elif config.overlapping_masks:
            masks = [segmentation[j].cpu().numpy().astype(np.uint8) for j in range(len(segments))]
        else:
            masks = [(segmentation == segment["id"]).cpu().numpy().astype(np.uint8) for segment in segments]
        boxes = [mask_box(mask) for mask in masks]
        predictions.append(
            {
                "masks": [to_rle(mask) for mask in masks],
                "boxes": np.asarray(
                    [b if b is not None else np.zeros(4, np.float32) for b in boxes], np.float64
                ).reshape(-1, 4),
                "scores": np.asarray([segment["score"] for segment in segments], np.float64),
                "labels": np.asarray([labels[int(segment["label_id"])] for segment in segments], np.int64),
            }
        )
    return predictions


def evaluate_coco(
    model: str | os.PathLike | PreTrainedModel,
    source: DetectionSource,
    config: CocoEvalConfig | None = None,
    *,
    image_processor: Any = None,
    keep_predictions: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CocoEvalResult:
    """COCO AP of `model` (a folder / Hub id, or a model with its `image_processor`) on `source` (see the module
    docstring). `keep_predictions`: also return the per-image predictions (boxes, scores, labels, mask RLEs)."""
    import torch  # here, not at the top: the command line reads CocoEvalConfig's defaults without torch

    config = config or CocoEvalConfig()
    model, processor = _load(model, image_processor, config.device)
    segmenter = hasattr(model.config, "mask_feature_size") or "UniversalSegmentation" in type(model).__name__
    if segmenter and source.with_masks is False:
        raise ValueError(
            "an instance segmenter is scored on masks; this data source has none (no segmentation)."
        )
    labels = _label_map(model, source)
    count = len(source) if config.max_samples is None else min(len(source), config.max_samples)
    if count == 0:
        raise ValueError("the data source holds no images.")
    references, predictions = [], []
    pending: list[tuple[int, Any, dict]] = []  # (image id, original (height, width), processed inputs)

    def flush() -> None:
        if not pending:
            return
        batch = {key: torch.cat([inputs[key] for _, _, inputs in pending]) for key in pending[0][2]}
        batch = {key: value.to(config.device) for key, value in batch.items()}
        sizes = [size for _, size, _ in pending]
        with torch.no_grad():
            outputs = model(**batch)
        if segmenter:
            outputs_per_image = _segments(processor, outputs, batch["pixel_mask"], sizes, labels, config)
        else:
            outputs_per_image = _detections(processor, outputs, sizes, labels, config)
        for (image_id, _, _), prediction in zip(pending, outputs_per_image, strict=True):
            predictions.append({"image_id": image_id, **prediction})
        pending.clear()

    for index in range(count):
        example = source[index]
        references.append(_reference(index, example, segmenter))
        inputs = dict(processor(images=[example.image], return_tensors="pt"))
        inputs.pop("labels", None)
        if pending and (
            pending[0][2]["pixel_values"].shape != inputs["pixel_values"].shape
            or len(pending) == config.batch_size
        ):
            flush()
        pending.append((index, (example.image.height, example.image.width), inputs))
        if progress is not None:
            progress(index + 1, count)
    flush()
    iou_types = ("bbox", "segm") if segmenter else ("bbox",)
    scores = coco_scores(predictions, references, len(source.label_names), iou_types, source.label_names)
    if (
        source.issues.clipped_boxes
        or source.issues.dropped_empty_boxes
        or source.issues.dropped_mask_mismatches
    ):
        logger.warning("annotations: %s", source.issues.summary())
    return CocoEvalResult(
        task="instance_segmentation" if segmenter else "detection",
        scores=scores,
        num_images=count,
        label_names=list(source.label_names),
        annotation_issues=source.issues.to_dict(),
        predictions=predictions if keep_predictions else [],
    )


__all__ = ["CocoEvalConfig", "CocoEvalResult", "evaluate_coco"]
