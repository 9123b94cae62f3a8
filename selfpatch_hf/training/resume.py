"""What a resumed run must share with the checkpoint it continues, checked before it trains a step.

- the global batch (processes x per-device batch x accumulation): the schedules are defined per optimiser step of it;
- the settings each process's saved data position depends on (`DATA_STREAM_ARGUMENTS`): a worker's stream is cut
  into micro-batches of the per-device batch, so the same global batch through other accumulation steps would
  continue at another place of the stream;
- the model configuration (`config_snapshot`): a field that changes no weight's shape (e.g. `num_positives`) would
  otherwise load without a word and train another model from the checkpoint's weights.

Mismatches raise `UsageError` naming each setting, its saved and its current value. (The number of processes and
the weights' names and shapes are checked when the checkpoint is loaded.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from selfpatch_hf.cli.errors import UsageError

# arguments a checkpoint's per-process data positions depend on
DATA_STREAM_ARGUMENTS = ("per_device_train_batch_size", "num_workers", "seed", "shuffle_buffer_size")


def config_snapshot(config) -> dict[str, Any]:
    """A model configuration as JSON values, without the library version (what checkpoints record)."""
    values = json.loads(config.to_json_string(use_diff=False))
    values.pop("transformers_version", None)
    if isinstance(values.get("backbone_config"), dict):
        values["backbone_config"].pop("transformers_version", None)
    return values


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    differences = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key}: saved {old!r}, now {new!r}")
    return differences


def check_resumable(
    trainer_state: Mapping[str, Any],
    checkpoint: str | Path,
    *,
    global_batch_size: int,
    arguments: Mapping[str, Any],
    model_config: Mapping[str, Any],
) -> None:
    """Raises `UsageError` unless the run described by `global_batch_size`, `arguments` (all option values) and
    `model_config` (a `config_snapshot`) can continue `checkpoint`, whose `trainer_state` is given."""
    saved_batch = trainer_state["global_batch_size"]
    if saved_batch != global_batch_size:
        raise UsageError(
            f"{checkpoint} was trained with a global batch of {saved_batch}, this run has {global_batch_size}: the "
            "schedules are defined per optimiser step of that batch. Resume with the same processes x per-device "
            "batch x accumulation."
        )
    saved_arguments = trainer_state.get("arguments", {})
    changed = [
        f"--{name} {saved_arguments[name]} (now {arguments[name]})"
        for name in DATA_STREAM_ARGUMENTS
        if name in saved_arguments and saved_arguments[name] != arguments[name]
    ]
    if changed:
        raise UsageError(
            f"{checkpoint} saved each process's data position for {', '.join(changed)}; resume with those values "
            "(the same global batch through other accumulation steps cuts the stream differently)."
        )
    if "model_config" in trainer_state:  # checkpoints of older versions did not record it
        from selfpatch_hf.models.selfpatch.configuration import LEGACY_MODEL_TYPES

        saved_config = dict(trainer_state["model_config"])
        if saved_config.get("model_type") in LEGACY_MODEL_TYPES:  # the same model, under its former type name
            saved_config["model_type"] = model_config.get("model_type")
        differences = _differences(saved_config, model_config)
        if differences:
            raise UsageError(
                f"{checkpoint} was trained with another model configuration ({'; '.join(differences)}). Resume with "
                "the recipe's config_overrides, or start a new run (another --output_dir, or --overwrite_output_dir)."
            )


__all__ = ["DATA_STREAM_ARGUMENTS", "check_resumable", "config_snapshot"]
