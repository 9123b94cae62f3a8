"""Divergence detection: stop a run whose weights or gradients explode BEFORE its state is saved as a checkpoint.

A non-finite loss is only the last symptom of a diverging run: with a learning rate that is far too high the
weights can grow by orders of magnitude while the loss stays finite (DINO-style losses are bounded), and every
checkpoint written meanwhile holds damaged weights. `DivergenceMonitor` watches, after every optimiser step, the
loss, the gradient norm (before clipping) and the weight norm, and judges each step:

- `diverged` (the run stops; nothing more is saved):
  - any of the three is not finite;
  - the weight norm exceeds `weight_growth` (4) times its smallest value over the last `window` steps (and at the
    start). Healthy training moves the weight norm by a few percent over such a window (an AdamW step changes each
    weight by about the learning rate);
  - once `min_history` steps are known: the gradient norm exceeds `grad_spike` (1000) times its recent median, or
    the loss exceeds both `loss_spike_ratio` (2) times its recent median and that median plus `loss_spike_sigmas`
    (20) robust standard deviations (1.4826 x the median absolute deviation).
- `suspect` (training goes on, but checkpoints written now are marked unhealthy): the same rules with the tighter
  `suspect_weight_growth` (1.25) and `suspect_grad_spike` (100).
- `ok` otherwise.

The statistics are medians over recent steps, so a single noisy step does not move them, and the thresholds are
ratios, so they hold for any model size. Each checkpoint's manifest records `health()` (`healthy` is False after a
suspect step); the failure message names the newest checkpoint that was healthy (`last_healthy_checkpoint`).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

Status = Literal["ok", "suspect", "diverged"]
_MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation of a normal distribution


@dataclass
class DivergenceThresholds:
    """Limits of `DivergenceMonitor` (defaults that never fire on a healthy run; 0 disables a spike rule)."""

    window: int = 50
    min_history: int = 10
    weight_growth: float = 4.0
    suspect_weight_growth: float = 1.25
    grad_spike: float = 1000.0
    suspect_grad_spike: float = 100.0
    loss_spike_ratio: float = 2.0
    loss_spike_sigmas: float = 20.0

    def __post_init__(self):
        if self.window < 1 or self.min_history < 1:
            raise ValueError(
                f"window and min_history must be >= 1, got {self.window} and {self.min_history}."
            )
        for name in ("weight_growth", "suspect_weight_growth", "grad_spike", "suspect_grad_spike"):
            value = getattr(self, name)
            if value != 0 and not value > 1:
                raise ValueError(f"{name} must be > 1 (or 0 to disable), got {value}.")


@dataclass
class StepHealth:
    step: int
    status: Status
    reasons: list[str] = field(default_factory=list)
    loss: float | None = None
    grad_norm: float | None = None
    weight_norm: float | None = None


class DivergenceMonitor:
    """Judges every optimiser step (see the module docstring). Call `start(weight_norm)` before the first step (or
    after resuming, unless its state was restored with `load_state_dict`), then `update(...)` after every step."""

    def __init__(self, thresholds: DivergenceThresholds | None = None):
        self.thresholds = thresholds or DivergenceThresholds()
        window = self.thresholds.window
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.weight_norms: deque[float] = deque(
            maxlen=window + 1
        )  # + the value before the window's first step
        self.last: StepHealth | None = None

    def start(self, weight_norm: float) -> None:
        if not self.weight_norms:
            self.weight_norms.append(float(weight_norm))

    def update(self, step: int, loss: float, grad_norm: float, weight_norm: float) -> StepHealth:
        """Judges the state after optimiser step `step` and adds it to the history (unless it diverged)."""
        limits = self.thresholds
        loss, grad_norm, weight_norm = float(loss), float(grad_norm), float(weight_norm)
        diverged: list[str] = []
        suspect: list[str] = []
        for name, value in (("loss", loss), ("gradient norm", grad_norm), ("weight norm", weight_norm)):
            if not math.isfinite(value):
                diverged.append(f"{name} is {value}")
        if not diverged:
            if self.weight_norms:
                smallest = min(self.weight_norms)
                growth = weight_norm / smallest if smallest > 0 else math.inf
                text = (
                    f"weight norm {weight_norm:.4g} is {growth:.3g}x its smallest value {smallest:.4g} over the last "
                    f"{len(self.weight_norms)} steps"
                )
                if limits.weight_growth and growth > limits.weight_growth:
                    diverged.append(f"{text} (limit {limits.weight_growth:g}x)")
                elif limits.suspect_weight_growth and growth > limits.suspect_weight_growth:
                    suspect.append(text)
            if len(self.grad_norms) >= limits.min_history:
                median = statistics.median(self.grad_norms)
                ratio = grad_norm / median if median > 0 else (math.inf if grad_norm > 0 else 1.0)
                text = f"gradient norm {grad_norm:.4g} is {ratio:.3g}x its recent median {median:.4g}"
                if limits.grad_spike and ratio > limits.grad_spike:
                    diverged.append(f"{text} (limit {limits.grad_spike:g}x)")
                elif limits.suspect_grad_spike and ratio > limits.suspect_grad_spike:
                    suspect.append(text)
            if (
                len(self.losses) >= limits.min_history
                and limits.loss_spike_ratio
                and limits.loss_spike_sigmas
            ):
                median = statistics.median(self.losses)
                spread = _MAD_TO_SIGMA * statistics.median(abs(value - median) for value in self.losses)
                if (
                    loss > limits.loss_spike_ratio * abs(median)
                    and loss > median + limits.loss_spike_sigmas * spread
                ):
                    diverged.append(
                        f"loss {loss:.4g} jumped from its recent median {median:.4g} (robust spread {spread:.3g})"
                    )
        status: Status = "diverged" if diverged else "suspect" if suspect else "ok"
        self.last = StepHealth(step, status, diverged or suspect, loss, grad_norm, weight_norm)
        if status == "diverged":
            return self.last  # a diverged step never becomes part of the reference statistics
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.weight_norms.append(weight_norm)
        return self.last

    def health(self) -> dict[str, Any]:
        """What a checkpoint's manifest records: `healthy` and the last step's statistics."""
        if self.last is None:
            return {"healthy": True, "status": "ok"}
        return {"healthy": self.last.status == "ok", **asdict(self.last)}

    # ------------------------------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "weight_norms": list(self.weight_norms),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.extend(state.get("losses", []))
        self.grad_norms.extend(state.get("grad_norms", []))
        self.weight_norms.extend(state.get("weight_norms", []))


def total_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all `tensors` taken as one vector (float64 accumulation; inf/nan propagate)."""
    norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def weight_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """The norm of the trainable weights."""
    return total_norm(p for p in parameters if p.requires_grad)


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """The norm of the gradients (call before clipping to see what the loss asked for)."""
    return total_norm(p.grad for p in parameters if p.grad is not None)


