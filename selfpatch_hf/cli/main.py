"""The `selfpatch` command: one entry point for the project's tools, each in the module of what it works on.

    selfpatch export PRETRAINING_DIR OUTPUT_DIR   (selfpatch_hf.export.cli: a pretraining checkpoint's backbone)
    selfpatch push FOLDER REPO_ID                 (= selfpatch-push, selfpatch_hf.hub.cli)
    selfpatch convert CHECKPOINT OUTPUT_DIR       (= selfpatch-convert, selfpatch_hf.conversion.cli)
    selfpatch eval COMMAND ...                    (selfpatch_hf.evaluation.cli: dense evaluation, figures)

Pretraining itself is `accelerate launch training/pretrain.py` (see docs/pretraining.md).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module with a `main(argv)`, one-line help); imported only when used, so `--help` stays fast
COMMANDS: dict[str, tuple[str, str]] = {
    "export": (
        "selfpatch_hf.export.cli",
        "export a pretraining checkpoint's backbone as a plain ViTModel / SwinModel folder with its card",
    ),
    "push": (
        "selfpatch_hf.hub.cli",
        "publish a backbone (and a pretraining checkpoint) to the Hugging Face Hub",
    ),
    "convert": ("selfpatch_hf.conversion.cli", "convert reference SelfPatch / DINO / MoBY .pth checkpoints"),
    "eval": (
        "selfpatch_hf.evaluation.cli",
        "dense evaluation (DAVIS propagation, linear probe, k-NN), visualisation",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items())
        usage = f"usage: selfpatch COMMAND [ARGS]\n\ncommands:\n{lines}\n\nRun `selfpatch COMMAND --help` for details."
        if argv and argv[0] not in ("-h", "--help"):
            print(usage, file=sys.stderr)
            print(
                f"selfpatch: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}.",
                file=sys.stderr,
            )
            return 2
        print(usage)
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
