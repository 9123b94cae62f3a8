"""The optimiser side of SelfPatch / DINO pretraining: parameter groups, per-tensor gradient clipping, last-layer
freezing, and applying a step's schedule values (docs/method.md section 10; DINO's `utils.get_params_groups`,
`utils.clip_gradients`, `utils.cancel_gradients_last_layer`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from selfpatch_hf.training.divergence import gradient_norm
from selfpatch_hf.training.schedules import ScheduleValues

# Key marking the parameter group whose weight decay follows the schedule (the other group stays at 0).
SCHEDULED_WEIGHT_DECAY = "scheduled_weight_decay"


def build_param_groups(module: nn.Module) -> list[dict]:
    """DINO's two groups over the trainable parameters of `module` (pass the student).

    Biases and 1-D parameters (LayerNorm weights) get no weight decay; everything else (matrices, the patch
    embedding, position embeddings, CLS tokens, the heads' weight-normalised directions) follows the weight-decay
    schedule. Frozen parameters (the teacher, the fixed weight-norm magnitudes) are left out.
    """
    decayed, not_decayed = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_decayed.append(param)
        else:
            decayed.append(param)
    if not decayed and not not_decayed:
        raise ValueError(f"{type(module).__name__} has no trainable parameters.")
    return [
        {"params": decayed, SCHEDULED_WEIGHT_DECAY: True},
        {"params": not_decayed, "weight_decay": 0.0, SCHEDULED_WEIGHT_DECAY: False},
    ]


def build_optimizer(student: nn.Module, **adamw_kwargs) -> torch.optim.AdamW:
    """AdamW over `build_param_groups(student)`; the learning rate and weight decay are set every step by
    `apply_schedule`, so their initial values do not matter."""
    return torch.optim.AdamW(build_param_groups(student), lr=0.0, **adamw_kwargs)


def apply_schedule(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    """Sets the step's learning rate on every group and its weight decay on the decayed group."""
    for group in optimizer.param_groups:
        group["lr"] = values.learning_rate
        if group.get(SCHEDULED_WEIGHT_DECAY, False):
            group["weight_decay"] = values.weight_decay


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor | None:
    """Clips EACH gradient tensor to L2 norm `max_norm` (DINO's `clip_gradients`, not a global-norm clip).

    For every tensor, `coef = max_norm / (norm + 1e-6)`; it is scaled by `coef` when `coef < 1`. Runs without a
    host sync (the reference calls `.item()` once per tensor). Returns the norms before clipping, or `None` when no
    parameter has a gradient.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}.")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack(torch._foreach_norm(grads)).float()
    coefficients = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad, coefficient in zip(grads, coefficients.unbind()):
        grad.mul_(coefficient.to(grad.dtype))  # x * 1.0 == x: untouched tensors stay bit-identical
    return norms


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float, mode: str = "per_parameter") -> float:
    """Clips the gradients of the trainable `parameters` and returns their total L2 norm BEFORE clipping.

    `mode="per_parameter"` clips each tensor (DINO, `clip_gradients_per_parameter`), `"global"` one norm over all
    of them (MoBY, `torch.nn.utils.clip_grad_norm_`); `max_norm` 0 clips nothing. Either clip measures the norms
    it needs anyway, so the total comes from them instead of a second pass over every gradient.
    """
    trained = [p for p in parameters if p.requires_grad]
    if max_norm <= 0:
        return gradient_norm(trained)
    if mode == "global":
        return float(torch.nn.utils.clip_grad_norm_(trained, max_norm))
    if mode != "per_parameter":
        raise ValueError(f"mode must be 'per_parameter' or 'global', got {mode!r}.")
    norms = clip_gradients_per_parameter(trained, max_norm)
    return 0.0 if norms is None else torch.linalg.vector_norm(norms.double()).item()


def cancel_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Drops the gradients of `parameters` so that the optimiser leaves them untouched this step (no update, no
    weight decay): DINO's last-layer freeze during the first epoch."""
    for param in parameters:
        param.grad = None


__all__ = [
    "SCHEDULED_WEIGHT_DECAY",
    "apply_schedule",
    "build_optimizer",
    "build_param_groups",
    "cancel_gradients",
    "clip_gradients",
    "clip_gradients_per_parameter",
]
