"""The `selfpatch` command: one entry point for the project's tools.

    selfpatch export PRETRAINING_DIR OUTPUT_DIR [--source teacher|student]
    selfpatch push ...       (= selfpatch-push: publish a backbone or checkpoint folder to the Hub)
    selfpatch convert ...    (= selfpatch-convert: reference SelfPatch / DINO / MoBY checkpoints -> HF folders)
    selfpatch eval ...       (dense evaluation and visualisation of any ViT backbone)

Pretraining itself is `accelerate launch training/pretrain.py` (see docs/pretraining.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from selfpatch_hf.cli.errors import CommandFailure, HelpFormatter, UsageError, run_command

# subcommand -> (module with a `main(argv)`, one-line help); imported only when used, so `--help` stays fast
DELEGATES: dict[str, tuple[str, str]] = {
    "push": (
        "selfpatch_hf.hub.publishing",
        "publish a backbone or pretraining folder to the Hugging Face Hub",
    ),
    "convert": (
        "selfpatch_hf.conversion.dino_selfpatch",
        "convert reference SelfPatch / DINO / MoBY .pth checkpoints",
    ),
    "eval": (
        "selfpatch_hf.evaluation.cli",
        "dense evaluation (DAVIS propagation, linear probe, k-NN), visualisation",
    ),
}


def _export(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="selfpatch export",
        description="Export the backbone of a saved SelfPatchViTForPretraining as a plain ViTModel folder "
        "(safetensors + image processor) that AutoModel loads without this package.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "pretraining_dir", help="folder or Hub id of a SelfPatchViTForPretraining (save_pretrained)"
    )
    parser.add_argument("output_dir", help="where to write the backbone folder")
    parser.add_argument(
        "--source",
        choices=("teacher", "student"),
        default="teacher",
        help="network whose backbone is exported (the teacher is what the paper evaluates)",
    )
    args = parser.parse_args(argv)
    if Path(args.output_dir).is_file():
        raise UsageError(f"output_dir {args.output_dir} is a file: give a folder (it is created if missing).")

    from selfpatch_hf.export.backbone import export_backbone
    from selfpatch_hf.models.selfpatch.modeling import SelfPatchViTForPretraining

    try:
        model = SelfPatchViTForPretraining.from_pretrained(args.pretraining_dir)
    except OSError as error:  # transformers' "is not a local folder and is not a valid model identifier" etc.
        raise CommandFailure(
            f"cannot load a SelfPatchViTForPretraining from {args.pretraining_dir}: {error}".splitlines()[0]
        ) from error
    path = export_backbone(model, args.output_dir, source=args.source)
    print(f"Exported the {args.source} backbone to {path}")
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    return run_command("selfpatch export", _export, argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"export": "export a pretraining checkpoint's backbone as a plain ViTModel folder"}
    commands.update({name: help_text for name, (_, help_text) in DELEGATES.items()})
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        lines = "\n".join(f"  {name:<8} {text}" for name, text in commands.items())
        usage = f"usage: selfpatch COMMAND [ARGS]\n\ncommands:\n{lines}\n\nRun `selfpatch COMMAND --help` for details."
        if argv and argv[0] not in ("-h", "--help"):
            print(usage, file=sys.stderr)
            print(
                f"selfpatch: error: unknown command {argv[0]!r}; choose one of {', '.join(commands)}.",
                file=sys.stderr,
            )
            return 2
        print(usage)
        return 0
    name, rest = argv[0], argv[1:]
    if name == "export":
        return export_main(rest)
    module = importlib.import_module(DELEGATES[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
