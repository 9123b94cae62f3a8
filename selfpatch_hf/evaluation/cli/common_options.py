"""What the `selfpatch eval` commands share: the backbone options and loading, the dataset options and loading, the
run-time options (`--threads`, `--quiet`, `--device`) and writing results.

Nothing heavy is imported at module level: each command's `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfpatch_hf.cli.errors import CommandFailure, UsageError

# ---------------------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------------------


def int_pair(text: str) -> tuple[int, int]:
    """`HEIGHT,WIDTH` (or `HEIGHTxWIDTH`), both positive."""
    parts = text.replace("x", ",").split(",")
    try:
        height, width = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH (two whole numbers), got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"HEIGHT and WIDTH must be positive, got {text!r}")
    return height, width


def named_model(text: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (named after its folder)."""
    if "=" in text:
        name, path = text.split("=", 1)
        return name, path
    return Path(text.rstrip("/")).name or text, text


def add_backbone_options(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    """`--model` (once, or repeatable with NAME=), the normalisation, the Swin stage and `--random-baseline`."""
    if multiple:
        parser.add_argument(
            "--model",
            action="append",
            type=named_model,
            metavar="[NAME=]PATH",
            help="backbone folder or Hub id loadable by AutoModel; repeat to compare backbones (NAME labels the "
            "results; default: the folder name)",
        )
    else:
        parser.add_argument("--model", required=True, help="backbone folder or Hub id loadable by AutoModel")
    parser.add_argument(
        "--image-mean",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="normalisation mean (default: the backbone's image processor, else ImageNet's)",
    )
    parser.add_argument(
        "--image-std",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="normalisation standard deviation (default: the backbone's image processor, else ImageNet's)",
    )
    parser.add_argument(
        "--stage",
        type=int,
        help="Swin backbones: the stage whose token map is evaluated, 1-based (default: the last; Swin-T stage 3 "
        "has stride 16)",
    )


def add_random_baseline_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--random-baseline",
        action="store_true",
        help="also evaluate a randomly initialised backbone of the (first) --model's architecture, the floor "
        "that learnt features must beat (transformers' initialisation, seed 0)",
    )


def looks_local(path: str) -> bool:
    """Whether a model/dataset argument can only mean a local path (Hub ids are `name` or `namespace/name`)."""
    return (
        path.startswith(("/", "./", "../", "~", "."))
        or path.count("/") > 1
        or os.sep != "/"
        and os.sep in path
    )


def check_exists(option: str, path: str) -> None:
    if looks_local(path) and not Path(path).expanduser().exists():
        raise UsageError(f"{option} {path}: no such file or folder; give an existing path (or a Hub id).")


def load_backbone(
    args: argparse.Namespace, path: str, option: str = "--model", *, random_init: bool = False, **kwargs
):
    """The `FrozenBackbone` of `path` (`random_init`: its architecture, randomly initialised), on `--device`;
    a missing or unloadable model is one line."""
    from selfpatch_hf.evaluation.features import FrozenBackbone

    check_exists(option, path)
    load = FrozenBackbone.random_like if random_init else FrozenBackbone.from_pretrained
    try:
        return load(
            path,
            image_mean=args.image_mean,
            image_std=args.image_std,
            device=args.device,
            stage=getattr(args, "stage", None),
            **kwargs,
        )
    except ValueError as error:
        if "stage=" in str(error):  # a stage the backbone does not have
            raise UsageError(f"--stage: {error}") from error
        first_line = str(error).strip().splitlines()[0]
        raise CommandFailure(f"cannot load a backbone from {option} {path}: {first_line}") from error
    except OSError as error:  # not a model folder / unknown Hub id
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandFailure(f"cannot load a backbone from {option} {path}: {first_line}") from error


RANDOM_BASELINE = "random-init"  # the name of the randomly initialised backbone in the results


def backbones_to_evaluate(
    args: argparse.Namespace, models: list[tuple[str, str]], **kwargs
) -> list[tuple[str, Any]]:
    """(name, backbone) of every `models` entry (name, path), all loaded before any work, then with
    `--random-baseline` the first one's architecture randomly initialised, named `RANDOM_BASELINE`."""
    backbones = [(name, load_backbone(args, path, **kwargs)) for name, path in models]
    if getattr(args, "random_baseline", False):
        backbones.append((RANDOM_BASELINE, load_backbone(args, models[0][1], random_init=True, **kwargs)))
    names = [name for name, _ in backbones]
    if len(set(names)) < len(names):
        raise UsageError(f"--model names must differ (they label the results), got {names}.")
    return backbones


def results_payload(results: dict[str, Any], main_name: str) -> dict[str, Any]:
    """The JSON of a single-model command: the model's scores, and the random baseline's under its name."""
    payload = results[main_name].to_dict()
    if RANDOM_BASELINE in results:
        payload[RANDOM_BASELINE] = results[RANDOM_BASELINE].to_dict()
    return payload


