"""Semantic-segmentation inference of a fine-tuned model on whole images or sliding windows, and its mIoU / mAcc /
aAcc over a dataset (mmsegmentation's `test_cfg` modes).

- `whole`: the resized image in one pass; its sides are padded up to multiples of the patch size (a ViT drops a
  partial patch) and the logits cropped back.
- `slide`: windows of `crop_size` every `stride` pixels (the last window aligned to the border), logits averaged where
  windows overlap; an image smaller than a window is padded (mmseg's `slide_inference`).

In both modes the logits are then resized bilinearly to the ground truth's resolution and scored with
`semseg_metrics.ConfusionMatrix` (one confusion matrix, constant memory; summed over processes by the caller).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfpatch_hf.evaluation.semseg_metrics import ConfusionMatrix

InferenceMode = Literal["whole", "slide"]


def _pad_to(pixel_values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    pad_h, pad_w = height - pixel_values.shape[-2], width - pixel_values.shape[-1]
    if pad_h <= 0 and pad_w <= 0:
        return pixel_values
    return F.pad(pixel_values, (0, max(pad_w, 0), 0, max(pad_h, 0)))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    pixel_values: torch.Tensor,
    num_labels: int,
    mode: InferenceMode = "whole",
    crop_size: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    patch_size: int = 16,
) -> torch.Tensor:
    """(batch, 3, H, W) normalised images -> (batch, num_labels, H, W) logits."""
    batch, _, height, width = pixel_values.shape
    if mode == "whole":
        padded = _pad_to(pixel_values, _round_up(height, patch_size), _round_up(width, patch_size))
        return model(pixel_values=padded).logits[..., :height, :width]
    if mode != "slide":
        raise ValueError(f"Inference mode must be 'whole' or 'slide', got {mode!r}.")
    crop_h, crop_w = crop_size
    stride_h, stride_w = stride
    if not (0 < stride_h <= crop_h and 0 < stride_w <= crop_w):
        raise ValueError(f"The sliding stride {stride} must be positive and at most the window {crop_size}.")
    padded = _pad_to(pixel_values, max(height, crop_h), max(width, crop_w))
    full_h, full_w = padded.shape[-2:]
    logits = padded.new_zeros((batch, num_labels, full_h, full_w))
    counts = padded.new_zeros((1, 1, full_h, full_w))
    rows = max(full_h - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(full_w - crop_w + stride_w - 1, 0) // stride_w + 1
    for row in range(rows):
        for col in range(cols):
            top = min(row * stride_h, full_h - crop_h)
            left = min(col * stride_w, full_w - crop_w)
            window = padded[..., top : top + crop_h, left : left + crop_w]
            logits[..., top : top + crop_h, left : left + crop_w] += model(pixel_values=window).logits
            counts[..., top : top + crop_h, left : left + crop_w] += 1
    return (logits / counts)[..., :height, :width]


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    examples: Iterable[tuple[np.ndarray, np.ndarray]],
    num_labels: int,
    ignore_index: int = 255,
    mode: InferenceMode = "whole",
    crop_size: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    patch_size: int = 16,
    device: torch.device | str = "cpu",
    autocast: Callable[[], object] | None = None,
) -> ConfusionMatrix:
    """Confusion matrix of `model` over `(pixel_values (3, h, w), labels (H, W))` examples, one image at a time
    (images differ in size); predictions are made at (h, w) and resized to (H, W)."""
    confusion = ConfusionMatrix(num_labels, ignore_index)
    was_training = model.training
    model.eval()
    try:
        for pixel_values, labels in examples:
            inputs = torch.as_tensor(pixel_values, device=device).unsqueeze(0)
            if autocast is not None:
                with autocast():
                    logits = predict_logits(model, inputs, num_labels, mode, crop_size, stride, patch_size)
            else:
                logits = predict_logits(model, inputs, num_labels, mode, crop_size, stride, patch_size)
            logits = F.interpolate(logits.float(), size=labels.shape, mode="bilinear", align_corners=False)
            confusion.update(logits.argmax(1)[0].cpu().numpy(), labels)
    finally:
        model.train(was_training)
    return confusion


__all__ = ["InferenceMode", "evaluate_segmentation", "predict_logits"]