# ---------------------------------------------------------------------------------------------- in a training run
def last_healthy_note(checkpoints: Any) -> str:
    """Where to continue from after a failure: the newest checkpoint written while training was healthy
    (`checkpoints`: a `CheckpointManager`)."""
    healthy = checkpoints.last_healthy()
    return f"the last healthy checkpoint is {healthy}" if healthy else "there is no healthy checkpoint yet"


def non_finite_loss_message(step: int, losses: Any, steps_per_epoch: float, checkpoints: Any) -> str:
    """The failure line of a non-finite loss: where, which losses, where to resume and what to change."""
    return (
        f"non-finite loss at optimiser step {step} (epoch {step / steps_per_epoch:.2f}; {losses}); "
        f"{last_healthy_note(checkpoints)}. Lower --learning_rate, lengthen --warmup_epochs, lower --clip_grad or "
        "train in fp32, then continue with --resume_from_checkpoint."
    )


def check_divergence(
    monitor: DivergenceMonitor | None,
    model: torch.nn.Module,
    metrics_log: Any,
    checkpoints: Any,
    step: int,
    loss: float,
    grad_norm: float,
) -> None:
    """Judges an optimiser step of `model` (the trained network) before anything is saved, so that a diverging
    state never becomes a checkpoint: a diverged run ends (`CommandFailure`, a `diverged` event in `metrics_log`)
    naming the last healthy checkpoint; a suspect step is said once and marks checkpoints unhealthy."""
    if monitor is None:
        return
    from selfpatch_hf.cli.errors import CommandFailure

    previous = monitor.last.status if monitor.last is not None else "ok"
    verdict = monitor.update(step, loss, grad_norm, weight_norm(model.parameters()))
    if verdict.status == "diverged":
        metrics_log.event("diverged", step, reasons=verdict.reasons)
        raise CommandFailure(
            f"training diverged at optimiser step {step} ({'; '.join(verdict.reasons)}); "
            f"nothing was saved from this state; {last_healthy_note(checkpoints)}. Lower "
            "--learning_rate, lengthen --warmup_epochs or lower --clip_grad, then continue with "
            "--resume_from_checkpoint PATH."
        )
    if verdict.status == "suspect" and previous != "suspect":
        logger.warning(
            "Step %d looks unhealthy (%s): checkpoints are marked unhealthy until it passes.",
            step,
            "; ".join(verdict.reasons),
        )


__all__ = [
    "DivergenceMonitor",
    "DivergenceThresholds",
    "StepHealth",
    "check_divergence",
    "gradient_norm",
    "last_healthy_note",
    "non_finite_loss_message",
    "total_norm",
    "weight_norm",
]
