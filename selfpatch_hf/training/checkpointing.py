"""Training checkpoints: `accelerator.save_state` written atomically, rotated, and resolved for resuming.

Layout under the run's output directory::

    checkpoints/
      checkpoint-1000/            a complete checkpoint (what `latest` may pick)
        model.safetensors         student, teacher and both centres (accelerate; main process)
        optimizer.bin             AdamW state (accelerate)
        random_states_{r}.pkl     torch / numpy / python RNG of every process (accelerate)
        scaler.pt                 fp16 GradScaler, when used (accelerate)
        trainer_state.json        step, schedules, global batch, arguments (main process)
        rank_state_{r}.json       each process's data-stream position and skip counts (every process)
        COMPLETE                  the manifest, written last, just before the rename: size and sha256 of every
                                  other file, and the training health at this step (`healthy`, see `divergence`)
      .tmp-checkpoint-1100/       being written; never picked, removed by the next save (or at once when it fails)

accelerate saves custom objects from the main process only and its stateful-dataloader file has no rank in its name,
so the per-rank stream positions are written here, one file per process.

Writing is atomic: every process writes into the hidden temporary folder, all processes meet at a barrier, the
main process writes `COMPLETE` and renames the folder into place (a rename is atomic on POSIX file systems). A run
killed mid-save leaves only the temporary folder, which `latest` ignores. Multi-node runs need `output_dir` on
storage that every node sees (as accelerate's `save_state` does for the model files).

A write that fails (a full disk, a quota, an I/O error) removes its temporary folder at once and raises
`CheckpointWriteError` naming the directory ("no space left on ..."); the complete checkpoints stay as they were.

Reading verifies the manifest first: a truncated or altered file (weights, optimiser, RNG or JSON state) is named
with what is wrong (`DamagedCheckpointError`). `resolve_checkpoint(..., "latest")` falls back to the newest intact
checkpoint and logs which one it skipped and why; an explicitly named damaged checkpoint is an error. Checkpoints
written before manifests existed (no `files` in `COMPLETE`) are read unverified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selfpatch_hf.atomic_folders import apply_default_permissions

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_NAME = "trainer_state.json"
RANK_STATE_PATTERN = "rank_state_{rank}.json"
_SHOWN_LINES = 8  # of a weight-mismatch report, which can name every parameter
_CHECKPOINT_NAME = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
_HASH_CHUNK = 1 << 22
# torch's zip writer reports a short write without errno ("[enforce fail at inline_container.cc] unexpected pos"),
# safetensors as "I/O error: No space left on device"
_WRITE_FAILURE_HINTS = (
    "unexpected pos",
    "file write failed",
    "PytorchStreamWriter failed",
    "No space left",
    "I/O error",
)
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL_BYTES = 64 << 20  # less free space than this when a write fails: call it a full disk


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; its partial folder is removed and the earlier checkpoints are untouched."""


class DamagedCheckpointError(ValueError):
    """A checkpoint's files do not match its manifest (truncated, altered, missing) or cannot be parsed."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(f"{path} is damaged: {'; '.join(problems)}")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a folder named `checkpoint-<step>`, else None."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and checkpoint_step(path) is not None and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `checkpoints_dir`, oldest (smallest step) first. Temporary and incomplete folders are
    left out."""
    directory = Path(checkpoints_dir)
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if is_complete_checkpoint(path)]
    return sorted(found, key=lambda path: checkpoint_step(path))


