"""Per-optimiser-step schedules of SelfPatch / DINO pretraining (docs/method.md section 10).

Every schedule is a pure function of the optimiser step, so a run is right for any number of processes and any
gradient accumulation: an epoch is `steps_per_epoch = samples_per_epoch // global_batch_size` optimiser steps, and
everything the reference code states in epochs is converted to steps once.

- learning rate: linear warm-up from `warmup_learning_rate` (DINO: 0), then cosine to `min_learning_rate`; the peak
  follows the linear scaling rule `base_learning_rate * global_batch_size / 256`, and with
  `learning_rate_scaling="all"` (MoBY) so do the warm-up start and the minimum;
- weight decay: cosine from `weight_decay` to `weight_decay_end` (no warm-up), for the decayed parameter group only;
- teacher momentum: cosine from `teacher_momentum` to `teacher_momentum_end` (1.0);
- teacher temperature: linear warm-up from `warmup_teacher_temperature` to `teacher_temperature`, then constant;
- the heads' last layers are frozen while `step < freeze_last_layer_steps` (the first epoch).

The cosine and warm-up shapes are exactly those of DINO's `cosine_scheduler`: the warm-up is
`linspace(start, peak, warmup_steps)` (both ends included), the cosine part covers the remaining steps,
`final + (peak - final) * (1 + cos(pi * i / n)) / 2` for `i = 0 .. n - 1`. Deviation: DINO moves the teacher
temperature once per epoch; here it moves every step along the same line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from selfpatch_hf.models.selfpatch.recipes import REFERENCE_BATCH_SIZE, ScheduleRecipe


def scaled_learning_rate(base_learning_rate: float, global_batch_size: int) -> float:
    """Linear scaling rule: `base_learning_rate * global_batch_size / 256`."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
    return base_learning_rate * global_batch_size / REFERENCE_BATCH_SIZE


def optimizer_steps_per_epoch(samples_per_epoch: int, global_batch_size: int) -> int:
    """Full global batches in an epoch (DINO's `len(data_loader)` with `drop_last=True`); may be 0."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
    return samples_per_epoch // global_batch_size


def linear_warmup(step: int, warmup_steps: int, start_value: float, end_value: float) -> float:
    """`linspace(start_value, end_value, warmup_steps)[step]`, and `end_value` from `step >= warmup_steps` on."""
    if step >= warmup_steps:
        return end_value
    if warmup_steps == 1:
        return start_value
    return start_value + (end_value - start_value) * step / (warmup_steps - 1)


def cosine_schedule(
    step: int,
    total_steps: int,
    base_value: float,
    final_value: float,
    warmup_steps: int = 0,
    warmup_start_value: float = 0.0,
) -> float:
    """DINO's `cosine_scheduler(base_value, final_value, ...)[step]` for a schedule of `total_steps` steps.

    Steps `0 .. warmup_steps - 1` warm up linearly from `warmup_start_value` to `base_value`; the cosine then goes
    from `base_value` to (almost) `final_value` over the remaining steps. Steps past the end return `final_value`.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if step < warmup_steps:
        return linear_warmup(step, warmup_steps, warmup_start_value, base_value)
    if step >= total_steps:
        return final_value
    cosine_steps = total_steps - warmup_steps
    progress = (step - warmup_steps) / cosine_steps
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ScheduleValues:
    """Everything the schedules prescribe for one optimiser step."""

    step: int
    epoch: float  # fractional epoch at the start of the step
    learning_rate: float
    weight_decay: float
    teacher_momentum: float
    teacher_temperature: float
    freeze_last_layer: bool


