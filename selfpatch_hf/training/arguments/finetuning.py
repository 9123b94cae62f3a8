"""The options every fine-tuning script shares beyond `RuntimeArguments`: the length, the AdamW + layer-wise decay
optimiser, the warm-up, clipping and the evaluation period, with their checks and the parse of a recipe file plus
the command line. Each task's training arguments subclass `FinetuningArguments` and redeclare the fields whose
defaults or choices differ (a redeclared field keeps its place and takes the new default or help).

Importing this module loads no torch, datasets or model code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from selfpatch_hf.cli.errors import UsageError
from selfpatch_hf.training.arguments.common import RuntimeArguments, validate_runtime_arguments
from selfpatch_hf.training.arguments.recipe_files import option, parse_recipe_and_command_line

RANDOM_BACKBONE_PREFIX = "random:"  # --backbone random:PRESET, a randomly initialised ViT (baselines, tests)


@dataclass
class FinetuningArguments(RuntimeArguments):
    output_dir: str | None = option(None, "Where metrics, checkpoints and the model go (required).")
    max_steps: int = option(10000, "Training length in optimiser steps (iterations).")
    learning_rate: float = option(1e-4, "Peak learning rate (not scaled with the batch).")
    layer_decay: float = option(1.0, "Layer-wise learning-rate decay of the backbone (1: none; BEiT 0.65).")
    weight_decay: float = option(0.05, "AdamW weight decay (none on biases, norms, position embeddings).")
    min_learning_rate: float = option(0.0, "Learning rate at the end.")
    warmup_steps: int = option(500, "Linear warm-up steps.")
    warmup_ratio: float = option(1e-3, "Warm-up starts at this fraction of the learning rate.")
    max_grad_norm: float = option(0.0, "Clip the global gradient norm (0: no clipping).")
    eval_steps: int = option(0, "Evaluate every N steps (0: only at the end).")
    logging_steps: int = option(50, "Log metrics every N optimiser steps.")
    push_to_hub: bool = option(False, "Upload the final model folder to the Hub.")


def validate_finetuning_arguments(args: FinetuningArguments, *, hub_model_example: str) -> None:
    """The checks of the shared fine-tuning options (then of the runtime's)."""
    if args.max_steps < 1:
        raise UsageError(f"--max_steps must be >= 1, got {args.max_steps}.")
    for name in ("warmup_steps", "eval_steps"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.warmup_steps >= args.max_steps:
        raise UsageError(f"--warmup_steps {args.warmup_steps} must be below --max_steps {args.max_steps}.")
    if not 0 < args.layer_decay <= 1:  # also NaN
        raise UsageError(f"--layer_decay must be in (0, 1], got {args.layer_decay}.")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if not 0 <= args.min_learning_rate <= args.learning_rate:
        raise UsageError(
            f"--min_learning_rate must lie between 0 and --learning_rate {args.learning_rate}, got "
            f"{args.min_learning_rate}."
        )
    for name in ("weight_decay", "max_grad_norm"):
        if not getattr(args, name) >= 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if not 0 <= args.warmup_ratio <= 1:
        raise UsageError(f"--warmup_ratio must lie in [0, 1], got {args.warmup_ratio}.")
    validate_runtime_arguments(args, hub_model_example=hub_model_example)


def check_drop_path_rate(rate: float) -> None:
    if not (0 <= rate < 1 and math.isfinite(rate)):
        raise UsageError(f"--drop_path_rate must be in [0, 1), got {rate}.")


def parse_task_arguments(
    classes: tuple[type, type, type],
    argv: list[str],
    *,
    script: str,
    description: str | None,
    validate: Callable[[Any, Any, Any], None],
) -> tuple[Any, Any, Any]:
    """`[RECIPE.yaml|json] [--option value ...]` -> the (model, data, training) argument groups of a fine-tuning
    script, checked by `validate`."""
    model_args, data_args, training_args = parse_recipe_and_command_line(
        classes, argv, script=script, description=description
    ).groups
    validate(model_args, data_args, training_args)
    return model_args, data_args, training_args


__all__ = [
    "RANDOM_BACKBONE_PREFIX",
    "FinetuningArguments",
    "check_drop_path_rate",
    "parse_task_arguments",
    "validate_finetuning_arguments",
]
