"""`selfpatch eval linear-probe`: a linear semantic-segmentation probe on frozen patch features (mIoU, mAcc, aAcc)."""

from __future__ import annotations

import argparse

from selfpatch_hf.evaluation.cli.common_options import (
    add_backbone_options,
    add_dataset_options,
    add_random_baseline_option,
    add_runtime_options,
    apply_runtime_options,
    evaluate_backbones,
    finish_report,
    load_split_option,
    note,
    percent,
    show_progress,
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

    config = config_from_args(LinearProbeConfig, args)
    apply_runtime_options(args)
    train, evaluation = load_split_option(args, args.train_split), load_split_option(args, args.eval_split)

    def evaluate(name: str, backbone):  # masks that are no class-index maps, labels out of range: ValueError
        return run_linear_probe(
            backbone,
            train,
            evaluation,
            config,
            image_column=args.image_column,
            mask_column=args.mask_column,
            log=None if args.quiet else lambda message: note(f"[{name}] {message}"),
            show_progress=show_progress(args),
        )

    backbones, results = evaluate_backbones(args, "linear probe", evaluate)
    print("| Model | mIoU | mAcc | aAcc | classes | train | eval |\n|---|---|---|---|---|---|---|")
    for name, result in results.items():
        scores = result.scores
        print(
            f"| {name} | {percent(100 * scores.mean_iou)} | {percent(100 * scores.mean_accuracy)} | "
            f"{percent(100 * scores.overall_accuracy)} | {result.num_labels} | {result.num_train} | {result.num_eval} |"
        )
    return finish_report(args, "linear-probe", results, config, backbones)
