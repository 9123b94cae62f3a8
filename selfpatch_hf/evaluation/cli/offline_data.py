"""`selfpatch eval make-offline-data`: the offline evaluation data (synthetic compositions of real photographs).

Without `--output-dir` the standard scenes go to the package's cache folder (`default_offline_data_dir()`), which
is also where fine-tuning's `offline-scenes` looks: one copy for both, built once. That folder holds the standard
settings only (the ones BENCHMARKS.md's floors are measured on); other sizes need an `--output-dir`. The data are
built beside their folder and moved into place when complete, so an interrupted build leaves nothing half
written, and an existing folder is only ever replaced by a newer build of offline data, never another folder.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from selfpatch_hf.cli.errors import CommandFailure, UsageError
from selfpatch_hf.evaluation.cli.common_options import int_pair

DESCRIPTION = (
    "Build small DAVIS-layout video sequences and a segmentation dataset from real photographs bundled with "
    "Python packages, for evaluating without downloads (the standard scenes go to the cache folder that "
    "fine-tuning's offline-scenes reads too)."
)
EXAMPLES = """examples:
  selfpatch eval make-offline-data                                   # the standard scenes, in the cache folder
  selfpatch eval make-offline-data --coco-json                       # instances also as COCO json
  selfpatch eval make-offline-data --output-dir /tmp/small --num-sequences 2 --num-train 24 --num-eval 8"""

# option -> (help, type for argparse); the defaults are make_offline_data's own
_OPTIONS = {
    "num_sequences": ("number of video sequences", int),
    "num_frames": ("frames per sequence (at least 3: the first and last are not scored)", int),
    "frame_size": ("HEIGHT,WIDTH of the frames", int_pair),
    "max_objects": ("most objects per sequence", int),
    "num_train": ("segmentation training images", int),
    "num_eval": ("segmentation evaluation images", int),
    "image_size": ("side of the segmentation images", int),
    "num_instance_train": ("instance-set training images", int),
    "num_instance_eval": ("instance-set evaluation images", int),
    "instance_size": ("HEIGHT,WIDTH of the instance-set images", int_pair),
    "max_instances": ("most objects per instance-set image (at most 20)", int),
    "seed": ("random seed", int),
}
# counts that may be 0 (that part is not built); max_instances has its own range; everything else is at least 1
_MAY_BE_ZERO = ("seed", "num_instance_train", "num_instance_eval", "max_instances")


def _defaults() -> dict:
    from selfpatch_hf.data.samples.synthetic_scenes import make_offline_data

    return {
        name: parameter.default
        for name, parameter in inspect.signature(make_offline_data).parameters.items()
        if name in _OPTIONS
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-dir",
        help="writes OUTPUT/davis, OUTPUT/segmentation and OUTPUT/instances (default: offline-eval/ in the cache "
        "folder, $SELFPATCH_HF_CACHE or ~/.cache/selfpatch_hf)",
    )
    parser.add_argument(
        "--coco-json",
        action="store_true",
        help="also write the instance set as COCO json + PNG folders (OUTPUT/instances/coco)",
    )
    for name, default in _defaults().items():
        help_text, kind = _OPTIONS[name]
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=tuple(default) if isinstance(default, list) else default,
            metavar="HEIGHT,WIDTH" if kind is int_pair else None,
            help=f"{help_text} (default: {shown})",
        )


def _is_offline_data(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "offline_data.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run(args: argparse.Namespace) -> int:
    from selfpatch_hf.atomic_folders import staged_folder
    from selfpatch_hf.data.samples.synthetic_scenes import (
        DATA_NOTE,
        default_offline_data_dir,
        make_offline_data,
    )
    from selfpatch_hf.evaluation.offline_reference import COPY_ONLY_ARGUMENTS, standard_arguments

    settings = {name: getattr(args, name) for name in _OPTIONS}
    for name, value in settings.items():
        minimum = 3 if name == "num_frames" else 0 if name in _MAY_BE_ZERO else 1
        if any(v < minimum for v in (value if isinstance(value, tuple) else (value,))):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}.")
    if not 1 <= settings["max_instances"] <= 20:
        raise UsageError(f"--max-instances must be between 1 and 20, got {settings['max_instances']}.")
    settings["coco_json"] = args.coco_json

    # as offline_data.json records them (pairs as lists)
    recorded = {name: list(value) if isinstance(value, tuple) else value for name, value in settings.items()}
    standard = {k: v for k, v in recorded.items() if k not in COPY_ONLY_ARGUMENTS} == standard_arguments()
    if args.output_dir is None:
        if not standard:
            raise UsageError(
                "the cache folder holds the standard scenes only (fine-tuning reuses them, and the recorded floors "
                "are measured on them); give --output-dir for other settings."
            )
        target = default_offline_data_dir()
    else:
        target = Path(args.output_dir).expanduser()
    if target.exists():
        if not target.is_dir():
            raise UsageError(f"--output-dir {target} is a file: give a folder (it is created if missing).")
        existing = _is_offline_data(target)
        if existing is None and any(target.iterdir()):
            contents = {p.name for p in target.iterdir()}
            if contents != {"segmentation"}:  # fine-tuning's copy of the segmentation scenes alone is rebuilt
                raise UsageError(
                    f"--output-dir {target} exists and holds other files ({', '.join(sorted(contents)[:5])}): give "
                    "a new folder, or one that make-offline-data wrote (it is replaced)."
                )
        if existing is not None and existing.get("arguments") == recorded:
            print(
                f"{DATA_NOTE}\nThe offline data are already built in {target} (davis/, segmentation/, instances/)."
            )
            return 0
    print(f"building the offline data in {target} (about 20 s for the standard scenes) ...", file=sys.stderr)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged_folder(target) as staging:
            info = make_offline_data(staging, **settings)
    except OSError as error:  # a read-only or full disk: nothing is left half written
        raise CommandFailure(f"cannot write the offline data to {target}: {error}") from error
    except ValueError as error:  # settings the scenes cannot have (e.g. more objects than there are cut-outs)
        raise UsageError(str(error)) from error
    print(
        f"{DATA_NOTE}\nwrote {len(info['sequences'])} sequences to {target / 'davis'}, the segmentation set to "
        f"{target / 'segmentation'} and the instance set to {target / 'instances'}"
    )
    return 0