def resolve_checkpoint(checkpoints_dir: str | os.PathLike, which: str) -> Path | None:
    """`"latest"` -> the complete checkpoint with the highest step in `checkpoints_dir` (None when there is none);
    anything else is a path to a checkpoint folder, which must be complete."""
    if which == "latest":
        found = list_checkpoints(checkpoints_dir)
        for candidate in reversed(found):
            problems = verify_checkpoint(candidate)
            if not problems:
                return candidate
            logger.warning(
                "Skipping %s, it is damaged: %s. Falling back to the previous checkpoint.",
                candidate,
                "; ".join(problems),
            )
        if found:
            raise DamagedCheckpointError(
                found[-1],
                [
                    f"every checkpoint in {checkpoints_dir} is damaged (see the warnings above); start a new run"
                ],
            )
        return None
    path = Path(which).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"No checkpoint folder at {which!r}. Pass a `checkpoint-<step>` folder of a previous run's "
            f"`{CHECKPOINTS_DIRNAME}/` directory, or `latest`."
        )
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker): it was still being written when its "
            "run stopped, or it is not a checkpoint of this script. Resume from an earlier checkpoint or `latest`."
        )
    problems = verify_checkpoint(path)
    if problems:
        raise DamagedCheckpointError(path, [*problems, "resume from an earlier checkpoint or `latest`"])
    return path


