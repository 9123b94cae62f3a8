"""The optimiser side of dense fine-tuning: AdamW parameter groups with layer-wise learning-rate decay for the
backbone, and the warm-up + poly / cosine learning-rate schedule of mmsegmentation.

Layer-wise decay (BEiT; mmseg's `LayerDecayOptimizerConstructor`): with L blocks, the embeddings get layer id 0,
block i (0-based) gets i + 1, everything after the last block (the backbone's output norm and the heads) L + 1, and a
parameter's learning rate is `lr * layer_decay ** (L + 1 - layer_id)`. `layer_decay = 1` is plain AdamW, as the
SelfPatch reference configuration (Semantic FPN on ADE20K) uses.

No weight decay for biases, normalisation weights (1-D tensors), position embeddings and the class token (the
reference's `paramwise_cfg`: `pos_embed`, `cls_token`, `norm` at decay 0).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

# the backbone's block index in a live parameter name: Dinov2Backbone `encoder.layer.N.`, SigLIP `encoder.layers.N.`,
# BeitBackbone `beit.layers.N.`, SwinBackbone `encoder.layers.N.` (a stage)
_BLOCK = re.compile(r"(?:^|\.)(?:encoder|beit)\.layers?\.(\d+)\.")
_NO_DECAY_NAMES = ("position_embedding", "cls_token", "mask_token")
# key marking the learning-rate multiplier of a group (the schedule multiplies it in every step)
LR_SCALE = "lr_scale"


def layer_id(name: str, num_layers: int, backbone_prefix: str = "backbone.") -> int:
    """Layer id of a live parameter name of a dense model whose backbone sits under `backbone_prefix` (UperNet:
    `backbone.`; Deformable DETR: `model.backbone.model.`; Mask2Former: `model.pixel_level_module.encoder.`)."""
    if not name.startswith(backbone_prefix):
        return num_layers + 1  # decode and auxiliary heads, detection transformers
    name = name[len(backbone_prefix) :]
    if name.startswith("embeddings.") or ".embeddings." in name:
        return 0
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1  # the backbone's output norm


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in _NO_DECAY_NAMES)


def layer_decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    backbone_prefix: str = "backbone.",
) -> list[dict]:
    """AdamW groups over the trainable parameters of `model` (a UperNet / DPT with `backbone.`), one per (layer id,
    decay or not), each with its `lr_scale`."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, num_layers, backbone_prefix)
        decay = not _no_weight_decay(name, param)
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                LR_SCALE: layer_decay ** (num_layers + 1 - layer),
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_finetuning_optimizer(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    betas: tuple[float, float] = (0.9, 0.999),
    backbone_prefix: str = "backbone.",
) -> torch.optim.AdamW:
    """AdamW over `layer_decay_param_groups`; the learning rates are set every step by `apply_learning_rate`."""
    groups = layer_decay_param_groups(model, weight_decay, layer_decay, num_layers, backbone_prefix)
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=0.0, betas=betas)


@dataclass(frozen=True)
class FinetuningSchedule:
    """Linear warm-up from `warmup_ratio * peak`, then poly (power `power`) or cosine decay to `min_learning_rate`
    at `total_steps` (mmseg's `PolyLR` / `CosineAnnealingLR` with `warmup="linear"`, by iteration), or step decay
    (mmdet's 1x `MultiStepLR`: times `decay_factor` at each of `decay_steps`)."""

    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6
    kind: Literal["poly", "cosine", "step"] = "poly"
    power: float = 1.0
    min_learning_rate: float = 0.0
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}.")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, {self.total_steps}), got {self.warmup_steps}.")
        if self.kind not in ("poly", "cosine", "step"):
            raise ValueError(f"kind must be 'poly', 'cosine' or 'step', got {self.kind!r}.")

    def _decayed(self, step: int) -> float:
        progress = min(step, self.total_steps) / self.total_steps
        if self.kind == "step":
            return self.learning_rate * self.decay_factor ** sum(step >= drop for drop in self.decay_steps)
        span = self.learning_rate - self.min_learning_rate
        if self.kind == "poly":
            return self.min_learning_rate + span * (1 - progress) ** self.power
        return self.min_learning_rate + span * 0.5 * (1 + math.cos(math.pi * progress))

    def at(self, step: int) -> float:
        """Learning rate of optimiser step `step` (0-based)."""
        decayed = self._decayed(step)
        if step < self.warmup_steps:
            # mmseg: the warm-up factor rises linearly from warmup_ratio to 1 over warmup_steps, on the decayed value
            factor = 1 - (1 - step / self.warmup_steps) * (1 - self.warmup_ratio)
            return decayed * factor
        return decayed


def apply_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    """Sets each group's learning rate to `learning_rate` times its layer-decay scale."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate * group.get(LR_SCALE, 1.0)


__all__ = [
    "LR_SCALE",
    "FinetuningSchedule",
    "apply_learning_rate",
    "build_finetuning_optimizer",
    "layer_decay_param_groups",
    "layer_id",
]
