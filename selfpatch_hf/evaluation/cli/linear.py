"""`selfpatch eval linear`: DINO's linear classification protocol on frozen image features (top-1 / top-5)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from selfpatch_hf.cli.errors import CommandFailure, UsageError
from selfpatch_hf.evaluation.cli.common_options import (
    add_backbone_options,
    add_dataset_options,
    add_random_baseline_option,
    add_runtime_options,
    apply_runtime_options,
    evaluate_backbones,
    load_split_option,
    note,
    percent,
    results_payload,
    show_progress,
    write_json,
)
from selfpatch_hf.evaluation.cli.config_options import add_config_options, config_from_args
from selfpatch_hf.evaluation.configs import LinearClassificationConfig

DESCRIPTION = (
    "Train a linear classifier on frozen image features with DINO's linear evaluation protocol (the CLS tokens of "
    "the last blocks after the final norm, SGD with momentum, cosine schedule, random resized crops and flips) and "
    "report top-1/top-5 accuracy in percent on the evaluation split. Several processes (accelerate launch / "
    "torchrun) share the backbone passes."
)
EXAMPLES = """examples:
  selfpatch eval linear --model out/backbone --dataset ILSVRC/imagenet-1k --checkpoint runs/linear.pt \\
      --save-classifier out/classifier --output-json results/linear.json
  selfpatch eval linear --model out/backbone --dataset data/scenes --no-augmentation --epochs 100 --random-baseline
  ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m selfpatch_hf.evaluation linear --model ... """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backbone_options(parser)
    add_random_baseline_option(parser)
    add_dataset_options(
        parser, train_help="split the classifier is trained on", eval_help="split that is scored"
    )
    parser.add_argument("--image-column", default="image", help="column of the images")
    parser.add_argument("--label-column", help="column of the integer labels (default: found by name)")
    parser.add_argument("--output-json", help="also write the scores (percent) to this JSON file")
    parser.add_argument(
        "--save-classifier",
        metavar="DIR",
        help="write the --model's classifier as a ViT/SwinForImageClassification folder with its image processor "
        "and a model card (ViT: the head on the last block's CLS, trained beside the protocol's head where the "
        "protocol's feature differs; its score is measured through the saved folder)",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="the --model's training state, written after every epoch; a run given an existing FILE resumes from "
        "it (same settings, data and backbone only)",
    )
    parser.add_argument(
        "--hub-request-timeout",
        type=float,
        default=60.0,
        help="seconds a Hub request may go without an answer before it fails (models, datasets)",
    )
    add_config_options(parser, LinearClassificationConfig, title="linear classification")
    add_runtime_options(parser)


def _check_output_folder(path: str) -> None:
    """Only a new folder, an empty one or a classifier folder written before is replaced."""
    target = Path(path).expanduser()
    if target.exists():
        if not target.is_dir():
            raise UsageError(
                f"--save-classifier {target} is a file: give a folder (it is created if missing)."
            )
        contents = {p.name for p in target.iterdir()}
        if contents and not {"config.json", "preprocessor_config.json"} <= contents:
            raise UsageError(
                f"--save-classifier {target} holds other files ({', '.join(sorted(contents)[:3])}): give a new folder "
                "or one this command wrote (it is replaced)."
            )


def _check_exportable(backbone) -> None:
    from selfpatch_hf.evaluation.linear_classification import EXPORTABLE_MODEL_TYPES

    model_type = backbone.model.config.model_type
    if model_type not in EXPORTABLE_MODEL_TYPES:
        raise UsageError(
            f"--save-classifier writes ViT and Swin classifiers; this backbone is {model_type!r}: leave it out."
        )
    if backbone.stage != backbone.num_stages:
        raise UsageError(
            "--save-classifier: SwinForImageClassification classifies the last stage; leave --stage unset."
        )


def _accelerator(args: argparse.Namespace):
    """An accelerator when launched as several processes (accelerate launch / torchrun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    from accelerate import Accelerator

    from selfpatch_hf.training.runtime import check_launch

    accelerator = Accelerator(cpu=args.device == "cpu")
    check_launch(accelerator, os.environ)
    args.device = str(accelerator.device)
    return accelerator


def _save(args, config, backbone, trained):
    """Writes --save-classifier (staged, moved into place when whole) and returns its measured scores."""
    from selfpatch_hf.atomic_folders import staged_folder
    from selfpatch_hf.data.sources import hub_dataset_id
    from selfpatch_hf.evaluation.classifier_export import save_classifier, score_classifier_folder
    from selfpatch_hf.evaluation.linear_classification import EXPORTABLE_FEATURE
    from selfpatch_hf.hub.cards.classification import ClassificationCardInfo, write_classification_card

    result = trained.result
    held = result.exportable if trained.spec.needs_exportable_head else result.protocol
    feature = EXPORTABLE_FEATURE if trained.spec.needs_exportable_head else trained.spec.describe()
    target = Path(args.save_classifier).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged_folder(target) as staging:
            model_class = save_classifier(staging, backbone, trained, config)
            scores = score_classifier_folder(
                staging, trained.evaluation, feature, config.batch_size, show_progress(args)
            )
            different = trained.spec.needs_exportable_head
            info = ClassificationCardInfo(
                backbone=args.model,
                model_class=model_class,
                feature=feature,
                dataset=args.dataset,
                eval_split=args.eval_split,
                num_labels=result.num_labels,
                num_train=result.num_train,
                num_eval=result.num_eval,
                top1=scores.top1,
                top5=scores.top5,
                epochs=config.epochs,
                batch_size=config.batch_size,
                learning_rate=config.scaled(held.learning_rate),
                lr_sweep=list(config.learning_rates) if config.lr_sweep else None,
                augmentation=config.augmentation,
                resize=config.resize,
                crop=config.crop,
                protocol_feature=result.protocol.feature if different else None,
                protocol_top1=result.protocol.top1 if different else None,
                protocol_top5=result.protocol.top5 if different else None,
                hub_dataset_id=hub_dataset_id(args.dataset),
            )
            write_classification_card(staging, info)
    except OSError as error:
        raise CommandFailure(f"cannot write the classifier to {target}: {error}") from error
    except ValueError as error:
        raise CommandFailure(f"--save-classifier: {error}") from error
    note(
        f"saved {model_class} ({feature}) to {target}: top-1 {percent(scores.top1)}, top-5 {percent(scores.top5)} "
        "through its own image processor (what pipeline('image-classification') gives; on its model card)"
    )
    return scores


def run(args: argparse.Namespace) -> int:
    from selfpatch_hf.evaluation.linear_classification import run_linear_classification
    from selfpatch_hf.hub.request_limits import DEFAULT_CONNECT_TIMEOUT, bound_hub_requests

    config = config_from_args(LinearClassificationConfig, args)
    apply_runtime_options(args)
    if not args.hub_request_timeout > 0:
        raise UsageError(
            f"--hub-request-timeout must be a positive number of seconds, got {args.hub_request_timeout}."
        )
    bound_hub_requests(min(DEFAULT_CONNECT_TIMEOUT, args.hub_request_timeout), args.hub_request_timeout)
    if args.save_classifier:
        _check_output_folder(args.save_classifier)
    if args.checkpoint and Path(args.checkpoint).is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint} is a folder: give a file path (it is created).")
    accelerator = _accelerator(args)
    main_process = accelerator is None or accelerator.is_main_process
    train, evaluation = load_split_option(args, args.train_split), load_split_option(args, args.eval_split)
    trained_main, saved = None, None

    def evaluate(name: str, backbone):
        nonlocal trained_main
        if name == args.model and args.save_classifier:
            _check_exportable(backbone)
        trained = run_linear_classification(
            backbone,
            train,
            evaluation,
            config,
            image_column=args.image_column,
            label_column=args.label_column,
            checkpoint=args.checkpoint if name == args.model else None,
            accelerator=accelerator,
            show_progress=show_progress(args),
            log=None if args.quiet or not main_process else lambda message: note(f"[{name}] {message}"),
        )
        if name == args.model:
            trained_main = (backbone, trained)
        return trained.result

    # a ValueError (columns, labels, a single class, a feature DINO cannot form, a foreign state) is one line
    _, results = evaluate_backbones(args, "linear classification", evaluate)
    if args.save_classifier and main_process:
        saved = _save(args, config, *trained_main)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not main_process:
        return 0
    print(
        "| Model | feature | top-1 | top-5 | classes | train | eval | skipped |\n|---|---|---|---|---|---|---|---|"
    )
    for name, result in results.items():
        rows = [(name, result.protocol)]
        if result.exportable is not None:
            rows.append((f"{name} (exportable)", result.exportable))
        for row_name, scores in rows:
            print(
                f"| {row_name} | {scores.feature} | {percent(scores.top1)} | {percent(scores.top5)} | "
                f"{result.num_labels} | {result.num_train} | {result.num_eval} | "
                f"{result.skipped_train + result.skipped_eval} |"
            )
    payload = results_payload(results, args.model)
    if saved is not None:
        payload["saved_classifier"] = {"path": args.save_classifier, **saved.to_dict()}
    write_json(args.output_json, payload)
    sys.stdout.flush()
    first = results[args.model]
    if accelerator is not None:
        note(f"{accelerator.num_processes} processes shared the backbone passes ({accelerator.device.type}).")
    if first.cached_features:
        note(
            "no training augmentation (--no-augmentation): each image's features were computed once and reused."
        )
    if first.skipped_train or first.skipped_eval:
        note(f"skipped unreadable images: {first.skipped_train} training, {first.skipped_eval} evaluation.")
    return 0
