"""What scores on the standard offline scenes mean: the floors recorded in BENCHMARKS.md.

The offline scenes (`selfpatch eval make-offline-data`, `selfpatch_hf.data.samples.synthetic_scenes`) are easy in
some ways and hard in others, so a number alone says little: a randomly initialised ViT-Ti/16 already propagates
labels at J&F 47.6 and its linear probe reaches 41.4 mIoU there. BENCHMARKS.md ("Dense evaluation on offline data")
records these floors, measured with `benchmarks/dense_study.py` on two random initialisations, and the evaluation's
own noise (the probe's seed moves mIoU by up to 0.9; propagation is deterministic). `reference_note` says so beside
a result, when the data are the standard scenes; `tests/test_docs.py` checks that the numbers here are the ones
BENCHMARKS.md shows.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

from selfpatch_hf.evaluation.configs import KnnConfig, LinearProbeConfig, PropagationConfig

SOURCE = 'BENCHMARKS.md, "Dense evaluation on offline data"'
ARCHITECTURE = "ViT-Ti/16"  # the architecture of the recorded random initialisations
# metric -> (mean, standard deviation over the 2 random initialisations), in percent
RANDOM_INIT_FLOOR: dict[str, tuple[float, float]] = {
    "J&F": (47.6, 0.8),
    "J": (53.7, 0.8),
    "F": (41.5, 0.9),
    "mIoU": (41.4, 0.9),
    "mAcc": (52.2, 1.0),
    "aAcc": (69.2, 0.5),
    "k-NN top-1": (41.9, 0.9),
}
RANDOM_INIT_RUNS = 2
PROBE_SEED_SPREAD = 0.9  # largest change of one backbone's probe mIoU over the probe's seeds 0, 1, 2
# The settings the floors were measured with (benchmarks/dense_study.py); fields that change no result are ignored.
RECORDED_SETTINGS: dict[str, Any] = {
    "davis": PropagationConfig(short_side=240),
    "linear-probe": LinearProbeConfig(),
    "knn": KnnConfig(resize=224, crop=224),
}
_RESULT_NEUTRAL = {"feature_batch_size", "query_chunk", "batch_size", "num_labels"}


# arguments of make_offline_data that only add another copy of the same scenes (the instance set as COCO json)
COPY_ONLY_ARGUMENTS = ("coco_json",)


def standard_arguments() -> dict[str, Any]:
    """The arguments of the standard scenes: `make_offline_data`'s defaults (their one home)."""
    from selfpatch_hf.data.samples.synthetic_scenes import make_offline_data

    arguments = {
        name: list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default
        for name, parameter in inspect.signature(make_offline_data).parameters.items()
        if parameter.default is not inspect.Parameter.empty and name not in COPY_ONLY_ARGUMENTS
    }
    return arguments


def offline_data_info(path: str | Path) -> dict[str, Any] | None:
    """The description (`offline_data.json`) of the offline data that `path` (the data folder, or its `davis/` or
    `segmentation/` part) belongs to; None for any other data."""
    path = Path(path)
    for folder in (path, path.parent):
        info = folder / "offline_data.json"
        if info.is_file():
            try:
                return json.loads(info.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def is_standard_scenes(path: str | Path) -> bool:
    info = offline_data_info(path)
    if info is None:
        return False
    arguments = {k: v for k, v in info.get("arguments", {}).items() if k not in COPY_ONLY_ARGUMENTS}
    return arguments == standard_arguments()


def _same_protocol(command: str, config: Any) -> bool:
    recorded = RECORDED_SETTINGS[command]
    if command == "davis":
        from selfpatch_hf.evaluation.propagation import protocol_size

        frame = standard_arguments()["frame_size"]
        if protocol_size(*frame, config, 16) != protocol_size(*frame, recorded, 16):
            return False
        neutral = _RESULT_NEUTRAL | {"short_side", "upscale", "size_multiple"}
    else:
        neutral = _RESULT_NEUTRAL
    return all(
        getattr(config, field.name) == getattr(recorded, field.name)
        for field in dataclasses.fields(recorded)
        if field.name not in neutral
    )


def _is_recorded_architecture(model_config: Any) -> bool:
    return (
        getattr(model_config, "model_type", None) == "vit"
        and getattr(model_config, "hidden_size", None) == 192
        and getattr(model_config, "num_hidden_layers", None) == 12
        and getattr(model_config, "patch_size", None) == 16
    )


def reference_note(command: str, data_path: str | Path, config: Any, model_config: Any = None) -> str | None:
    """A few sentences on what `command`'s scores on `data_path` mean, or None when `data_path` is not the standard
    offline scenes. `config`: the command's settings; `model_config`: the (first) backbone's config."""
    if command not in RECORDED_SETTINGS or not is_standard_scenes(data_path):
        return None
    metrics = {"davis": ("J&F", "J", "F"), "linear-probe": ("mIoU", "mAcc", "aAcc"), "knn": ("k-NN top-1",)}
    floor = ", ".join(
        f"{name} {mean} ± {std}"
        for name, (mean, std) in RANDOM_INIT_FLOOR.items()
        if name in metrics[command]
    )
    lines = [
        f"Reference ({SOURCE}): on these standard offline scenes, randomly initialised {ARCHITECTURE} backbones "
        f"({RANDOM_INIT_RUNS} initialisations) score {floor} (percent, mean ± std); learnt features mean something "
        "only above that."
    ]
    lines.append(
        f"Noise of the evaluation: the probe's own seed moves mIoU by up to {PROBE_SEED_SPREAD}."
        if command == "linear-probe"
        else "Noise of the evaluation: none, it is deterministic."
    )
    if not _same_protocol(command, config):
        lines.append(
            "These settings differ from the recorded ones (benchmarks/dense_study.py), so the floor is only a rough "
            "guide: --random-baseline measures one with these settings."
        )
    elif model_config is not None and not _is_recorded_architecture(model_config):
        lines.append(
            f"The floor was measured for {ARCHITECTURE}; --random-baseline measures this backbone's architecture."
        )
    return " ".join(lines)


__all__ = [
    "RANDOM_INIT_FLOOR",
    "RECORDED_SETTINGS",
    "SOURCE",
    "is_standard_scenes",
    "offline_data_info",
    "reference_note",
    "standard_arguments",
]
