"""Model card of a fine-tuned semantic-segmentation model (UperNet on a SelfPatch / DINO backbone): metadata the Hub
validates (`pipeline_tag: image-segmentation`, `model-index` with mIoU / mAcc / aAcc in percent) and a body saying
what the model is, how it was fine-tuned, and what loading it needs. Rendered from `segmentation_template.md` with
`huggingface_hub.ModelCard.from_template`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from selfpatch_hf.hub.cards.shared import LICENSE, REPO_ID_PLACEHOLDER, citations, render_card, save_card

TEMPLATE_NAME = "segmentation_template.md"


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
    eval_results = []
    percentages = None
    if info.scores:
        percentages = {
            key: 100 * info.scores[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")
        }
        for key, name in (("mean_iou", "mIoU"), ("mean_accuracy", "mAcc"), ("overall_accuracy", "aAcc")):
            eval_results.append(
                EvalResult(
                    task_type="image-segmentation",
                    dataset_type=info.hub_dataset_id or "custom",
                    dataset_name=info.dataset,
                    dataset_split=info.eval_split,
                    metric_type=key,
                    metric_name=name,
                    metric_value=round(percentages[key], 2),
                )
            )
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license=LICENSE,
        tags=["selfpatch", "semantic-segmentation", "upernet", "vision-transformer"],
        datasets=[info.hub_dataset_id] if info.hub_dataset_id else None,
        model_name="upernet-selfpatch" if eval_results else None,
        eval_results=eval_results or None,
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