def evaluate_backbones(
    args: argparse.Namespace, task: str, evaluate: Callable[[str, Any], Any]
) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """(backbones, {name: evaluate(name, backbone)}) for `--model` (and `--random-baseline`); a `ValueError` of
    the evaluation (columns not found, labels out of range, a crop off the patch grid) becomes one line naming
    `task` and the dataset."""
    backbones = backbones_to_evaluate(args, [(args.model, args.model)])
    results = {}
    for name, backbone in backbones:
        try:
            results[name] = evaluate(name, backbone)
        except ValueError as error:
            raise CommandFailure(f"{task} on {args.dataset}: {error}") from error
    return backbones, results


def finish_report(
    args: argparse.Namespace,
    command: str,
    results: dict[str, Any],
    config: Any,
    backbones: list[tuple[str, Any]],
) -> int:
    """After a command's table: `--output-json`, then what the numbers mean on this data where it is known
    (`selfpatch_hf.evaluation.offline_reference`)."""
    from selfpatch_hf.evaluation.offline_reference import reference_note

    write_json(args.output_json, results_payload(results, args.model))
    reference = reference_note(command, args.dataset, config, backbones[0][1].model.config)
    if reference:
        sys.stdout.flush()
        note(reference)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def add_dataset_options(
    parser: argparse.ArgumentParser, train_help: str, eval_help: str, dataset_help: str | None = None
) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        help=dataset_help or "Hub id, local data folder (parquet, imagefolder, ...) or save_to_disk folder",
    )
    parser.add_argument("--dataset-config", help="the dataset's configuration name, if it has several")
    parser.add_argument("--train-split", default="train", help=train_help)
    parser.add_argument("--eval-split", default="validation", help=eval_help)


def load_split(dataset: str, split: str, config_name: str | None = None):
    """A split of a Hub dataset, a local data folder (parquet, imagefolder, ...) or a `save_to_disk` folder."""
    import datasets

    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{dataset} has splits {list(loaded)}, not {split!r}.")
            return loaded[split]
        return loaded
    return datasets.load_dataset(dataset, config_name, split=split)


def load_split_option(args: argparse.Namespace, split: str):
    """`load_split` of `--dataset`, with the command line's one-line errors."""
    check_exists("--dataset", args.dataset)
    try:
        return load_split(args.dataset, split, args.dataset_config)
    except (
        FileNotFoundError,
        ConnectionError,
    ) as error:  # datasets' DatasetNotFoundError is a FileNotFoundError
        raise CommandFailure(
            f"cannot open the {split!r} split of --dataset {args.dataset}: {error}"
        ) from error
    except ValueError as error:  # e.g. an unknown split
        raise UsageError(f"--dataset {args.dataset}: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------------------------


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device to run the backbone on")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads on the CPU (default: torch's, one per core); on a machine that other jobs keep busy, "
        "--threads 1 can be twice as fast",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or per-epoch lines (bars appear only on a terminal)",
    )


def apply_runtime_options(args: argparse.Namespace) -> None:
    """Checks `--threads` and sets torch's thread count (before any work)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be a positive number of threads, got {threads}.")
    import torch

    torch.set_num_threads(threads)


def show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def note(text: str) -> None:
    """A line for the reader of the results (on stderr, so that stdout holds only the tables)."""
    print(text, file=sys.stderr)


# options that name where a command writes: (attribute, option, a file or a folder)
OUTPUT_OPTIONS = (
    ("output_json", "--output-json", "file"),
    ("output", "--output", "file"),
    ("output_dir", "--output-dir", "folder"),
)


def check_output_paths(args: argparse.Namespace) -> None:
    """Every output option names a place that can be written, said before the work (a mistake found only when the
    results are written would lose them): no file where a folder is needed, no folder where a file is, a writable
    existing ancestor (the folders below it are created)."""
    for attribute, option, kind in OUTPUT_OPTIONS:
        value = getattr(args, attribute, None)
        if not value or not isinstance(value, (str, os.PathLike)):
            continue
        path = Path(value).expanduser()
        if kind == "file" and path.is_dir():
            raise UsageError(f"{option} {value} is a folder; give a file name inside it.")
        if kind == "folder" and path.exists() and not path.is_dir():
            raise UsageError(f"{option} {value} is a file; give a folder (it is created if missing).")
        ancestor = path.parent if kind == "file" else path
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UsageError(f"{option} {value}: {ancestor} is a file, not a folder; give another {option}.")
        if not os.access(ancestor, os.W_OK):
            raise UsageError(f"{option} {value}: {ancestor} is not writable; give another {option}.")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Writes `payload` to `path` (if given) atomically: a full disk or a kill leaves no half-written file."""
    if not path:
        return
    target = Path(path)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json.dumps(payload, indent=2, allow_nan=True))
        os.replace(staging, target)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise CommandFailure(f"cannot write {target}: {error}") from error


def percent(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.1f}"


__all__ = [
    "RANDOM_BASELINE",
    "add_backbone_options",
    "backbones_to_evaluate",
    "results_payload",
    "add_dataset_options",
    "add_random_baseline_option",
    "add_runtime_options",
    "apply_runtime_options",
    "check_exists",
    "int_pair",
    "load_backbone",
    "load_split",
    "load_split_option",
    "named_model",
    "note",
    "percent",
    "show_progress",
    "write_json",
]
