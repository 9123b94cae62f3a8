"""Model card of a linear image classifier on a frozen SelfPatch / DINO backbone (`selfpatch eval linear
--save-classifier`): metadata the Hub validates (`pipeline_tag: image-classification`, `model-index` with top-1 /
top-5 in percent, measured through the saved folder itself) and a body saying which feature the saved head
classifies, how it was trained and how the protocol's own feature scored. Rendered from
`classification_template.md` with `huggingface_hub.ModelCard.from_template`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from selfpatch_hf.hub.cards.shared import LICENSE, REPO_ID_PLACEHOLDER, citations, render_card, save_card

TEMPLATE_NAME = "classification_template.md"


@dataclass
class ClassificationCardInfo:
    backbone: str  # where the backbone came from (path or Hub id)
    model_class: str  # ViTForImageClassification / SwinForImageClassification
    feature: str  # what the saved head classifies, e.g. "CLS of the last block"
    dataset: str
    eval_split: str
    num_labels: int
    num_train: int
    num_eval: int
    top1: float  # percent, of the saved folder on eval_split
    top5: float
    epochs: int
    batch_size: int
    learning_rate: float  # the optimiser's
    lr_sweep: list[float] | None  # the rates per 256 images the saved head's was chosen from, on eval_split
    augmentation: bool
    resize: int
    crop: int
    protocol_feature: str | None = None  # the protocol's own feature, where the saved head is another one
    protocol_top1: float | None = None
    protocol_top5: float | None = None
    hub_dataset_id: str | None = None


def render_classification_card(info: ClassificationCardInfo) -> ModelCard:
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=info.hub_dataset_id or "custom",
            dataset_name=info.dataset,
            dataset_split=info.eval_split,
            metric_type=metric,
            metric_name=name,
            metric_value=round(value, 2),
        )
        for metric, name, value in (("accuracy", "top-1", info.top1), ("top_5_accuracy", "top-5", info.top5))
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license=LICENSE,
        tags=["selfpatch", "image-classification", "linear-evaluation", "vision-transformer"],
        datasets=[info.hub_dataset_id] if info.hub_dataset_id else None,
        model_name="linear-classifier-selfpatch",
        eval_results=eval_results,
    )
    return render_card(
        TEMPLATE_NAME, card_data, info=info, repo_id=REPO_ID_PLACEHOLDER, citations=citations("selfpatch")
    )


def write_classification_card(folder: str | Path, info: ClassificationCardInfo) -> Path:
    return save_card(render_classification_card(info), folder)


__all__ = ["ClassificationCardInfo", "render_classification_card", "write_classification_card"]
