"""Mixed-precision training steps (`--mixed_precision bf16|fp16` through accelerate).

What runs in which precision: accelerate runs the model's forward under autocast, so the backbone, the aggregation
module and the heads compute in bf16 / fp16; the model casts the logits to fp32 before the softmaxes and losses,
keeps its centres as fp32 buffers and updates them from fp32 logits, and the teacher's EMA works on the fp32 master
weights (autocast never changes parameters). fp16 adds accelerate's loss scaler (`torch.amp.GradScaler`): gradients
are unscaled before the per-tensor clipping, so the clip sees true gradients.

A step the scaler skips (inf / NaN gradients after an fp16 overflow; the scale is then halved) is a step that did
not happen: the student did not move, so

- the teacher is NOT updated (an EMA toward an unchanged student would still pull the teacher; the reference code
  does so, which makes the teacher depend on how often fp16 overflows);
- the state the forward already moved is restored (`ScalerSkipGuard`): every buffer of the model (DINO's centres,
  MoBY's key queues and their pointer, the BatchNorm running statistics and batch counters of MoBY's projectors and
  predictors, ...) and, for an objective whose forward moves its teacher (MoBY's target takes its momentum step
  inside the forward), the teacher's weights;
- the schedules do not advance: the loop does not count the step, so the next batch is trained at the same
  learning rate, weight decay, momentum and temperature. The batch itself is consumed (the data stream moves on).

The loop counts skipped steps and logs them; a long run of consecutive skips means gradients that are not finite
for another reason than the scale, and stops training (`MAX_CONSECUTIVE_SKIPPED_STEPS`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Halving the scale this many times from accelerate's initial 2^16 goes below 2^-8: no overflow is left to explain.
MAX_CONSECUTIVE_SKIPPED_STEPS = 25


class ScalerSkipGuard:
    """Keeps what a forward moves across one step, to restore it if the loss scaler skips the step: every buffer of
    the model (whatever the objective keeps there: centres, queues, BatchNorm statistics) and, with
    `include_teacher` (objectives whose forward moves the teacher, e.g. MoBY's momentum step), the teacher's
    parameters. Disabled (no copies) when there is no scaler."""

    def __init__(self, model: nn.Module, enabled: bool = True, include_teacher: bool = False):
        self.model = model
        self.enabled = enabled
        self.include_teacher = include_teacher
        self.snapshot: list[torch.Tensor] | None = None

    def _state(self) -> list[torch.Tensor]:
        state = list(self.model.buffers())
        if self.include_teacher:
            state += list(self.model.teacher.parameters())
        return state

    def before_forward(self) -> None:
        self.snapshot = [tensor.detach().clone() for tensor in self._state()] if self.enabled else None

    def after_step(self, skipped: bool) -> bool:
        """Restores the kept state if the step was skipped; returns `skipped`."""
        if skipped and self.snapshot is not None:
            with torch.no_grad():
                for tensor, saved in zip(self._state(), self.snapshot, strict=True):
                    tensor.copy_(saved)
        return bool(skipped)


def step_was_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether accelerate's loss scaler skipped the last `optimizer.step()` (False without a scaler)."""
    return bool(getattr(optimizer, "step_was_skipped", False))


def record_scaler_skip(accelerator, metrics_log: Any, step: int, in_a_row: int) -> None:
    """An fp16 overflow: the scaler halved its scale and nothing moved. Recorded as a `skipped_step` event;
    `MAX_CONSECUTIVE_SKIPPED_STEPS` in a row end the run (`CommandFailure`)."""
    from selfpatch_hf.cli.errors import CommandFailure

    metrics_log.event("skipped_step", step, loss_scale=accelerator.scaler.get_scale())
    if in_a_row >= MAX_CONSECUTIVE_SKIPPED_STEPS:
        raise CommandFailure(
            f"the fp16 loss scaler skipped {in_a_row} optimiser steps in a row at step {step}: the gradients "
            "are not finite at any scale. Train with --mixed_precision bf16 or no, or lower --learning_rate, then "
            "continue with --resume_from_checkpoint."
        )


__all__ = ["MAX_CONSECUTIVE_SKIPPED_STEPS", "ScalerSkipGuard", "record_scaler_skip", "step_was_skipped"]
