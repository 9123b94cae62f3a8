"""`selfpatch export PRETRAINING_DIR OUTPUT_DIR`: a pretraining checkpoint's backbone as a plain `transformers`
folder (weights, image processor, model card), ready for `selfpatch-push`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from selfpatch_hf.cli.errors import CommandFailure, HelpFormatter, UsageError, run_command, write_failure

PROG = "selfpatch export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export the backbone of a saved SelfPatchForPretraining as a plain ViTModel / SwinModel folder "
        "(safetensors, image processor, model card) that AutoModel loads without this package and selfpatch-push "
        "publishes.",
        epilog="examples:\n"
        "  selfpatch export outputs/demo/pretraining_model outputs/demo/exported-student --source student\n"
        "  selfpatch export runs/vits16/pretraining_model runs/vits16/backbone --dataset ILSVRC/imagenet-1k",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "pretraining_dir", help="folder or Hub id of a SelfPatchForPretraining (save_pretrained)"
    )
    parser.add_argument("output_dir", help="where to write the backbone folder")
    parser.add_argument(
        "--source",
        choices=("teacher", "student"),
        default="teacher",
        help="network whose backbone is exported (the teacher is what the paper evaluates)",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="HUB_ID",
        help="Hub dataset the model was pretrained on, for the card's metadata (repeat for several)",
    )
    parser.add_argument(
        "--training-data",
        metavar="TEXT",
        help="the pretraining data in words, for the card when it is not a Hub dataset (e.g. local files)",
    )
    return parser


def _export(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if Path(args.output_dir).is_file():
        raise UsageError(f"output_dir {args.output_dir} is a file: give a folder (it is created if missing).")
    from selfpatch_hf.hub.cards.backbone import BackboneCardInfo, check_hub_dataset_ids

    try:
        check_hub_dataset_ids(args.dataset)  # before the model loads
    except ValueError as error:
        raise UsageError(
            f"--dataset: {error} (the option takes Hub ids; --training-data takes words)"
        ) from None

    from selfpatch_hf.export.backbone import export_backbone
    from selfpatch_hf.models.selfpatch.modeling import SelfPatchForPretraining

    config_file = Path(args.pretraining_dir) / "config.json"
    if config_file.is_file():  # a folder of another model would fail inside transformers with a traceback
        import json

        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if model_type != SelfPatchForPretraining.config_class.model_type:
            raise UsageError(
                f"{args.pretraining_dir} holds a {model_type!r} model, not a SelfPatchForPretraining "
                f"(model_type {SelfPatchForPretraining.config_class.model_type!r}): give the pretraining folder "
                "(e.g. runs/x/pretraining_model); an exported backbone is already what this command writes."
            )
    try:
        model = SelfPatchForPretraining.from_pretrained(args.pretraining_dir)
    except OSError as error:  # transformers' "is not a local folder and is not a valid model identifier" etc.
        raise CommandFailure(
            f"cannot load a SelfPatchForPretraining from {args.pretraining_dir}: {error}".splitlines()[0]
        ) from error
    card = BackboneCardInfo.from_selfpatch_config(
        model.config,
        exported_network=args.source,
        notes=f"Exported with `selfpatch export` from `{args.pretraining_dir}` (the {args.source}'s backbone). "
        "A pretraining folder does not record its training schedule, so the card leaves it out.",
        datasets=args.dataset,
        training_data=args.training_data,
    )
    try:
        path = export_backbone(model, args.output_dir, source=args.source, card_info=card)
    except ValueError as error:  # NaN / inf weights: refused before anything is written
        raise CommandFailure(f"{args.pretraining_dir}: {error}") from None
    except Exception as error:
        # a read-only or full disk: the export is staged, the previous one is untouched
        reason = write_failure(error, args.output_dir)
        if reason is None:
            raise
        kept = "the previous export is untouched" if Path(args.output_dir).exists() else "nothing was written"
        raise CommandFailure(
            f"writing the backbone to {args.output_dir} failed: {reason}; {kept}. Free space or fix the folder's "
            "permissions, then run the same command again."
        ) from None
    print(
        f"Exported the {args.source} backbone to {path} (with its model card; publish it with selfpatch-push)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, _export, argv)
