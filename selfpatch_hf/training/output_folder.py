"""A run's output folder: held by one run at a time, prepared, and its final artefacts written whole and recorded.

- **One run per folder.** `output_folder(accelerator, args, artefacts)` takes an exclusive `fcntl.flock` on
  `output_dir/.run.lock` in the main process for the run's lifetime. The kernel releases it when the process ends,
  however it ends, so a killed run never leaves the folder stuck; the file names its holder (pid, host, start), and
  a second run (fresh or resuming) is refused in one line naming it, before it touches anything. Every process of
  the run learns the outcome (the other processes of ONE run share the main process's hold).
- **Preparation.** The folder is created (one line if it cannot be: a read-only parent, a full disk); with
  `--overwrite_output_dir` an earlier run's checkpoints, final artefacts, completion record and metrics are removed
  (after the lock is held, never under another live run); staging folders that dead writers left are removed.
- **Final artefacts.** `write_final_folder` writes a final model folder staged (`atomic_folders.staged_folder`) and
  turns any failure (full disk, read-only folder, I/O error) into one line naming the folder, the earlier copy kept;
  `record_complete` then writes `run_complete.json`, the manifest (size and sha256 of every file) of every final
  folder, last and atomically. A run is complete only when that record is there and every artefact matches it
  (`completed_step`): a final model cut short by a full disk is written again by the next run of the same command.

Multi-node runs need `output_dir` on storage every node sees; `flock` on NFS needs NFSv4 locks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from selfpatch_hf.cli.errors import CommandFailure, UsageError
from selfpatch_hf.training.checkpointing import (
    CHECKPOINTS_DIRNAME,
    file_manifest,
    looks_like_full_disk,
    verify_files,
    write_json_atomically,
)
from selfpatch_hf.training.metrics_log import METRICS_FILENAME

logger = logging.getLogger(__name__)

LOCK_FILENAME = ".run.lock"
COMPLETION_RECORD = "run_complete.json"
# the files without which a transformers model folder is not one
_MODEL_FILES = ("config.json",)
_WEIGHT_SUFFIXES = (".safetensors",)


# ---------------------------------------------------------------------------------------------------- the lock
# The lock files' descriptors this process holds. A forked child (a DataLoader worker) would share the lock's open
# file description, and the lock lives until every sharer is gone: a run killed with SIGKILL would stay "in use"
# while its orphaned workers wind down. Children close their copies at once.
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class OutputFolderLock:
    """An exclusive, non-blocking `flock` on `folder/.run.lock`; `acquire` returns None when held, else a
    description of the run holding it."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILENAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> str | None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            return describe_holder(holder)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)
        return None

    def release(self) -> None:
        """Unlocks (the file stays: deleting it would let two runs lock two different files)."""
        if self._fd is not None:
            import fcntl

            _HELD_LOCK_FDS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def describe_holder(text: str) -> str:
    try:
        owner = json.loads(text)
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not named itself yet)"


def _agree(accelerator, failure: str | None) -> str | None:
    """The main process's `failure` (a message or None), known to every process."""
    if accelerator.num_processes == 1:
        return failure
    from accelerate.utils import broadcast_object_list

    message = [failure if accelerator.is_main_process else None]
    broadcast_object_list(message, from_process=0)
    return message[0]


def _cannot_write(output_dir: Path, error: OSError) -> str:
    reason = (
        "no space left on the device" if looks_like_full_disk(error, output_dir.parent) else error.strerror
    )
    return (
        f"cannot write to --output_dir {output_dir} ({reason or error}): pass a folder you can write to (or free "
        "space)."
    )


@contextlib.contextmanager
def output_folder(accelerator, args, artefacts: Sequence[str]) -> Iterator[Path]:
    """Holds `args.output_dir` for the block (see the module docstring) and prepares it; `artefacts` are the names
    of the run's final folders (removed with `--overwrite_output_dir`). Yields the folder."""
    output_dir = Path(args.output_dir)
    lock = OutputFolderLock(output_dir)
    failure = None
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            holder = lock.acquire()
        except OSError as error:
            failure = _cannot_write(output_dir, error)
        else:
            if holder is not None:
                failure = (
                    f"--output_dir {output_dir} is in use by another run ({holder}): wait for it to end, stop it, "
                    "or pass another --output_dir."
                )
    failure = _agree(accelerator, failure)
    if failure is not None:
        lock.release()
        raise UsageError(failure)
    try:
        if accelerator.is_main_process:
            prepare(output_dir, artefacts, overwrite=args.overwrite_output_dir)
        accelerator.wait_for_everyone()
        yield output_dir
    finally:
        lock.release()


