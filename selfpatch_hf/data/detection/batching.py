"""Batches of augmented images in the label formats of transformers' detectors, padded with a pixel mask.

Images of one batch differ in size (multi-scale training): each is padded at the bottom and right to the batch's
largest height and width, rounded up to `size_divisor` (32: the coarsest feature map then covers whole cells), and
`pixel_mask` (batch, H, W) marks the real pixels (1) against the padding (0), as the detectors' image processors
make it.

- `to_detr_labels` (the DETR family, e.g. `DeformableDetrForObjectDetection`): one dict per image with
  `class_labels` (N,) and `boxes` (N, 4) as (centre x, centre y, width, height) divided by the PADDED batch size,
  which is what the processors' `pad(..., update_bboxes=True)` produces (and what their post-processing assumes for
  an unpadded single image);
- `to_mask2former_labels` (`Mask2FormerForUniversalSegmentation`): `mask_labels`, one (N, H, W) float tensor of
  binary masks per image at the padded size, and `class_labels`, one (N,) tensor per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from selfpatch_hf.data.detection.augmentation import DetectionSample

LabelFormat = Literal["detr", "mask2former"]


def padded_size(sizes: Sequence[tuple[int, int]], size_divisor: int = 32) -> tuple[int, int]:
    """The (height, width) every image of a batch is padded to."""
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}.")
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    return math.ceil(height / size_divisor) * size_divisor, math.ceil(width / size_divisor) * size_divisor


def to_detr_labels(sample: DetectionSample, padded: tuple[int, int]) -> dict[str, torch.Tensor]:
    height, width = padded
    boxes = sample.instances.boxes.astype(np.float32).reshape(-1, 4)
    centre_size = np.stack(
        [
            (boxes[:, 0] + boxes[:, 2]) / 2 / width,
            (boxes[:, 1] + boxes[:, 3]) / 2 / height,
            (boxes[:, 2] - boxes[:, 0]) / width,
            (boxes[:, 3] - boxes[:, 1]) / height,
        ],
        axis=1,
    )
    return {
        "class_labels": torch.from_numpy(sample.instances.labels.astype(np.int64)),
        "boxes": torch.from_numpy(centre_size.astype(np.float32)),
    }


def to_mask2former_labels(
    sample: DetectionSample, padded: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    masks = sample.instances.masks
    if masks is None:
        raise ValueError("Mask2Former trains on masks; this data source has none (no segmentation field).")
    height, width = padded
    out = np.zeros((len(masks), height, width), np.float32)
    out[:, : masks.shape[1], : masks.shape[2]] = masks
    return torch.from_numpy(out), torch.from_numpy(sample.instances.labels.astype(np.int64))


def collate_detection(
    samples: Sequence[DetectionSample], label_format: LabelFormat = "detr", size_divisor: int = 32
) -> dict[str, torch.Tensor | list]:
    """Pad `samples` into `pixel_values` (B, 3, H, W) and `pixel_mask` (B, H, W), with their labels in
    `label_format`."""
    if not samples:
        raise ValueError("cannot collate an empty batch.")
    sizes = [tuple(sample.pixel_values.shape[1:]) for sample in samples]
    height, width = padded_size(sizes, size_divisor)
    pixel_values = torch.zeros(len(samples), 3, height, width)
    pixel_mask = torch.zeros(len(samples), height, width, dtype=torch.long)
    for index, (sample, (h, w)) in enumerate(zip(samples, sizes, strict=True)):
        pixel_values[index, :, :h, :w] = torch.from_numpy(sample.pixel_values)
        pixel_mask[index, :h, :w] = 1
    batch: dict[str, torch.Tensor | list] = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
    if label_format == "detr":
        batch["labels"] = [to_detr_labels(sample, (height, width)) for sample in samples]
    elif label_format == "mask2former":
        pairs = [to_mask2former_labels(sample, (height, width)) for sample in samples]
        batch["mask_labels"] = [masks for masks, _ in pairs]
        batch["class_labels"] = [labels for _, labels in pairs]
    else:
        raise ValueError(f'label_format must be "detr" or "mask2former", got {label_format!r}.')
    return batch


__all__ = ["LabelFormat", "collate_detection", "padded_size", "to_detr_labels", "to_mask2former_labels"]
