"""The `selfpatch` command: one entry point for the project's tools.

    selfpatch export PRETRAINING_DIR OUTPUT_DIR [--source teacher|student]
    selfpatch push ...       (= selfpatch-push: publish a backbone or checkpoint folder to the Hub)
    selfpatch convert ...    (= selfpatch-convert: reference SelfPatch / DINO checkpoints -> HF folders)
    selfpatch eval ...       (dense evaluation and visualisation of any ViT backbone)

Pretraining itself is `accelerate launch training/pretrain.py` (see README).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with a `main(argv)`, one-line help); imported only when used, so `--help` stays fast
DELEGATES: dict[str, tuple[str, str]] = {
    "push": ("selfpatch_hf.hub", "publish a backbone or pretraining folder to the Hugging Face Hub"),
    "convert": ("selfpatch_hf.convert", "convert reference SelfPatch / DINO .pth checkpoints"),
    "eval": (
        "selfpatch_hf.evaluation.cli",
        "dense evaluation (DAVIS propagation, linear probe, k-NN), visualisation",
    ),
}


def export_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="selfpatch export",
        description="Export the backbone of a saved SelfPatchViTForPretraining as a plain ViTModel folder "
        "(safetensors + image processor) that AutoModel loads without this package.",
    )
    parser.add_argument(
        "pretraining_dir", help="folder or Hub id of a SelfPatchViTForPretraining (save_pretrained)"
    )
    parser.add_argument("output_dir", help="where to write the backbone folder")
    parser.add_argument(
        "--source", choices=("teacher", "student"), default="teacher", help="default: teacher"
    )
    args = parser.parse_args(argv)

    from .export import export_backbone
    from .modeling_selfpatch import SelfPatchViTForPretraining

    model = SelfPatchViTForPretraining.from_pretrained(args.pretraining_dir)
    path = export_backbone(model, args.output_dir, source=args.source)
    print(f"Exported the {args.source} backbone to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"export": "export a pretraining checkpoint's backbone as a plain ViTModel folder"}
    commands.update({name: help_text for name, (_, help_text) in DELEGATES.items()})
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        lines = "\n".join(f"  {name:<8} {text}" for name, text in commands.items())
        print(
            f"usage: selfpatch COMMAND [ARGS]\n\ncommands:\n{lines}\n\nRun `selfpatch COMMAND --help` for details."
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nselfpatch: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    if name == "export":
        return export_main(rest)
    module = importlib.import_module(DELEGATES[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
