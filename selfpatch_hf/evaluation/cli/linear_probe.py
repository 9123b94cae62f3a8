"""`selfpatch eval linear-probe`: a linear semantic-segmentation probe on frozen patch features (mIoU, mAcc, aAcc)."""

from __future__ import annotations

import argparse
import sys

from selfpatch_hf.cli.errors import CommandFailure
from selfpatch_hf.evaluation.cli.common_options import (
    add_backbone_options,
    add_dataset_options,
    add_random_baseline_option,
    add_runtime_options,
    apply_runtime_options,
    backbones_to_evaluate,
    load_split_option,
    note,
    percent,
    results_payload,
    show_progress,
    write_json,
)
from selfpatch_hf.evaluation.cli.config_options import add_config_options, config_from_args
from selfpatch_hf.evaluation.configs import LinearProbeConfig

DESCRIPTION = (
    "Train a linear classifier on frozen patch features to predict segmentation masks, and report mIoU, mAcc and "
    "aAcc in percent."
)
EXAMPLES = """examples:
  selfpatch eval linear-probe --model out/backbone --dataset scene_parse_150 --reduce-labels \\
      --epochs 20 --output-json results/ade20k.json
  selfpatch eval make-offline-data && selfpatch eval linear-probe --model out/backbone --random-baseline \\
      --dataset ~/.cache/selfpatch_hf/offline-eval/segmentation"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backbone_options(parser)
    add_random_baseline_option(parser)
    add_dataset_options(
        parser,
        train_help="split the probe is trained on",
        eval_help="split the probe is scored on",
        dataset_help="Hub id (e.g. scene_parse_150), local data folder or save_to_disk folder",
    )
    parser.add_argument("--image-column", help="column of the images (default: found by name)")
    parser.add_argument("--mask-column", help="column of the class-index masks (default: found by name)")
    parser.add_argument("--output-json", help="also write the scores (percent) to this JSON file")
    add_config_options(parser, LinearProbeConfig, title="linear probe")
    add_runtime_options(parser)


def run(args: argparse.Namespace) -> int:
    from selfpatch_hf.evaluation.linear_probe import run_linear_probe
    from selfpatch_hf.evaluation.offline_reference import reference_note

    config = config_from_args(LinearProbeConfig, args)
    apply_runtime_options(args)
    backbones = backbones_to_evaluate(args, [(args.model, args.model)])
    train, evaluation = load_split_option(args, args.train_split), load_split_option(args, args.eval_split)
    results = {}
    for name, backbone in backbones:
        try:
            results[name] = run_linear_probe(
                backbone,
                train,
                evaluation,
                config,
                image_column=args.image_column,
                mask_column=args.mask_column,
                log=None if args.quiet else lambda message, n=name: note(f"[{n}] {message}"),
                show_progress=show_progress(args),
            )
        except (
            ValueError
        ) as error:  # columns not found, masks that are no class-index maps, labels out of range
            raise CommandFailure(f"linear probe on {args.dataset}: {error}") from error
    print("| Model | mIoU | mAcc | aAcc | classes | train | eval |\n|---|---|---|---|---|---|---|")
    for name, result in results.items():
        scores = result.scores
        print(
            f"| {name} | {percent(100 * scores.mean_iou)} | {percent(100 * scores.mean_accuracy)} | "
            f"{percent(100 * scores.overall_accuracy)} | {result.num_labels} | {result.num_train} | {result.num_eval} |"
        )
    write_json(args.output_json, results_payload(results, args.model))
    reference = reference_note("linear-probe", args.dataset, config, backbones[0][1].model.config)
    if reference:
        sys.stdout.flush()
        note(reference)
    return 0
