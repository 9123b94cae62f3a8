"""`selfpatch eval coco`: COCO box / mask AP of a saved detector or instance segmenter (`evaluate_coco`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfpatch_hf.cli.errors import CommandFailure, UsageError
from selfpatch_hf.evaluation.cli.common_options import apply_runtime_options, check_exists, write_json
from selfpatch_hf.evaluation.cli.config_options import add_config_options, config_from_args
from selfpatch_hf.evaluation.configs import CocoEvalConfig

DESCRIPTION = (
    "Run a saved AutoModelForObjectDetection (box AP) or AutoModelForUniversalSegmentation (mask AP and box AP of "
    "its masks) folder over a split in the COCO layout, with its own image processor and post-processing, and "
    "score it with pycocotools (AP, AP50, AP75, small / medium / large, in percent)."
)
EXAMPLES = """examples:
  selfpatch eval coco --model runs/mask2former --dataset data/coco/annotations/instances_val2017.json
  selfpatch eval coco --model runs/detector --dataset detection-datasets/coco --split val --box-format xyxy
  selfpatch eval coco --model runs/detector --dataset offline-instances --output-json results/coco.json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="detector / instance segmenter folder or Hub id")
    parser.add_argument(
        "--dataset",
        required=True,
        help="a COCO json file, a Hub id or local folder in the Hub's COCO layout (image + objects), a save_to_disk "
        "folder, or offline-instances",
    )
    parser.add_argument(
        "--split", default="validation", help="split to evaluate (COCO json: names its image folder)"
    )
    parser.add_argument("--dataset-config", help="the dataset's configuration name, if it has several")
    parser.add_argument(
        "--image-dir", help="COCO json: the image folder (default: COCO's layout, beside annotations/)"
    )
    parser.add_argument(
        "--box-format",
        choices=("xywh", "xyxy"),
        default="xywh",
        help="Hub layout: [x, y, width, height] (COCO) or [x0, y0, x1, y1]; see the dataset card",
    )
    parser.add_argument(
        "--label-names", help="JSON file with the list of category names, for ids without names"
    )
    parser.add_argument("--image-column", help="column of the images (default: the image column)")
    parser.add_argument(
        "--objects-column", help="column of the objects (default: the list-of-objects column)"
    )
    parser.add_argument(
        "--category-field", help="objects' category field (default: category / category_id / label)"
    )
    parser.add_argument(
        "--offline-data-dir",
        help="where offline-instances is built on first use (default: the offline data's cache folder)",
    )
    parser.add_argument("--output-json", help="also write the scores (percent) to this JSON file")
    add_config_options(parser, CocoEvalConfig, title="COCO evaluation")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads on the CPU (default: torch's, one per core); on a busy machine --threads 1 can be "
        "twice as fast",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def _label_names(path: str | None) -> list[str] | None:
    if not path:
        return None
    try:
        names = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--label-names {path}: not a readable JSON list ({error}).") from None
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise UsageError(f"--label-names {path}: must hold a JSON list of category names.")
    return names


def run(args: argparse.Namespace) -> int:
    from selfpatch_hf.data.detection.sources import OFFLINE_INSTANCES, load_detection_source
    from selfpatch_hf.evaluation.detection import evaluate_coco

    config = config_from_args(CocoEvalConfig, args)
    apply_runtime_options(args)
    check_exists("--model", args.model)
    if args.dataset != OFFLINE_INSTANCES:
        check_exists("--dataset", args.dataset)
    if args.image_dir is not None and not Path(args.image_dir).is_dir():
        raise UsageError(
            f"--image-dir {args.image_dir}: no such folder; give the folder of the COCO json's images."
        )
    options = {
        "box_format": args.box_format,
        "label_names": _label_names(args.label_names),
        "image_column": args.image_column,
        "objects_column": args.objects_column,
        "category_field": args.category_field,
        "offline_data_dir": args.offline_data_dir,
    }
    try:
        source = load_detection_source(
            args.dataset,
            args.split,
            image_dir=args.image_dir,
            config_name=args.dataset_config,
            **{key: value for key, value in options.items() if value is not None},
        )
    except (FileNotFoundError, ConnectionError, OSError) as error:
        raise CommandFailure(
            f"cannot open the {args.split!r} split of --dataset {args.dataset}: {error}"
        ) from error
    except ValueError as error:  # no COCO layout, a named column missing, an unknown split
        raise UsageError(f"--dataset {args.dataset}: {error}") from error
    progress = None
    if not args.quiet:

        def progress(done: int, total: int) -> None:
            print(f"\r{done}/{total} images", end="\n" if done == total else "", file=sys.stderr)

    try:
        result = evaluate_coco(args.model, source, config, progress=progress)
    except OSError as error:  # not a model folder, an unreadable image
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandFailure(f"--model {args.model}: {first_line}") from error
    except ValueError as error:  # labels that differ, a category outside the label map, a broken mask
        raise CommandFailure(f"COCO evaluation of {args.model} on {args.dataset}: {error}") from error
    print(result.to_markdown())
    print(f"\n{result.num_images} images; annotations: {source.issues.summary()}")
    sys.stdout.flush()
    write_json(args.output_json, result.to_dict())  # after the printed scores: a failed write loses nothing
    return 0
