"""`selfpatch eval knn`: weighted k-NN classification on the image representation (DINO's k-NN protocol)."""

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
    percent,
    show_progress,
)
from selfpatch_hf.evaluation.cli.config_options import add_config_options, config_from_args
from selfpatch_hf.evaluation.configs import KnnConfig

DESCRIPTION = (
    "Classify each evaluation image by a similarity-weighted vote of its k nearest training images (DINO's k-NN "
    "protocol) and report top-1/top-5 accuracy in percent."
)
EXAMPLES = """examples:
  selfpatch eval knn --model out/backbone --dataset data/imagenette --label-column label --k 20"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backbone_options(parser)
    add_random_baseline_option(parser)
    add_dataset_options(parser, train_help="split of the neighbours", eval_help="split that is classified")
    parser.add_argument("--image-column", default="image", help="column of the images")
    parser.add_argument("--label-column", help="column of the integer labels (default: found by name)")
    parser.add_argument("--output-json", help="also write the scores (percent) to this JSON file")
    add_config_options(parser, KnnConfig, title="k-NN")
    add_runtime_options(parser)


def run(args: argparse.Namespace) -> int:
    from selfpatch_hf.evaluation.knn import run_knn

    config = config_from_args(KnnConfig, args)
    apply_runtime_options(args)
    train, evaluation = load_split_option(args, args.train_split), load_split_option(args, args.eval_split)

    def evaluate(name: str, backbone):
        return run_knn(
            backbone,
            train,
            evaluation,
            config,
            image_column=args.image_column,
            label_column=args.label_column,
            show_progress=show_progress(args),
        )

    backbones, results = evaluate_backbones(args, "k-NN", evaluate)
    print("| Model | k | top-1 | top-5 | train | eval |\n|---|---|---|---|---|---|")
    for name, result in results.items():
        print(
            f"| {name} | {config.k} | {percent(result.top1)} | {percent(result.top5)} | {result.num_train} | "
            f"{result.num_eval} |"
        )
    return finish_report(args, "knn", results, config, backbones)
