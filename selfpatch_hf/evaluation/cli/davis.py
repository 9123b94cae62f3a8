"""`selfpatch eval davis`: label propagation on DAVIS 2017 (or any folder in its layout) and J&F scoring."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selfpatch_hf.cli.errors import CommandFailure, UsageError
from selfpatch_hf.evaluation.cli.common_options import (
    add_backbone_options,
    add_random_baseline_option,
    add_runtime_options,
    apply_runtime_options,
    backbones_to_evaluate,
    note,
    percent,
    show_progress,
    write_json,
)
from selfpatch_hf.evaluation.cli.config_options import add_config_options, config_from_args
from selfpatch_hf.evaluation.configs import DavisConfig, PropagationConfig

DESCRIPTION = (
    "Propagate each sequence's first-frame mask with the backbone's patch features (the DINO/SelfPatch protocol) "
    "and score the predictions with J&F (DAVIS semi-supervised mode). Scores are percentages."
)
EXAMPLES = """examples:
  selfpatch eval davis --model dino=facebook/dino-vits16 --model selfpatch=out/backbone \\
      --davis-root data/DAVIS --output-dir results/davis
  selfpatch eval davis --davis-root data/DAVIS --output-dir results/davis/selfpatch --evaluate-only
  selfpatch eval make-offline-data && selfpatch eval davis --model out/backbone --random-baseline \\
      --davis-root ~/.cache/selfpatch_hf/offline-eval/davis --output-dir results/offline-davis"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backbone_options(parser, multiple=True)
    add_random_baseline_option(parser)
    parser.add_argument(
        "--davis-root", required=True, help="folder with JPEGImages/, Annotations/, ImageSets/"
    )
    parser.add_argument(
        "--output-dir",
        required=True,
        help="predictions go to OUTPUT/<sequence>/*.png (OUTPUT/<model>/... for several models), scores to "
        "scores.json beside them",
    )
    parser.add_argument("--sequences", help="comma-separated subset of the split (default: the whole split)")
    parser.add_argument(
        "--evaluate-only", action="store_true", help="score the existing masks in --output-dir (no --model)"
    )
    add_config_options(parser, DavisConfig, title="DAVIS layout and scoring")
    add_config_options(parser, PropagationConfig, title="label propagation")
    add_runtime_options(parser)


def run(args: argparse.Namespace) -> int:
    from selfpatch_hf.evaluation.davis import DavisDataError, evaluate_davis, predict_davis
    from selfpatch_hf.evaluation.offline_reference import reference_note

    if not Path(args.davis_root).is_dir():
        raise UsageError(
            f"--davis-root {args.davis_root} is not a folder; give the DAVIS folder (with JPEGImages/, "
            "Annotations/ and ImageSets/)."
        )
    davis = config_from_args(DavisConfig, args)
    config = config_from_args(PropagationConfig, args)
    sequences = [s for s in args.sequences.split(",") if s] if args.sequences else None
    layout = {
        "split": davis.split,
        "year": davis.year,
        "resolution": davis.resolution,
        "sequences": sequences,
    }
    output_dir = Path(args.output_dir)
    apply_runtime_options(args)
    # (name, folder of its predictions, backbone or None to score existing predictions)
    runs: list[tuple[str, Path, object]] = []
    if args.evaluate_only:
        if args.model or args.random_baseline:
            raise UsageError(
                "--evaluate-only scores existing predictions: drop --model and --random-baseline."
            )
        if not output_dir.is_dir():
            raise UsageError(
                f"--evaluate-only: --output-dir {output_dir} holds no predictions (no such folder)."
            )
        runs.append((output_dir.name, output_dir, None))
    else:
        if not args.model:
            raise UsageError(
                "give --model (or --evaluate-only to score existing predictions in --output-dir)."
            )
        models = backbones_to_evaluate(args, args.model)
        runs = [(name, output_dir / name if len(models) > 1 else output_dir, model) for name, model in models]
    # a line per finished sequence where no progress bar shows (logs, pipes), none with --quiet
    lines = not args.quiet and not sys.stderr.isatty()
    rows = []
    try:
        for name, target, model in runs:
            if model is not None:
                predict_davis(
                    args.davis_root,
                    model,
                    target,
                    config,
                    progress=(lambda seq, n=name: note(f"[{n}] {seq} done")) if lines else None,
                    show_progress=show_progress(args),
                    **layout,
                )
            result = evaluate_davis(args.davis_root, target, bound_th=davis.bound_th, **layout)
            write_json(str(target / "scores.json"), result.to_dict())
            rows.append((name, result))
            print(f"## {name}\n\n{result.to_markdown()}\n")
    except (FileNotFoundError, DavisDataError) as error:
        raise CommandFailure(str(error)) from error
    if len(rows) > 1:
        print("| Model | J&F | J | F |\n|---|---|---|---|")
        for name, result in rows:
            print(
                f"| {name} | {percent(100 * result.jf_mean)} | {percent(100 * result.j_mean)} | "
                f"{percent(100 * result.f_mean)} |"
            )
    first_model = runs[0][2]
    model_config = first_model.model.config if first_model is not None else None
    reference = reference_note("davis", args.davis_root, config, model_config)
    if reference:
        sys.stdout.flush()
        note(reference)
    return 0