@dataclass(frozen=True)
class PretrainingSchedule:
    """The schedules of one run, in optimiser steps. Build it with `from_recipe` (or `from_epochs`); query it with `at(step)`.

    It holds no state besides its settings: checkpoints store `to_dict()` next to the step counter, and a resumed run
    compares the two with `differences`.
    """

    total_steps: int
    steps_per_epoch: int
    learning_rate: float  # peak, after the linear scaling rule
    min_learning_rate: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    teacher_momentum: float
    teacher_momentum_end: float
    teacher_temperature: float
    warmup_teacher_temperature: float
    teacher_temperature_warmup_steps: int
    freeze_last_layer_steps: int
    warmup_learning_rate: float = (
        0.0  # where the warm-up starts (after the scaling rule); older checkpoints: 0
    )

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(
                f"The run must have at least one optimiser step, got total_steps={self.total_steps}."
            )
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}.")
        for name in ("warmup_steps", "teacher_temperature_warmup_steps", "freeze_last_layer_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps}).")
        if not 0.0 <= self.teacher_momentum <= 1.0 or not 0.0 <= self.teacher_momentum_end <= 1.0:
            raise ValueError("Teacher momentum values must lie in [0, 1].")
        if self.teacher_temperature <= 0 or self.warmup_teacher_temperature <= 0:
            raise ValueError("Teacher temperatures must be > 0.")

    @classmethod
    def from_recipe(
        cls, recipe: ScheduleRecipe, *, steps_per_epoch: int, total_steps: int, global_batch_size: int
    ) -> PretrainingSchedule:
        """Converts a recipe's epoch-based settings to steps. Warm-ups longer than the run (short runs) are cut to
        the run's length."""
        if steps_per_epoch < 1:
            raise ValueError(
                f"An epoch must hold at least one optimiser step (steps_per_epoch={steps_per_epoch}): "
                "samples_per_epoch is smaller than the global batch size."
            )
        if not recipe.learning_rate > 0:  # also refuses NaN
            raise ValueError(f"learning_rate must be > 0, got {recipe.learning_rate}.")
        if recipe.learning_rate_scaling not in ("peak", "all"):
            raise ValueError(
                f"learning_rate_scaling must be 'peak' or 'all', got {recipe.learning_rate_scaling!r}."
            )
        peak = scaled_learning_rate(recipe.learning_rate, global_batch_size)
        scale_all = recipe.learning_rate_scaling == "all"
        lowest = {
            name: scaled_learning_rate(getattr(recipe, name), global_batch_size)
            if scale_all
            else getattr(recipe, name)
            for name in ("min_learning_rate", "warmup_learning_rate")
        }
        for name, value in lowest.items():
            if not 0 <= value <= peak:  # also refuses NaN
                raise ValueError(
                    _learning_rate_bound_message(
                        name, getattr(recipe, name), value, peak, recipe, global_batch_size
                    )
                )
        for name in ("weight_decay", "weight_decay_end"):
            if not getattr(recipe, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(recipe, name)}.")

        def to_steps(epochs: float, name: str) -> int:
            if not epochs >= 0:
                raise ValueError(f"{name} must be >= 0, got {epochs}.")
            return round(epochs * steps_per_epoch)

        return cls(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            learning_rate=peak,
            min_learning_rate=lowest["min_learning_rate"],
            warmup_steps=min(to_steps(recipe.warmup_epochs, "warmup_epochs"), total_steps),
            weight_decay=recipe.weight_decay,
            weight_decay_end=recipe.weight_decay_end,
            teacher_momentum=recipe.teacher_momentum,
            teacher_momentum_end=recipe.teacher_momentum_end,
            teacher_temperature=recipe.teacher_temperature,
            warmup_teacher_temperature=recipe.warmup_teacher_temperature,
            teacher_temperature_warmup_steps=min(
                to_steps(recipe.warmup_teacher_temperature_epochs, "warmup_teacher_temperature_epochs"),
                total_steps,
            ),
            freeze_last_layer_steps=to_steps(recipe.freeze_last_layer_epochs, "freeze_last_layer_epochs"),
            warmup_learning_rate=lowest["warmup_learning_rate"],
        )

    @classmethod
    def from_epochs(
        cls,
        *,
        steps_per_epoch: int,
        total_steps: int,
        base_learning_rate: float,
        global_batch_size: int,
        **recipe: float,
    ) -> PretrainingSchedule:
        """`from_recipe(ScheduleRecipe(learning_rate=base_learning_rate, **recipe), ...)`: the settings not given
        keep `ScheduleRecipe`'s defaults (the reference recipe)."""
        return cls.from_recipe(
            ScheduleRecipe(learning_rate=base_learning_rate, **recipe),
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            global_batch_size=global_batch_size,
        )

    def at(self, step: int) -> ScheduleValues:
        """The values of optimiser step `step` (0-based)."""
        return ScheduleValues(
            step=step,
            epoch=step / self.steps_per_epoch,
            learning_rate=cosine_schedule(
                step,
                self.total_steps,
                self.learning_rate,
                self.min_learning_rate,
                self.warmup_steps,
                self.warmup_learning_rate,
            ),
            weight_decay=cosine_schedule(step, self.total_steps, self.weight_decay, self.weight_decay_end),
            teacher_momentum=cosine_schedule(
                step, self.total_steps, self.teacher_momentum, self.teacher_momentum_end
            ),
            teacher_temperature=linear_warmup(
                step,
                self.teacher_temperature_warmup_steps,
                self.warmup_teacher_temperature,
                self.teacher_temperature,
            ),
            freeze_last_layer=step < self.freeze_last_layer_steps,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainingSchedule:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    def differences(self, other: PretrainingSchedule) -> dict[str, tuple[Any, Any]]:
        """`{field: (self's value, other's value)}` for every setting that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}


def _learning_rate_bound_message(
    name: str, given: float, value: float, peak: float, recipe: ScheduleRecipe, global_batch_size: int
) -> str:
    """One line: which learning rate is out of [0, peak], the arithmetic, and the fix."""
    scaled = recipe.learning_rate_scaling == "all"
    what = f"{given:g} per {REFERENCE_BATCH_SIZE} images = {value:.3g}" if scaled else f"{value:g}"
    fix = (
        f"pass --{name} below --learning_rate"
        if scaled
        else f"pass --{name} at most {peak:.3g}, or --learning_rate_scaling all to scale it with the batch too"
    )
    return (
        f"{name} must lie between 0 and the peak learning rate, got {what} with a peak of {peak:.3g} "
        f"(learning_rate {recipe.learning_rate:g} x global batch {global_batch_size} / {REFERENCE_BATCH_SIZE}): {fix}."
    )


__all__ = [
    "REFERENCE_BATCH_SIZE",
    "PretrainingSchedule",
    "ScheduleRecipe",
    "ScheduleValues",
    "cosine_schedule",
    "linear_warmup",
    "optimizer_steps_per_epoch",
    "scaled_learning_rate",
]
