"""Model card of a fine-tuned semantic-segmentation model (UperNet on a SelfPatch / DINO backbone): metadata the Hub
validates (`pipeline_tag: image-segmentation`, `model-index` with mIoU / mAcc / aAcc in percent) and a body saying
what the model is, how it was fine-tuned, and what loading it needs. Rendered from `segmentation_template.md` with
`huggingface_hub.ModelCard.from_template`."""

from __future__ import annotations

from dataclasses import dataclass, field
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

TEMPLATE_NAME = "segmentation_template.md"
SCORE_NAMES = {"mean_iou": "mIoU", "mean_accuracy": "mAcc", "overall_accuracy": "aAcc"}  # metric type: name


@dataclass
class SegmentationCardInfo:
    backbone: str  # where the backbone came from (path or Hub id)
    backbone_class: str  # Dinov2Backbone / BeitBackbone / SwinBackbone / SelfPatchSiglipBackbone
    dataset: str
    num_labels: int
    crop_size: tuple[int, int]
    steps: int
    global_batch_size: int
    learning_rate: float
    layer_decay: float
    schedule: str
    inference_mode: str
    multi_scale: bool = False  # UperNet on strides 4-32 (the reference's neck, or Swin's stages)
    scores: dict[str, float] | None = None  # mean_iou, mean_accuracy, overall_accuracy (fractions)
    eval_split: str | None = None
    hub_dataset_id: str | None = None
    data_description: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)


def render_segmentation_card(info: SegmentationCardInfo) -> ModelCard:
    percentages = None
    if info.scores:
        percentages = {key: 100 * info.scores[key] for key in SCORE_NAMES}
    card_data = fine_tuned_card_data(
        "image-segmentation",
        ["selfpatch", "semantic-segmentation", "upernet", "vision-transformer"],
        "upernet-selfpatch",
        info.dataset,
        info.hub_dataset_id,
        info.eval_split,
        [(key, name, round(percentages[key], 2)) for key, name in SCORE_NAMES.items()] if percentages else [],
    )
    return render_card(
        TEMPLATE_NAME,
        card_data,
        info=info,
        scores=percentages,
        data_line=info.data_description or f"`{info.dataset}`",
        repo_id=REPO_ID_PLACEHOLDER,
        citations=citations("selfpatch"),
    )


def write_segmentation_card(folder: str | Path, info: SegmentationCardInfo) -> Path:
    return save_card(render_segmentation_card(info), folder)


__all__ = ["SegmentationCardInfo", "render_segmentation_card", "write_segmentation_card"]
