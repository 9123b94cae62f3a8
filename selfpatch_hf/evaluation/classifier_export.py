"""The saved result of `selfpatch eval linear`: the exportable linear head of a `TrainedClassifier` with its
backbone as a `ViTForImageClassification` / `SwinForImageClassification` folder (weights, the evaluation view's image
processor), and its top-1 / top-5 measured through the saved folder itself, as `pipeline("image-classification")`
computes them (`selfpatch_hf.evaluation.linear_classification` for the protocol and the training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from selfpatch_hf.evaluation.configs import LinearClassificationConfig
from selfpatch_hf.evaluation.features import FrozenBackbone, progress_bar
from selfpatch_hf.evaluation.labelled_images import LabelledSplit
from selfpatch_hf.evaluation.linear_classification import (
    EXPORTABLE,
    EXPORTABLE_FEATURE,
    EXPORTABLE_MODEL_TYPES,
    PROTOCOL,
    HeadScores,
    TrainedClassifier,
    classifier_image_processor,
    topk_accuracy,
)


def exportable_head(trained: TrainedClassifier) -> torch.nn.Linear:
    """The head that `ViTForImageClassification` / `SwinForImageClassification` computes."""
    return trained.head(EXPORTABLE if trained.spec.needs_exportable_head else PROTOCOL)


def classifier_model(backbone: FrozenBackbone, trained: TrainedClassifier):
    """The backbone and the exportable head as a transformers classification model (on the CPU, fp32)."""
    import copy

    from transformers import SwinForImageClassification, ViTForImageClassification

    model_type = backbone.model.config.model_type
    if model_type not in EXPORTABLE_MODEL_TYPES or backbone.stage != backbone.num_stages:
        raise ValueError(
            f"--save-classifier writes ViT and Swin backbones (Swin: the last stage), not this {model_type!r} "
            f"backbone{f' at stage {backbone.stage}' if backbone.hierarchical else ''}."
        )
    config = copy.deepcopy(backbone.model.config)
    config.id2label = dict(enumerate(trained.label_names))
    config.label2id = {name: index for index, name in enumerate(trained.label_names)}
    model_class = ViTForImageClassification if model_type == "vit" else SwinForImageClassification
    model = model_class(config).eval()
    base = getattr(model, model.base_model_prefix)
    incompatible = base.load_state_dict(backbone.model.state_dict(), strict=False)
    unexpected = [key for key in incompatible.unexpected_keys if not key.startswith("pooler.")]
    if incompatible.missing_keys or unexpected:
        raise ValueError(
            f"The backbone's weights do not fit {model_class.__name__} (missing {incompatible.missing_keys[:3]}, "
            f"unexpected {unexpected[:3]})."
        )
    head = exportable_head(trained)
    with torch.no_grad():
        model.classifier.weight.copy_(head.weight)
        model.classifier.bias.copy_(head.bias)
    return model.float().cpu()


def save_classifier(
    folder: str | Path,
    backbone: FrozenBackbone,
    trained: TrainedClassifier,
    config: LinearClassificationConfig,
) -> str:
    """Writes the exportable head with its backbone and the evaluation view's image processor to `folder`;
    returns the model's class name."""
    model = classifier_model(backbone, trained)
    model.save_pretrained(folder)
    classifier_image_processor(backbone, config).save_pretrained(folder)
    return type(model).__name__


@torch.no_grad()
def score_classifier_folder(
    folder: str | Path,
    split: LabelledSplit,
    feature: str = EXPORTABLE_FEATURE,
    batch_size: int = 32,
    show_progress: bool = False,
) -> HeadScores:
    """Top-1 / top-5 of a saved classification folder on the readable images of `split`, through its own image
    processor and `AutoModelForImageClassification`: what `pipeline("image-classification")` predicts."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
    logits, labels = [], []
    bar = progress_bar(len(split), "scoring the saved classifier", show_progress)
    for start in range(0, len(split), batch_size):
        indices = np.arange(start, min(start + batch_size, len(split)))
        kept = [
            (i, image) for i, image in zip(indices, split.images(indices), strict=True) if image is not None
        ]
        if kept:
            inputs = processor(images=[image for _, image in kept], return_tensors="pt")
            logits.append(model(pixel_values=inputs["pixel_values"]).logits.float())
            labels.append(torch.as_tensor(split.labels[[i for i, _ in kept]]))
        bar.update(len(indices))
    bar.close()
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    return HeadScores(
        topk_accuracy(all_logits, all_labels, 1), topk_accuracy(all_logits, all_labels, 5), feature
    )


__all__ = ["classifier_model", "exportable_head", "save_classifier", "score_classifier_folder"]
