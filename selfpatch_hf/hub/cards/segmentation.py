"""Model card of a fine-tuned semantic-segmentation model (UperNet on a SelfPatch / DINO backbone): metadata the Hub
validates (`pipeline_tag: image-segmentation`, `model-index` with mIoU / mAcc / aAcc) and a body saying what the
model is, how it was fine-tuned, and what loading it needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from selfpatch_hf.hub.cards.backbone import DINO_CITATION, SELFPATCH_CITATION


@dataclass
class SegmentationCardInfo:
    backbone: str  # where the backbone came from (path or Hub id)
    backbone_class: str  # Dinov2Backbone / SelfPatchSiglipBackbone
    dataset: str
    num_labels: int
    crop_size: tuple[int, int]
    steps: int
    global_batch_size: int
    learning_rate: float
    layer_decay: float
    schedule: str
    inference_mode: str
    scores: dict[str, float] | None = None  # mean_iou, mean_accuracy, overall_accuracy (fractions)
    eval_split: str | None = None
    hub_dataset_id: str | None = None
    data_description: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)


def _usage(info: SegmentationCardInfo) -> str:
    needs_import = info.backbone_class != "Dinov2Backbone"
    lines = ["```python", "from transformers import pipeline"]
    if needs_import:
        lines.append(
            "import selfpatch_hf.models.dense.siglip_backbone  # registers the CLS-free SelfPatch backbone"
        )
    lines += [
        "",
        'segmenter = pipeline("image-segmentation", model="<repo-id-or-local-folder>")',
        'segments = segmenter("image.jpg")  # one {"label", "mask"} per predicted class',
        "```",
    ]
    return "\n".join(lines)


def render_segmentation_card(info: SegmentationCardInfo) -> ModelCard:
    eval_results = []
    if info.scores:
        for key, name in (("mean_iou", "mIoU"), ("mean_accuracy", "mAcc"), ("overall_accuracy", "aAcc")):
            eval_results.append(
                EvalResult(
                    task_type="image-segmentation",
                    dataset_type=info.hub_dataset_id or "custom",
                    dataset_name=info.dataset,
                    dataset_split=info.eval_split,
                    metric_type=key,
                    metric_name=name,
                    metric_value=round(100 * info.scores[key], 2),
                )
            )
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=["selfpatch", "semantic-segmentation", "upernet", "vision-transformer"],
        datasets=[info.hub_dataset_id] if info.hub_dataset_id else None,
        model_name="upernet-selfpatch" if eval_results else None,
        eval_results=eval_results or None,
    )
    height, width = info.crop_size
    if info.scores:
        scores = (
            f"| mIoU | mAcc | aAcc |\n|---|---|---|\n| {100 * info.scores['mean_iou']:.2f} | "
            f"{100 * info.scores['mean_accuracy']:.2f} | {100 * info.scores['overall_accuracy']:.2f} |\n\n"
            f"On the `{info.eval_split}` split, {info.inference_mode}-image inference "
            f"({'sliding windows' if info.inference_mode == 'slide' else 'one pass per image'} after resizing the "
            "image to fit the training scale, aspect ratio kept), scored at the ground truth's resolution."
        )
    else:
        scores = "Not evaluated (no evaluation split was given)."
    loading = (
        'It loads with plain transformers (`AutoModelForSemanticSegmentation`, `pipeline("image-segmentation")`): '
        "the backbone is a native `Dinov2Backbone` holding the ViT's weights."
        if info.backbone_class == "Dinov2Backbone"
        else "Its backbone is `SelfPatchSiglipBackbone` (the CLS-free SelfPatch ViT, not a transformers class): "
        "install selfpatch-hf and `import selfpatch_hf.models.dense.siglip_backbone` before loading. No remote code is used."
    )
    data_line = info.data_description or f"`{info.dataset}`"
    content = f"""---
{data.to_yaml()}
---

# UperNet semantic segmentation on a SelfPatch / DINO ViT backbone

`UperNetForSemanticSegmentation` ({info.num_labels} classes) fine-tuned from the backbone `{info.backbone}` with
`training/finetune_segmentation.py` of selfpatch-hf.

## Results

{scores}

## Usage

{loading}

{_usage(info)}

The saved image processor resizes to {height} x {width} (whole-image inference) and normalises with the ImageNet
statistics; its `post_process_semantic_segmentation` resizes the logits back to the image.

## Fine-tuning

- data: {data_line}; random rescale (ratio 0.5-2.0), {height} x {width} crops, flips, photometric distortion
- {info.steps} optimiser steps of {info.global_batch_size} images, AdamW, peak learning rate {info.learning_rate:g},
  layer-wise decay {info.layer_decay:g}, {info.schedule} schedule with linear warm-up
- head: UperNet on the backbone's selected blocks at a single stride (the paper fine-tunes a Semantic FPN with
  mmsegmentation; transformers has UperNet)

## Citation

```bibtex
{SELFPATCH_CITATION}

{DINO_CITATION}
```
"""
    return ModelCard(content)


def write_segmentation_card(folder: str | Path, info: SegmentationCardInfo) -> Path:
    path = Path(folder) / "README.md"
    render_segmentation_card(info).save(path)
    return path


__all__ = ["SegmentationCardInfo", "render_segmentation_card", "write_segmentation_card"]
