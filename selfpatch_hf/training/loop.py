"""One optimiser step of SelfPatch / DINO / MoBY pretraining, and the batches it reads.

- `train_step`: gradient accumulation over micro-batches through the prepared (DDP-wrapped) model, one all-reduce
  of the losses and the stop flag, clipping, last-layer freezing, the optimiser step and the teacher's EMA;
  `StepResult` is what the loop logs and judges, `NonFiniteLossError` a loss that must not reach the weights.
  What the forward takes each step comes from the model's objective (`step_inputs`, `moves_teacher_in_forward`,
  `uses_local_crops`: `selfpatch_hf.models.selfpatch.objectives.base.ImageObjective`), not from its name.
- `endless_batches` / `take_batches`: passes over the data stream, read without moving the training RNG.

Nothing here logs, saves or decides to stop: the training script does, with what these return.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from selfpatch_hf.cli.errors import CommandFailure
from selfpatch_hf.training.mixed_precision import ScalerSkipGuard, step_was_skipped
from selfpatch_hf.training.optimization import cancel_gradients, clip_gradients
from selfpatch_hf.training.preemption import stop_signals_held
from selfpatch_hf.training.schedules import ScheduleValues

if TYPE_CHECKING:
    from selfpatch_hf.models.selfpatch.objectives.base import ImageObjective


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, losses: dict[str, float]):
        super().__init__(f"non-finite loss at optimiser step {step}: {losses}")
        self.step = step
        self.losses = losses


@dataclass
class StepResult:
    loss: float
    image_loss: float
    patch_loss: float | None
    stop_requested: bool
    skipped: bool = False  # the fp16 loss scaler skipped the optimiser step (inf/NaN gradients)
    grad_norm: float = math.nan  # of the student's gradients before clipping (the divergence check reads it)


def _forward_inputs(objective: ImageObjective, values: ScheduleValues, micro_step: int) -> dict[str, object]:
    """What the model's forward takes from this step's schedule values: the objective's `step_inputs` (DINO: the
    teacher temperature) and, for an objective that moves its teacher in the forward (MoBY), the momentum on the
    first micro-batch of the optimiser step only."""
    inputs = {name: getattr(values, name) for name in objective.step_inputs}
    if objective.moves_teacher_in_forward:
        inputs["teacher_momentum"] = values.teacher_momentum if micro_step == 0 else None
    return inputs


def train_step(
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    values: ScheduleValues,
    clip_grad: float,
    stop_requested: bool = False,
    clip_grad_mode: str = "per_parameter",
) -> StepResult:
    """One optimiser step over `gradient_accumulation_steps` micro-batches, then the teacher's EMA update (unless
    the objective moves it in the forward: `ImageObjective.moves_teacher_in_forward`).

    `model` is the prepared (DDP-wrapped) model, so gradients are averaged over processes; the centres are
    all-reduced inside its forward. Losses are averaged over micro-batches and processes, and the stop flag is
    or-ed over processes, in one all-reduce before the optimiser step: every process takes the same decision, and
    a non-finite loss raises `NonFiniteLossError` before it can reach the weights.
    """
    unwrapped = accelerator.unwrap_model(model)
    objective = unwrapped.objective
    # fp16: a step the loss scaler skips leaves every buffer (and a teacher moved in the forward) as it was
    # (selfpatch_hf.training.mixed_precision)
    guard = ScalerSkipGuard(
        unwrapped, enabled=accelerator.scaler is not None, include_teacher=objective.moves_teacher_in_forward
    )
    guard.before_forward()
    totals = torch.zeros(3, device=accelerator.device)
    micro_steps = 0
    for global_crops, local_crops in micro_batches:
        global_crops = global_crops.to(accelerator.device, non_blocking=True)
        local_crops = (
            local_crops.to(accelerator.device, non_blocking=True) if objective.uses_local_crops else None
        )
        with accelerator.accumulate(model):
            outputs = model(global_crops, local_crops, **_forward_inputs(objective, values, micro_steps))
            accelerator.backward(outputs.loss)
            patch_loss = (
                outputs.patch_loss if outputs.patch_loss is not None else torch.full_like(outputs.loss, -1)
            )
            totals += torch.stack([outputs.loss, outputs.image_loss, patch_loss]).detach().float()
            micro_steps += 1
            if accelerator.sync_gradients:
                flag = torch.tensor([float(stop_requested)], device=accelerator.device)
                reduced = accelerator.reduce(
                    torch.cat([totals / micro_steps, flag]), reduction="mean"
                ).tolist()
                loss, image_loss, patch_value, stop_share = reduced
                if not all(math.isfinite(v) for v in (loss, image_loss, patch_value)):
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(
                        values.step, {"loss": loss, "image_loss": image_loss, "patch_loss": patch_value}
                    )
                accelerator.unscale_gradients(optimizer)  # fp16: measure and clip the true gradients
                # the norm before clipping feeds the divergence check; the clip measures it anyway
                grad_norm = clip_gradients(unwrapped.student.parameters(), clip_grad, clip_grad_mode)
                if values.freeze_last_layer:
                    cancel_gradients(unwrapped.get_last_layer_parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    skipped = guard.after_step(step_was_skipped(optimizer))
    if (
        not skipped and not objective.moves_teacher_in_forward
    ):  # the student did not move: neither does the teacher
        unwrapped.update_teacher(values.teacher_momentum)
    return StepResult(
        loss=loss,
        image_loss=image_loss,
        patch_loss=patch_value if outputs.patch_loss is not None else None,
        stop_requested=stop_share > 0,
        skipped=skipped,
        grad_norm=grad_norm,
    )


def endless_batches(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Passes over a `MultiCropDataLoader`'s stream, one after the other (each with a new order and new crops).

    Each pass starts its data workers in its first batch: that batch is read with the stop signals held, so that a
    SIGTERM sent to the whole process group reaches this process (which checkpoints) and not the workers."""
    empty_passes = 0
    while True:
        produced = 0
        batches = iter(loader)
        with stop_signals_held():
            first = next(batches, None)
        if first is not None:
            produced += 1
            yield first
            for batch in batches:
                produced += 1
                yield batch
        # a pass resumed at its very end may legitimately be empty; two in a row mean too little data
        empty_passes = empty_passes + 1 if produced == 0 else 0
        if empty_passes >= 2:
            raise CommandFailure(
                f"a whole pass over the data gave process {loader.rank} no batch of "
                f"{loader.batch_size} images: the dataset is too small for this per-device batch size and "
                f"{loader.num_workers} worker(s) (each worker drops its incomplete last batch), or all its images "
                f"were skipped ({loader.skipped_images} so far). Use a smaller batch or fewer workers."
            )


def take_batches(batches: Iterator, count: int) -> Iterator:
    """The next `count` batches. Reading them must not touch the global torch RNG that drop-path draws from:
    every DataLoader iteration draws its base seed from it, and a resumed run starts one more iteration than an
    uninterrupted one (the rest of the interrupted pass), which would shift every later drop-path mask."""
    for _ in range(count):
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)
        yield batch


__all__ = [
    "NonFiniteLossError",
    "StepResult",
    "endless_batches",
    "take_batches",
    "train_step",
]
