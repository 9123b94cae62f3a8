"""Model card of a fine-tuned detector (Deformable DETR) or instance segmenter (Mask2Former) on a SelfPatch / DINO
backbone: metadata the Hub validates (`pipeline_tag` object-detection / image-segmentation, `model-index` with box
and mask AP in percent) and a body saying what the model is, how it was fine-tuned and how to load it. Rendered from
`detection_template.md` with `huggingface_hub.ModelCard.from_template`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from selfpatch_hf.hub.cards.shared import (
    REPO_ID_PLACEHOLDER,
    citations,
    fine_tuned_card_data,
    render_card,
    save_card,
)

TEMPLATE_NAME = "detection_template.md"
# pycocotools' statistics shown on the card (fractions in `scores`, percent on the card)
CARD_STATISTICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_IOU_NAMES = {"bbox": "box", "segm": "mask"}


@dataclass
class DetectionCardInfo:
    head: str  # deformable-detr / mask2former
    model_class: str  # DeformableDetrForObjectDetection / Mask2FormerForUniversalSegmentation
    backbone: str  # where the backbone came from (path or Hub id)
    backbone_class: str  # BeitBackbone / SwinBackbone / SelfPatchSiglipBackbone
    dataset: str
    num_labels: int
    eval_scale: tuple[int, int]  # shorter side, longest side
    eval_threshold: float  # the pipeline's `threshold` the card's AP was measured at
    steps: int
    global_batch_size: int
    learning_rate: float
    layer_decay: float
    schedule: str
    scores: dict[str, dict[str, float]] | None = None  # per IoU type ("bbox", "segm"): coco_scores' fractions
    eval_split: str | None = None
    num_eval_images: int | None = None
    hub_dataset_id: str | None = None
    data_description: str | None = None

    @property
    def pipeline_tag(self) -> str:
        return "image-segmentation" if self.head == "mask2former" else "object-detection"


def card_percentages(info: DetectionCardInfo) -> dict[str, dict[str, float]] | None:
    """{"box" | "mask": {statistic: percent rounded to 2 decimals}}, as the card shows them (-1: no ground truth)."""
    if not info.scores:
        return None
    return {
        _IOU_NAMES[iou_type]: {
            name: round(100 * values[name], 2) if values[name] >= 0 else -1.0 for name in CARD_STATISTICS
        }
        for iou_type, values in info.scores.items()
    }


def render_detection_card(info: DetectionCardInfo) -> ModelCard:
    percentages = card_percentages(info)
    tags = ["selfpatch", "vision-transformer", info.head]
    tags.append("instance-segmentation" if info.head == "mask2former" else "object-detection")
    card_data = fine_tuned_card_data(
        info.pipeline_tag,
        tags,
        f"{info.head}-selfpatch",
        info.dataset,
        info.hub_dataset_id,
        info.eval_split,
        [
            (f"{kind}_{name}", f"{kind} {name}", values[name])
            for kind, values in (percentages or {}).items()
            for name in ("AP", "AP50", "AP75")
        ],
    )
    return render_card(
        TEMPLATE_NAME,
        card_data,
        info=info,
        scores=percentages,
        statistics=CARD_STATISTICS,
        data_line=info.data_description or f"`{info.dataset}`",
        repo_id=REPO_ID_PLACEHOLDER,
        citations=citations("selfpatch"),
    )


def write_detection_card(folder: str | Path, info: DetectionCardInfo) -> Path:
    return save_card(render_detection_card(info), folder)


def read_card_scores(text: str) -> dict[str, Any]:
    """The `model-index` metrics of a rendered card as {metric type: value} (what a reader of the card sees)."""
    card = ModelCard(text)
    return {result.metric_type: result.metric_value for result in (card.data.eval_results or [])}


__all__ = [
    "CARD_STATISTICS",
    "DetectionCardInfo",
    "card_percentages",
    "read_card_scores",
    "render_detection_card",
    "write_detection_card",
]
