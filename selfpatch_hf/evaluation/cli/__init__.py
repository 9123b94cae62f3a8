"""`selfpatch eval COMMAND ...` (or `python -m selfpatch_hf.evaluation`): the command line of the evaluations.

Every command is one module of this package, registered in `COMMANDS` (name -> module, one-line help). A command
module defines:

- `DESCRIPTION` and `EXAMPLES` (the help's text);
- `add_arguments(parser)`: its options. The protocol's own settings come from its settings dataclass
  (`config_options.add_config_options(parser, TheConfig)`, the dataclass holding the only copy of each default);
  the shared ones from `common_options` (`--model`, `--dataset`, `--random-baseline`, `--threads`, `--quiet`, ...);
- `run(args) -> int`: the work, calling the library function with `config_options.config_from_args(TheConfig,
  args)`; it raises `UsageError` for a wrong argument and `CommandFailure` for a failed step
  (`selfpatch_hf.cli.errors`: one line, exit status 2 or 1).

A command module imports nothing heavy at module level (torch, transformers, datasets go inside `run`), and only
the module of the command being run is imported, so `--help` answers at once. Scores are printed, and written to
JSON, in percent.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap
from collections.abc import Sequence

from selfpatch_hf.cli.errors import HelpFormatter, run_command
from selfpatch_hf.evaluation.cli.common_options import check_output_paths

PROG = "selfpatch eval"
COMMANDS: dict[str, tuple[str, str]] = {
    "davis": ("selfpatch_hf.evaluation.cli.davis", "DAVIS 2017 label propagation and J&F"),
    "linear-probe": ("selfpatch_hf.evaluation.cli.linear_probe", "linear semantic segmentation probe"),
    "knn": ("selfpatch_hf.evaluation.cli.knn", "weighted k-NN classification"),
    "linear": ("selfpatch_hf.evaluation.cli.linear", "DINO's linear classification protocol (top-1 / top-5)"),
    "visualize": ("selfpatch_hf.evaluation.cli.visualize", "attention / positive-neighbour pictures (PNG)"),
    "make-offline-data": (
        "selfpatch_hf.evaluation.cli.offline_data",
        "build the offline evaluation data (synthetic scenes)",
    ),
    "coco": (
        "selfpatch_hf.evaluation.cli.coco",
        "COCO box / mask AP of a saved detector or instance segmenter",
    ),
}


def _parsers(command: str | None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Dense evaluation and visualisation of any ViT backbone that AutoModel loads "
        "(`selfpatch eval COMMAND --help` for each command). Scores are percentages.",
        epilog="Exit status: 2 for a wrong argument, 1 for a failed step (unreadable model, missing frames, "
        "mismatched masks),\neach with one line naming it.",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    selected = None
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            commands.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        selected = commands.add_parser(
            name,
            help=help_text,
            description=textwrap.fill(module.DESCRIPTION, 88),
            epilog=module.EXAMPLES,
            formatter_class=HelpFormatter,
        )
        module.add_arguments(selected)
        selected.set_defaults(run=module.run)
    return parser, selected


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `selfpatch eval`: every command listed, and the options of `command` (if given) filled in."""
    return _parsers(command)[0]


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command (`selfpatch eval COMMAND`), e.g. to read its help."""
    if command not in COMMANDS:
        raise ValueError(f"Unknown command {command!r}; known: {', '.join(COMMANDS)}.")
    return _parsers(command)[1]


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    check_output_paths(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, _main, argv)


__all__ = ["COMMANDS", "build_parser", "command_parser", "main"]