def write_json_atomically(path: Path, payload: Any) -> None:
    """`payload` as JSON at `path`, written to a temporary file, synced and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())  # the manifest must not be renamed into place before its bytes are on disk
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """`{relative path: {"size": bytes, "sha256": hex}}` of every file under `folder` except the `COMPLETE` marker."""
    folder = Path(folder)
    manifest = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER and not path.name.endswith(".tmp"):
            manifest[path.relative_to(folder).as_posix()] = {
                "size": path.stat().st_size,
                "sha256": _sha256(path),
            }
    return manifest


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The `COMPLETE` manifest of a checkpoint folder; raises `DamagedCheckpointError` when it is not valid JSON."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        payload = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpointError(Path(path), [f"{COMPLETE_MARKER} cannot be read ({error})"]) from None
    if not isinstance(payload, dict):
        raise DamagedCheckpointError(Path(path), [f"{COMPLETE_MARKER} does not hold a JSON object"])
    return payload


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """What is wrong with a complete checkpoint's files compared with its manifest (empty: intact). Checkpoints
    written before manifests existed are only checked for readable JSON state."""
    path = Path(path)
    try:
        files = read_marker(path).get("files")
    except DamagedCheckpointError as error:
        return error.problems
    if files is None:  # an older checkpoint: at least the JSON state must parse
        problems = []
        for name in [
            TRAINER_STATE_NAME,
            *sorted(p.name for p in path.glob(RANK_STATE_PATTERN.format(rank="*"))),
        ]:
            try:
                json.loads((path / name).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                problems.append(f"{name} cannot be read ({error})")
        return problems
    return verify_files(path, files)


def verify_files(folder: str | os.PathLike, files: dict[str, dict[str, Any]]) -> list[str]:
    """What differs between the files under `folder` and their `file_manifest` (empty: all there and whole)."""
    folder = Path(folder)
    problems = []
    for name, expected in sorted(files.items()):
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif (size := file.stat().st_size) != expected["size"]:
            problems.append(
                f"{name} has {size} bytes, the manifest says {expected['size']} (truncated or altered)"
            )
        elif _sha256(file) != expected["sha256"]:
            problems.append(f"{name} does not match its sha256 checksum (altered or corrupted)")
    return problems


def is_healthy_checkpoint(path: str | os.PathLike) -> bool:
    """Whether training was healthy when the checkpoint was written (no divergence signs; see `divergence`).
    Checkpoints that record no health are taken as healthy."""
    try:
        return bool(read_marker(path).get("health", {}).get("healthy", True))
    except DamagedCheckpointError:
        return False


def last_healthy_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint that was written while training was healthy and whose files are intact."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        if is_healthy_checkpoint(path) and not verify_checkpoint(path):
            return path
    return None


def _remove_tree(path: Path) -> None:
    """Renames a folder to a hidden name before deleting it, so that a half-deleted checkpoint never keeps its name."""
    if not path.exists():
        return
    doomed = path.with_name(f"{TEMP_PREFIX}deleting-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class CheckpointManager:
    """Saves, rotates and loads checkpoints of one run, on every process of an `accelerate.Accelerator`.

    Args:
        accelerator: the run's accelerator (all its processes must call `save` / `load` together).
        output_dir: the run's output directory; checkpoints go to `output_dir/checkpoints/`.
        total_limit: keep at most this many complete checkpoints (oldest removed first); None keeps all.
    """

    def __init__(self, accelerator, output_dir: str | os.PathLike, total_limit: int | None = None):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1 (or unset), got {total_limit}.")
        self.accelerator = accelerator
        self.directory = Path(output_dir) / CHECKPOINTS_DIRNAME
        self.total_limit = total_limit

    # ------------------------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        before_rename: Callable[[Path], None] | None = None,
        health: dict[str, Any] | None = None,
    ) -> Path:
        """Writes `checkpoint-<step>` atomically and applies the rotation; returns its path.

        `trainer_state` (JSON) is written by the main process, `rank_state` (JSON) by every process. `health`
        (e.g. `DivergenceMonitor.health()`, with a boolean `healthy`) goes into the manifest.
        `before_rename(staging_dir)` runs on the main process after everything is written and before the rename
        (tests use it to simulate a crash at the worst moment).

        Raises `CheckpointWriteError` (on every process) when any process failed to write its files, after the
        partial folder has been removed.
        """
        accelerator = self.accelerator
        final = self.directory / checkpoint_name(step)
        staging = self.directory / f"{TEMP_PREFIX}{checkpoint_name(step)}"
        failure: BaseException | None = None
        if accelerator.is_main_process:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                for leftover in self.directory.glob(f"{TEMP_PREFIX}*"):  # earlier crashed saves
                    shutil.rmtree(leftover, ignore_errors=True)
                staging.mkdir()
            except OSError as error:
                failure = error
        self._raise_if_any_failed(failure, step, staging)

        try:
            accelerator.save_state(str(staging))
            write_json_atomically(
                staging / RANK_STATE_PATTERN.format(rank=accelerator.process_index), rank_state
            )
            if accelerator.is_main_process:
                write_json_atomically(staging / TRAINER_STATE_NAME, {**trainer_state, "step": step})
        except (OSError, RuntimeError) as error:  # torch's zip writer raises RuntimeError on a short write
            failure = error
        self._raise_if_any_failed(failure, step, staging)  # also the barrier: every process has written

        if accelerator.is_main_process:
            if before_rename is not None:
                before_rename(staging)
            # accelerate writes model.safetensors 0600: give the checkpoint the user's normal permissions
            apply_default_permissions(staging)
            marker = {
                "step": step,
                "num_processes": accelerator.num_processes,
                "files": file_manifest(staging),
                "health": health if health is not None else {"healthy": True},
            }
            try:
                write_json_atomically(staging / COMPLETE_MARKER, marker)
            except OSError as error:
                failure = error
        self._raise_if_any_failed(failure, step, staging)
        if accelerator.is_main_process:
            if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
                _remove_tree(final)
            os.replace(staging, final)
            logger.info("Saved checkpoint %s", final)
            self._rotate()
        accelerator.wait_for_everyone()
        return final

    def _raise_if_any_failed(self, failure: BaseException | None, step: int, staging: Path) -> None:
        """A barrier that also tells every process whether any of them failed to write (so that none waits forever
        for one that gave up); on failure the main process removes the partial folder and all raise."""
        accelerator = self.accelerator
        failed = failure is not None
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(failed)], device=accelerator.device)
            failed = accelerator.reduce(flag, reduction="sum").item() > 0
        if not failed:
            return
        # judge the free space before the partial files are deleted (which frees it again)
        disk_full = looks_like_full_disk(failure, self.directory)
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        previous = list_checkpoints(self.directory)
        kept = (
            f"the last complete checkpoint {previous[-1]} is untouched"
            if previous
            else "no earlier checkpoint"
        )
        if failure is None:
            reason = "another process failed to write its part"
        elif disk_full:
            reason = f"no space left on {self.directory}"
        else:
            reason = f"{type(failure).__name__}: {failure}"
        raise CheckpointWriteError(
            f"Writing checkpoint {checkpoint_name(step)} failed: {reason}. The partial checkpoint was removed; "
            f"{kept}. Free space (or point --output_dir elsewhere) and resume with --resume_from_checkpoint latest."
        ) from failure

    def _rotate(self) -> None:
        if self.total_limit is None:
            return
        checkpoints = list_checkpoints(self.directory)
        for old in checkpoints[: max(0, len(checkpoints) - self.total_limit)]:
            _remove_tree(old)
            logger.info("Removed old checkpoint %s (checkpoints_total_limit=%d)", old, self.total_limit)

    # ------------------------------------------------------------------------------------------------------- load
    def resolve(self, which: str) -> Path | None:
        return resolve_checkpoint(self.directory, which)

    def latest(self) -> Path | None:
        return resolve_checkpoint(self.directory, "latest")

    def last_healthy(self) -> Path | None:
        return last_healthy_checkpoint(self.directory)

    def load(self, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores model, optimiser, scaler and RNG states (`accelerator.load_state`) and returns
        `(trainer_state, this process's rank_state)`.

        Raises a ValueError when the checkpoint was written by a different number of processes (every process's
        data-stream position is its own) or for a model with other weights (names or shapes).
        """
        path = Path(path)
        accelerator = self.accelerator
        problems = verify_checkpoint(path)
        if problems:
            raise DamagedCheckpointError(path, problems)
        trainer_state = _read_json(path / TRAINER_STATE_NAME, path)
        saved_processes = trainer_state.get("num_processes")
        if saved_processes is not None and saved_processes != accelerator.num_processes:
            raise ValueError(
                f"{path} was written by {saved_processes} processes, this run has {accelerator.num_processes}. Each "
                "process's data-stream position is saved separately, so resume with the same number of processes "
                "(same global batch), or start a new run from the exported weights."
            )
        rank_file = path / RANK_STATE_PATTERN.format(rank=accelerator.process_index)
        if not rank_file.is_file():
            raise FileNotFoundError(f"{rank_file} is missing: the checkpoint {path} is incomplete.")
        rank_state = _read_json(rank_file, path)
        # accelerate skips an unreadable RNG state with an info line: the resume would silently not be exact
        rng_file = path / f"random_states_{accelerator.process_index}.pkl"
        if not rng_file.is_file():
            raise DamagedCheckpointError(
                path, [f"{rng_file.name} is missing (random states of this process)"]
            )
        try:
            accelerator.load_state(str(path))
        except RuntimeError as error:
            # torch's strict `load_state_dict` report: missing / unexpected keys and size mismatches, one per line
            if "Error(s) in loading state_dict" not in str(error):
                raise
            lines = str(error).splitlines()
            shown = "\n".join(lines[:_SHOWN_LINES])
            if len(lines) > _SHOWN_LINES:
                shown += f"\n\t... ({len(lines) - _SHOWN_LINES} more lines)"
            raise ValueError(
                f"{path} does not fit this model: it holds weights of another model configuration. Resume with the "
                f"model settings it was trained with ({TRAINER_STATE_NAME} records them).\n{shown}"
            ) from error
        return trainer_state, rank_state


def _read_json(file: Path, checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpointError(checkpoint, [f"{file.name} cannot be read ({error})"]) from None


def looks_like_full_disk(error: BaseException | None, directory: Path) -> bool:
    """ENOSPC / EDQUOT, or a serializer's short-write error while the device is (nearly) full: torch's zip writer
    reports a full disk only as "unexpected pos"."""
    if error is None:
        return False
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(error)
    if "No space left" in text or "Disk quota exceeded" in text:
        return True
    if any(hint in text for hint in _WRITE_FAILURE_HINTS):
        try:
            return shutil.disk_usage(directory).free < _NEARLY_FULL_BYTES
        except OSError:
            return False
    return False


__all__ = [
    "CHECKPOINTS_DIRNAME",
    "COMPLETE_MARKER",
    "CheckpointManager",
    "CheckpointWriteError",
    "DamagedCheckpointError",
    "checkpoint_name",
    "checkpoint_step",
    "file_manifest",
    "is_complete_checkpoint",
    "is_healthy_checkpoint",
    "last_healthy_checkpoint",
    "list_checkpoints",
    "looks_like_full_disk",
    "read_marker",
    "resolve_checkpoint",
    "verify_checkpoint",
    "verify_files",
    "write_json_atomically",
]
