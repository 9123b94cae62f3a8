"""What a resumed run must share with the checkpoint it continues, checked before it trains a step.

- the global batch (processes x per-device batch x accumulation): the schedules are defined per optimiser step of it;
- the settings each process's saved data position depends on (`DATA_STREAM_ARGUMENTS`): a worker's stream is cut
  into micro-batches of the per-device batch, so the same global batch through other accumulation steps would
  continue at another place of the stream;
- the model configuration (`config_snapshot`): a field that changes no weight's shape (e.g. `num_positives`) would
  otherwise load without a word and train another model from the checkpoint's weights;
- the crop recipe (sizes, counts, scales, resampling): the same weights trained on other crops are another run.
  Checkpoints of earlier versions recorded it in the model configuration; it is compared from there.

Mismatches raise `UsageError` naming each setting, its saved and its current value. (The number of processes and
the weights' names and shapes are checked when the checkpoint is loaded.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from selfpatch_hf.cli.errors import UsageError
from selfpatch_hf.models.selfpatch.recipes import CROP_FIELDS, MOVED_TO_TRAINING

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
    crop_recipe: Mapping[str, Any] | None = None,
) -> None:
    """Raises `UsageError` unless the run described by `global_batch_size`, `arguments` (all option values),
    `model_config` (a `config_snapshot`) and `crop_recipe` (`CropRecipe.to_dict()`) can continue `checkpoint`, whose
    `trainer_state` is given."""
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
    # checkpoints of older versions did not record the model configuration
    saved_config = dict(trainer_state.get("model_config", {}))
    saved_crops = trainer_state.get("crop_recipe")
    if saved_crops is None:  # earlier versions kept the crop recipe (and MoBY's momentum) in the model config
        saved_crops = {name: saved_config[name] for name in CROP_FIELDS if name in saved_config}
    for name in MOVED_TO_TRAINING:
        saved_config.pop(name, None)
    from selfpatch_hf.models.selfpatch.configuration import LEGACY_MODEL_TYPES  # loads transformers: here

    if saved_config.get("model_type") in LEGACY_MODEL_TYPES:  # the same model, under its former type name
        saved_config["model_type"] = model_config.get("model_type")
    if "model_config" in trainer_state:
        differences = _differences(saved_config, model_config)
        if differences:
            raise UsageError(
                f"{checkpoint} was trained with another model configuration ({'; '.join(differences)}). Resume with "
                "the recipe's config_overrides, or start a new run (another --output_dir, or --overwrite_output_dir)."
            )
    if crop_recipe is not None and saved_crops:
        differences = _differences(
            saved_crops, {name: crop_recipe[name] for name in saved_crops if name in crop_recipe}
        )
        if differences:
            raise UsageError(
                f"{checkpoint} was trained with another crop recipe ({'; '.join(differences)}). Resume with the "
                "recipe's crop options, or start a new run (another --output_dir, or --overwrite_output_dir)."
            )


__all__ = ["DATA_STREAM_ARGUMENTS", "check_resumable", "config_snapshot"]
