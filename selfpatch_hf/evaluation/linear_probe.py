"""Linear-probe semantic segmentation on frozen patch features.

A BatchNorm + 1x1 convolution head (linear at inference, the "linear" decoder of the DINOv2 evaluations) is
trained on the frozen last-layer patch features of a `datasets` dataset with an image column and a mask
column. Images are resized to `image_size` x `image_size`; during training the logits are upsampled
bilinearly to the label map resized (nearest) to the same size; at evaluation they are upsampled to each
mask's original size. Scores: mIoU, mAcc and aAcc (`semseg_metrics`), with the ignore index left out.

For ADE20K (`scene_parse_150`, columns `image` and `annotation`), pass `reduce_labels=True`: label 0
("other") is ignored and classes 1..150 become 0..149.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selfpatch_hf.evaluation.configs import LinearProbeConfig
from selfpatch_hf.evaluation.features import PatchFeatureExtractor, progress_bar, resize_image
from selfpatch_hf.evaluation.semseg_metrics import (
    ConfusionMatrix,
    SegmentationScores,
    integer_labels,
    reduce_zero_label,
)

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "pixel_values")
MASK_COLUMNS = ("annotation", "mask", "semantic_segmentation", "segmentation", "seg", "label", "labels")


@dataclass
class LinearProbeResult:
    scores: SegmentationScores
    num_labels: int
    num_train: int
    num_eval: int
    final_train_loss: float

    def to_dict(self) -> dict:
        """The scores in percent (mIoU, mAcc, aAcc and per class), with the sizes and the last training loss."""
        scores = self.scores.to_dict()
        return {
            **{key: _percent(value) for key, value in scores.items()},
            "num_labels": self.num_labels,
            "num_train": self.num_train,
            "num_eval": self.num_eval,
            "final_train_loss": self.final_train_loss,
        }


def _percent(value):
    if isinstance(value, list):
        return [_percent(v) for v in value]
    return 100.0 * value


def resolve_columns(
    dataset, image_column: str | None = None, mask_column: str | None = None
) -> tuple[str, str]:
    """Pick the image and mask columns (explicit names, else the usual ones whose feature is an image)."""
    import datasets

    columns = list(dataset.column_names)
    features = dataset.features or {}

    def is_image(name: str) -> bool:
        return isinstance(features.get(name), datasets.Image)

    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if mask_column is None:
        mask_column = next((c for c in MASK_COLUMNS if c in columns and is_image(c)), None)
    missing = [
        f"{kind} column {name!r}" if name else f"{kind} column"
        for kind, name in (("image", image_column), ("mask", mask_column))
        if name is None or name not in columns
    ]
    if missing:
        raise ValueError(
            f"Could not find the {' and '.join(missing)} among {columns}; pass image_column= / mask_column= "
            "(CLI: --image-column / --mask-column)."
        )
    return image_column, mask_column


def _mask_array(mask) -> np.ndarray:
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGB", "RGBA"):
            raise ValueError(
                "Colour-coded RGB masks are not supported: convert them to class-index masks (mode 'L' or 'P')."
            )
        return integer_labels(mask)
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"A mask must be a 2-D class-index map, got shape {array.shape}.")
    return integer_labels(array)


def _image(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    return Image.fromarray(np.asarray(value)).convert("RGB")


def _subset(dataset, limit: int | None):
    if limit is not None and limit < len(dataset):
        return dataset.select(range(limit))
    return dataset


def _batches(dataset, size: int):
    for start in range(0, len(dataset), size):
        yield dataset[start : min(start + size, len(dataset))]


class LinearSegmentationHead(torch.nn.Module):
    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(hidden_size)
        self.classifier = torch.nn.Conv2d(hidden_size, num_labels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # (B, h, w, C) -> (B, K, h, w)
        return self.classifier(self.norm(features.permute(0, 3, 1, 2)))


def _max_label(dataset, mask_column: str, config: LinearProbeConfig) -> int:
    largest = -1
    for batch in _batches(dataset.select_columns([mask_column]), 64):
        for mask in batch[mask_column]:
            array = _mask_array(mask)
            if config.reduce_labels:
                array = reduce_zero_label(array, config.ignore_index)
            array = array[array != config.ignore_index]
            if array.size:
                largest = max(largest, int(array.max()))
    return largest


def extract_training_set(
    dataset,
    extractor: PatchFeatureExtractor,
    config: LinearProbeConfig,
    image_column: str,
    mask_column: str,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (n, h, w, C) and label maps resized to image_size (n, S, S), ignore index applied.
    `show_progress`: a progress bar on a terminal."""
    size = config.image_size
    features, labels = [], []
    bar = progress_bar(len(dataset), "features of the training images", show_progress)
    for batch in _batches(dataset, config.feature_batch_size):
        images = torch.stack([resize_image(_image(img), (size, size)) for img in batch[image_column]])
        features.append(extractor(images).float().cpu())
        bar.update(len(images))
        for mask in batch[mask_column]:
            array = _mask_array(mask)
            if config.reduce_labels:
                array = reduce_zero_label(array, config.ignore_index)
            # The nearest-neighbour resize needs a mode that holds every label: 'I' (int32).
            resized = Image.fromarray(array.astype(np.int32)).resize((size, size), Image.Resampling.NEAREST)
            labels.append(torch.from_numpy(np.asarray(resized).astype(np.int64)))
    bar.close()
    return torch.cat(features), torch.stack(labels)


