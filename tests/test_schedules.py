"""Schedules of docs/method.md section 10, per optimiser step, against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selfpatch_hf.training.schedules import (
    PretrainingSchedule,
    cosine_schedule,
    linear_warmup,
    optimizer_steps_per_epoch,
    scaled_learning_rate,
)


def dino_cosine_scheduler(
    base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0
):
    """DINO's `utils.cosine_scheduler`, verbatim: the whole schedule as an array."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@pytest.mark.parametrize(
    "base, final, epochs, per_epoch, warmup",
    [(2e-3, 1e-6, 20, 7, 3), (0.04, 0.4, 12, 5, 0), (0.996, 1.0, 9, 4, 0), (1.0, 0.0, 5, 1, 1)],
)
def test_cosine_schedule_matches_dino_cosine_scheduler_at_every_step(base, final, epochs, per_epoch, warmup):
    reference = dino_cosine_scheduler(base, final, epochs, per_epoch, warmup)
    ours = [
        cosine_schedule(step, epochs * per_epoch, base, final, warmup * per_epoch)
        for step in range(len(reference))
    ]
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-15)


def test_cosine_schedule_edges():
    assert cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=4) == 0.0  # warm-up starts at 0
    assert cosine_schedule(3, 10, 1.0, 0.0, warmup_steps=4) == 1.0  # linspace includes the peak
    assert cosine_schedule(4, 10, 1.0, 0.0, warmup_steps=4) == 1.0  # cosine starts at the peak
    assert cosine_schedule(10, 10, 1.0, 0.25) == 0.25  # past the end: the final value
    assert cosine_schedule(0, 1, 0.7, 0.1) == 0.7
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(0, 5, 1.0, 0.0, warmup_steps=6)


def test_linear_warmup_is_linspace_then_constant():
    reference = np.linspace(0.04, 0.07, 30)
    np.testing.assert_allclose(
        [linear_warmup(step, 30, 0.04, 0.07) for step in range(30)], reference, rtol=1e-12
    )
    assert linear_warmup(30, 30, 0.04, 0.07) == 0.07
    assert linear_warmup(1000, 30, 0.04, 0.07) == 0.07
    assert linear_warmup(0, 0, 0.04, 0.07) == 0.07  # no warm-up


def reference_recipe(**overrides) -> PretrainingSchedule:
    """The ViT-S/16 ImageNet recipe: 8 x 128 images per step, 300 epochs of ImageNet-1k."""
    steps_per_epoch = optimizer_steps_per_epoch(1_281_167, 1024)
    kwargs = dict(
        steps_per_epoch=steps_per_epoch,
        total_steps=300 * steps_per_epoch,
        base_learning_rate=5e-4,
        global_batch_size=1024,
    )
    kwargs.update(overrides)
    return PretrainingSchedule.from_epochs(**kwargs)