def prepare(output_dir: Path, artefacts: Sequence[str], overwrite: bool) -> None:
    """With `overwrite`, removes what an earlier run left (checkpoints, final artefacts, the completion record,
    metrics); always removes staging folders of writers that died (the lock proves no run is writing here)."""
    from selfpatch_hf.atomic_folders import clean_leftovers

    if overwrite:
        for name in (CHECKPOINTS_DIRNAME, *artefacts):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        for name in (COMPLETION_RECORD, METRICS_FILENAME):
            (output_dir / name).unlink(missing_ok=True)
    for name in artefacts:
        clean_leftovers(output_dir / name)


# --------------------------------------------------------------------------------------------- final artefacts
def write_final_folder(target: Path, what: str, write: Callable[[], Any]) -> None:
    """Runs `write()`, which writes `target` staged (e.g. `export_backbone`, or `save_pretrained` inside
    `staged_folder`), and checks that `target` holds a model folder. Any failure ends the run in one line naming the
    folder; the earlier copy of `target`, if any, is intact."""
    try:
        write()
    except Exception as error:  # noqa: BLE001 -- every library's write error becomes the same one line
        full = looks_like_full_disk(error, target.parent)
        reason = (
            f"no space left on {target.parent}" if full else f"{type(error).__name__}: {_first_line(error)}"
        )
        kept = "the previous copy is untouched" if target.exists() else "nothing was left half-written"
        raise CommandFailure(
            f"Writing {what} to {target} failed: {reason}; {kept}. Free space (or fix the folder's permissions) "
            "and run the same command again with --resume_from_checkpoint latest: it writes the final model from "
            "the last checkpoint without training again."
        ) from None
    missing = [name for name in _MODEL_FILES if not (target / name).is_file()]
    if not any(path.suffix in _WEIGHT_SUFFIXES for path in target.glob("*")):
        missing.append("*.safetensors")
    if missing:
        raise CommandFailure(
            f"{what} in {target} lacks {', '.join(missing)} after writing it: a bug, please report it."
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def record_complete(output_dir: Path, step: int, artefacts: Sequence[str]) -> Path:
    """Writes the completion record: `step` and the manifest of each final folder, atomically and last."""
    record = {
        "step": step,
        "artefacts": {name: file_manifest(output_dir / name) for name in artefacts},
    }
    path = output_dir / COMPLETION_RECORD
    try:
        write_json_atomically(path, record)
    except OSError as error:
        with contextlib.suppress(OSError):
            path.with_name(path.name + ".tmp").unlink()
        raise CommandFailure(
            f"Writing {path} failed ({error.strerror or error}); the final artefacts are written. Free space and run "
            "the same command again with --resume_from_checkpoint latest (it only checks and records them)."
        ) from None
    return path


def completed_step(output_dir: Path, artefacts: Sequence[str]) -> int | None:
    """The step of the run's completion record when every artefact it lists is there and whole, else None (saying
    why when a record exists: the final artefacts are then written again)."""
    path = output_dir / COMPLETION_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        manifests = {name: record["artefacts"][name] for name in artefacts}
        step = int(record["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("Ignoring %s (%s): the final artefacts are written again.", path, error)
        return None
    problems = [
        f"{name}/{problem}"
        for name, files in manifests.items()
        for problem in verify_files(output_dir / name, files)
    ]
    if problems:
        logger.warning(
            "The final artefacts of %s are not whole (%s): they are written again.",
            output_dir,
            "; ".join(problems),
        )
        return None
    return step


__all__ = [
    "COMPLETION_RECORD",
    "LOCK_FILENAME",
    "OutputFolderLock",
    "completed_step",
    "output_folder",
    "prepare",
    "record_complete",
    "write_final_folder",
]
