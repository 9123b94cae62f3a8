"""One error contract for every command line of the project (`selfpatch ...`, `selfpatch-convert`,
`selfpatch-push`, `training/*.py`).

- Wrong arguments raise `UsageError`: exit status 2, one line `PROG: error: MESSAGE` that names the option and
  the fix (argparse's own `parser.error` gives the same form and status).
- Failures at run time raise `CommandFailure`: exit status 1, one line naming the file or step and the fix.
- Anything else is a bug of ours and keeps its traceback.

Command modules define `main(argv) -> int` that raises these; `run_command` turns them into exit statuses, so no
command needs a try/except per option. `HelpFormatter` is the help layout they share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence


class UsageError(Exception):
    """An argument or configuration the user gave is wrong; the message names it and says how to fix it."""

    exit_status = 2


class CommandFailure(Exception):
    """The command could not do its work (a file, a server, a step failed); the message names what and why."""

    exit_status = 1


def run_command(
    prog: str, main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
    """Run `main(argv)` and turn the project's errors into `PROG: error: ...` and an exit status."""
    try:
        return main(argv) or 0
    except (UsageError, CommandFailure) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_status


def write_failure(error: BaseException, folder: str | os.PathLike) -> str | None:
    """What went wrong, in a few words, when `error` is a failed write into `folder` (an `OSError`: full disk, quota,
    read-only, no permission, file too large; or a serializer's report of one: safetensors' `SafetensorError`,
    torch's "unexpected pos"), else None. Writers stage their folders, so the caller can add that nothing was
    damaged."""
    from selfpatch_hf.training.checkpointing import looks_like_full_disk  # torch: only when a write failed

    serializer = type(error).__name__ == "SafetensorError" or (
        isinstance(error, RuntimeError)
        and ("unexpected pos" in str(error) or "PytorchStreamWriter" in str(error))
    )
    if not isinstance(error, OSError) and not serializer:
        return None
    parent = os.path.dirname(os.path.abspath(folder)) or "."
    if looks_like_full_disk(error, parent):
        return f"no space left on {parent}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}{f' ({error.filename})' if error.filename else ''}"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs (examples stay readable) and appends `(default: X)` to
    an option's help only when there is a default worth showing and the help does not already state one. A flag
    (`store_true` / `store_false`, no value) shows none: `--no-verify ... (default: True)` reads as if the flag
    were on."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or action.nargs == 0  # a flag: its "default" is the opposite of what it does
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or action.option_strings == []
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"