def test_reference_recipe_values_at_chosen_steps():
    schedule = reference_recipe(
        warmup_teacher_temperature=0.04, teacher_temperature=0.07, warmup_teacher_temperature_epochs=30
    )
    steps_per_epoch = 1_281_167 // 1024
    assert steps_per_epoch == schedule.steps_per_epoch == 1251
    total = 300 * steps_per_epoch
    warmup = 10 * steps_per_epoch
    peak = 5e-4 * 1024 / 256
    assert schedule.learning_rate == pytest.approx(2e-3)

    start = schedule.at(0)
    assert start.learning_rate == 0.0
    assert start.weight_decay == pytest.approx(0.04)
    assert start.teacher_momentum == pytest.approx(0.996)
    assert start.teacher_temperature == pytest.approx(0.04)
    assert start.freeze_last_layer and start.epoch == 0

    # halfway through the warm-up: linspace(0, peak, warmup)
    mid = warmup // 2
    assert schedule.at(mid).learning_rate == pytest.approx(peak * mid / (warmup - 1))
    assert schedule.at(warmup).learning_rate == pytest.approx(peak)

    # the cosine half-way point of the post-warm-up part: (peak + min) / 2
    halfway = warmup + (total - warmup) // 2
    assert schedule.at(halfway).learning_rate == pytest.approx((peak + 1e-6) / 2, rel=1e-4)
    # weight decay and momentum have no warm-up: their half-way point is the run's
    assert schedule.at(total // 2).weight_decay == pytest.approx((0.04 + 0.4) / 2, rel=1e-4)
    assert schedule.at(total // 2).teacher_momentum == pytest.approx((0.996 + 1.0) / 2, rel=1e-6)

    # a chosen step against the closed formula
    step = 123_456
    cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    assert schedule.at(step).learning_rate == pytest.approx(1e-6 + (peak - 1e-6) * cosine, rel=1e-12)
    cosine = 0.5 * (1 + math.cos(math.pi * step / total))
    assert schedule.at(step).weight_decay == pytest.approx(0.4 + (0.04 - 0.4) * cosine, rel=1e-12)
    assert schedule.at(step).teacher_momentum == pytest.approx(1.0 + (0.996 - 1.0) * cosine, rel=1e-12)

    # teacher temperature: linear over 30 epochs of steps, then constant
    temperature_steps = 30 * steps_per_epoch
    assert schedule.at(temperature_steps // 3).teacher_temperature == pytest.approx(
        0.04 + 0.03 * (temperature_steps // 3) / (temperature_steps - 1)
    )
    assert schedule.at(temperature_steps).teacher_temperature == pytest.approx(0.07)
    assert schedule.at(total - 1).teacher_temperature == pytest.approx(0.07)

    end = schedule.at(total - 1)
    assert end.learning_rate == pytest.approx(1e-6, rel=1e-3)
    assert end.weight_decay == pytest.approx(0.4, rel=1e-6)
    assert end.teacher_momentum == pytest.approx(1.0, abs=1e-9)


def test_last_layer_frozen_only_during_epoch_zero():
    schedule = reference_recipe()
    per_epoch = schedule.steps_per_epoch
    assert all(schedule.at(step).freeze_last_layer for step in (0, 1, per_epoch // 2, per_epoch - 1))
    assert not any(schedule.at(step).freeze_last_layer for step in (per_epoch, per_epoch + 1, 50 * per_epoch))
    assert not reference_recipe(freeze_last_layer_epochs=0).at(0).freeze_last_layer


def test_schedules_depend_only_on_the_global_batch():
    """8 processes x 128, 4 x 128 x 2 accumulation and 1 x 64 x 16 are the same run: same global batch."""
    runs = []
    for processes, per_device, accumulation in [(8, 128, 1), (4, 128, 2), (1, 64, 16)]:
        global_batch = processes * per_device * accumulation
        per_epoch = optimizer_steps_per_epoch(1_281_167, global_batch)
        runs.append(
            PretrainingSchedule.from_epochs(
                steps_per_epoch=per_epoch,
                total_steps=100 * per_epoch,
                base_learning_rate=5e-4,
                global_batch_size=global_batch,
            )
        )
    assert runs[0] == runs[1] == runs[2]
    # half the global batch: twice the steps per epoch and half the peak learning rate
    half = PretrainingSchedule.from_epochs(
        steps_per_epoch=optimizer_steps_per_epoch(1_281_167, 512),
        total_steps=100 * optimizer_steps_per_epoch(1_281_167, 512),
        base_learning_rate=5e-4,
        global_batch_size=512,
    )
    assert half.steps_per_epoch == 2502 and half.warmup_steps == 2 * runs[0].warmup_steps
    assert half.learning_rate == pytest.approx(runs[0].learning_rate / 2)
    assert scaled_learning_rate(5e-4, 256) == 5e-4


def test_short_runs_cut_the_warm_up_and_round_trip_through_a_checkpoint():
    schedule = PretrainingSchedule.from_epochs(
        steps_per_epoch=2, total_steps=6, base_learning_rate=5e-4, global_batch_size=6, warmup_epochs=10
    )
    assert schedule.warmup_steps == 6  # 20 warm-up steps do not fit into 6
    assert schedule.at(5).learning_rate == pytest.approx(schedule.learning_rate)
    restored = PretrainingSchedule.from_dict(schedule.to_dict())
    assert restored == schedule and not restored.differences(schedule)
    longer = PretrainingSchedule.from_dict({**schedule.to_dict(), "total_steps": 12})
    assert schedule.differences(longer) == {"total_steps": (6, 12)}


def test_invalid_schedules_are_rejected():
    with pytest.raises(ValueError, match="samples_per_epoch is smaller"):
        PretrainingSchedule.from_epochs(
            steps_per_epoch=0, total_steps=5, base_learning_rate=1e-3, global_batch_size=8
        )
    with pytest.raises(ValueError, match="at least one optimiser step"):
        PretrainingSchedule.from_epochs(
            steps_per_epoch=3, total_steps=0, base_learning_rate=1e-3, global_batch_size=8
        )
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        PretrainingSchedule.from_epochs(
            steps_per_epoch=3, total_steps=9, base_learning_rate=1e-3, global_batch_size=8, warmup_epochs=-1
        )
    assert optimizer_steps_per_epoch(1000, 1024) == 0


def moby_reference_learning_rates(recipe, global_batch_size: int) -> tuple[float, float, float]:
    """MoBY's own arithmetic (Transformer-SSL `moby_main.py`): base, warm-up and minimum learning rate, quoted per
    512 images (its config: BASE_LR 1e-3, WARMUP_LR 5e-7, MIN_LR 5e-6), each x global batch / 512."""
    per_512 = {
        name: 2 * getattr(recipe, name)
        for name in ("learning_rate", "warmup_learning_rate", "min_learning_rate")
    }
    assert per_512 == {"learning_rate": 1e-3, "warmup_learning_rate": 5e-7, "min_learning_rate": 5e-6}
    return tuple(value * global_batch_size / 512.0 for value in per_512.values())


@pytest.mark.parametrize("global_batch_size", [2, 6, 64, 1024])
def test_moby_scales_its_base_warm_up_and_minimum_learning_rates_with_the_batch(global_batch_size):
    """docs/moby_swin.md's tiny MoBY command trains at a global batch of 2: MoBY's recipe scales all three learning
    rates with the batch (as its code does), so any batch works, and the warm-up starts at the warm-up lr."""
    from selfpatch_hf.models.selfpatch.recipes import OBJECTIVE_RECIPES

    recipe = OBJECTIVE_RECIPES["moby"].schedule
    schedule = PretrainingSchedule.from_recipe(
        recipe, steps_per_epoch=10, total_steps=100, global_batch_size=global_batch_size
    )
    peak, warmup_start, minimum = moby_reference_learning_rates(recipe, global_batch_size)
    assert schedule.learning_rate == pytest.approx(peak, rel=1e-12)
    assert schedule.min_learning_rate == pytest.approx(minimum, rel=1e-12)
    assert schedule.warmup_learning_rate == pytest.approx(warmup_start, rel=1e-12)
    assert schedule.warmup_steps == 5 * 10
    assert schedule.at(0).learning_rate == pytest.approx(warmup_start, rel=1e-12)  # not 0
    reference = np.linspace(warmup_start, peak, 50)  # the warm-up, then the cosine to the minimum
    np.testing.assert_allclose([schedule.at(s).learning_rate for s in range(50)], reference, rtol=1e-12)
    assert schedule.at(99).learning_rate == pytest.approx(
        minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * 49 / 50))
    )


def test_dino_keeps_an_absolute_minimum_and_names_the_fix_when_it_exceeds_the_peak():
    from selfpatch_hf.models.selfpatch.recipes import OBJECTIVE_RECIPES, ScheduleRecipe

    dino = PretrainingSchedule.from_recipe(
        OBJECTIVE_RECIPES["dino"].schedule, steps_per_epoch=10, total_steps=100, global_batch_size=2
    )
    assert (dino.min_learning_rate, dino.warmup_learning_rate, dino.at(0).learning_rate) == (1e-6, 0.0, 0.0)
    with pytest.raises(ValueError) as error:
        PretrainingSchedule.from_recipe(
            ScheduleRecipe(min_learning_rate=5e-6), steps_per_epoch=10, total_steps=100, global_batch_size=2
        )
    message = str(error.value)
    assert "min_learning_rate must lie between 0 and the peak learning rate, got 5e-06" in message
    assert "learning_rate 0.0005 x global batch 2 / 256" in message
    assert "pass --min_learning_rate at most 3.91e-06, or --learning_rate_scaling all" in message
    with pytest.raises(
        ValueError, match="warmup_learning_rate must lie between 0 and the peak.*below --learning_rate"
    ):
        PretrainingSchedule.from_recipe(
            ScheduleRecipe(warmup_learning_rate=1e-3, learning_rate_scaling="all"),
            steps_per_epoch=10,
            total_steps=100,
            global_batch_size=2,
        )


def test_schedules_saved_by_earlier_versions_load_with_a_warm_up_from_zero():
    schedule = PretrainingSchedule.from_epochs(
        steps_per_epoch=4, total_steps=20, base_learning_rate=5e-4, global_batch_size=8, warmup_epochs=1
    )
    saved = schedule.to_dict()
    del saved["warmup_learning_rate"]  # what a checkpoint of an earlier version records
    assert PretrainingSchedule.from_dict(saved) == schedule