def train_linear_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    config: LinearProbeConfig,
    log: Callable[[str], None] | None = None,
) -> tuple[LinearSegmentationHead, float]:
    """AdamW with a cosine schedule on cached features; returns the head and the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    head = LinearSegmentationHead(features.shape[-1], num_labels)
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(features) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, config.epochs * steps_per_epoch)
    )
    epoch_loss = float("nan")
    head.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(features), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            target = labels[index]
            if (target == config.ignore_index).all():
                continue
            logits = F.interpolate(
                head(features[index]), size=target.shape[-2:], mode="bilinear", align_corners=False
            )
            loss = F.cross_entropy(logits, target, ignore_index=config.ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + loss.item() * len(index), count + len(index)
        epoch_loss = total / max(count, 1)
        if log is not None:
            log(f"linear probe epoch {epoch + 1}/{config.epochs}: loss {epoch_loss:.4f}")
    return head.eval(), epoch_loss


@torch.no_grad()
def evaluate_linear_head(
    head: LinearSegmentationHead,
    dataset,
    extractor: PatchFeatureExtractor,
    config: LinearProbeConfig,
    image_column: str,
    mask_column: str,
    num_labels: int,
    show_progress: bool = False,
) -> SegmentationScores:
    """Score the head on `dataset` at each mask's original resolution."""
    confusion = ConfusionMatrix(num_labels, config.ignore_index, config.reduce_labels)
    size = config.image_size
    bar = progress_bar(len(dataset), "scoring the evaluation images", show_progress)
    for batch in _batches(dataset, config.feature_batch_size):
        images = torch.stack([resize_image(_image(img), (size, size)) for img in batch[image_column]])
        logits = head(extractor(images).float().cpu())
        bar.update(len(images))
        for logit, mask in zip(logits, batch[mask_column], strict=True):
            reference = _mask_array(mask)
            upsampled = F.interpolate(logit[None], size=reference.shape, mode="bilinear", align_corners=False)
            confusion.update(upsampled[0].argmax(dim=0).numpy(), reference)
    bar.close()
    return confusion.compute()


def run_linear_probe(
    extractor: PatchFeatureExtractor,
    train_dataset,
    eval_dataset,
    config: LinearProbeConfig | None = None,
    *,
    image_column: str | None = None,
    mask_column: str | None = None,
    log: Callable[[str], None] | None = None,
    show_progress: bool = False,
) -> LinearProbeResult:
    """Train a linear segmentation head on `train_dataset`'s frozen features and score it on `eval_dataset`.
    `log` receives one line per epoch; `show_progress` shows bars for the feature passes on a terminal."""
    config = config or LinearProbeConfig()
    if config.image_size % extractor.patch_size:
        raise ValueError(
            f"image_size {config.image_size} must be a multiple of the patch size {extractor.patch_size}."
        )
    image_column, mask_column = resolve_columns(train_dataset, image_column, mask_column)
    train_dataset = _subset(train_dataset, config.max_train_samples)
    eval_dataset = _subset(eval_dataset, config.max_eval_samples)

    features, labels = extract_training_set(
        train_dataset, extractor, config, image_column, mask_column, show_progress
    )
    num_labels = config.num_labels
    if num_labels is None:
        # Largest label of both splits: a class may be absent from a small training set.
        valid = labels[labels != config.ignore_index]
        if valid.numel() == 0:
            raise ValueError("Every training pixel is ignored; check ignore_index / reduce_labels.")
        num_labels = max(int(valid.max()), _max_label(eval_dataset, mask_column, config)) + 1
    outside = (labels != config.ignore_index) & ((labels < 0) | (labels >= num_labels))
    if outside.any():
        raise ValueError(
            f"Training label {int(labels[outside].max())} is outside [0, {num_labels}); set num_labels, "
            "ignore_index or reduce_labels to match the dataset."
        )
    head, final_loss = train_linear_head(features, labels, num_labels, config, log)
    scores = evaluate_linear_head(
        head, eval_dataset, extractor, config, image_column, mask_column, num_labels, show_progress
    )
    return LinearProbeResult(scores, num_labels, len(train_dataset), len(eval_dataset), final_loss)
