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
        COMPLETE                  written last, just before the rename
      .tmp-checkpoint-1100/       being written; never picked, removed by the next save

accelerate saves custom objects from the main process only and its stateful-dataloader file has no rank in its name,
so the per-rank stream positions are written here, one file per process.

Writing is atomic: every process writes into the hidden temporary folder, all processes meet at a barrier, the
main process writes `COMPLETE` and renames the folder into place (a rename is atomic on POSIX file systems). A run
killed mid-save leaves only the temporary folder, which `latest` ignores. Multi-node runs need `output_dir` on
storage that every node sees (as accelerate's `save_state` does for the model files).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_NAME = "trainer_state.json"
RANK_STATE_PATTERN = "rank_state_{rank}.json"
_SHOWN_LINES = 8  # of a weight-mismatch report, which can name every parameter
_CHECKPOINT_NAME = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


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
        return found[-1] if found else None
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
    return path


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


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
    ) -> Path:
        """Writes `checkpoint-<step>` atomically and applies the rotation; returns its path.

        `trainer_state` (JSON) is written by the main process, `rank_state` (JSON) by every process.
        `before_rename(staging_dir)` runs on the main process after everything is written and before the rename
        (tests use it to simulate a crash at the worst moment).
        """
        accelerator = self.accelerator
        final = self.directory / checkpoint_name(step)
        staging = self.directory / f"{TEMP_PREFIX}{checkpoint_name(step)}"
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(f"{TEMP_PREFIX}*"):  # earlier crashed saves
                shutil.rmtree(leftover, ignore_errors=True)
            staging.mkdir()
        accelerator.wait_for_everyone()

        accelerator.save_state(str(staging))
        _write_json(staging / RANK_STATE_PATTERN.format(rank=accelerator.process_index), rank_state)
        if accelerator.is_main_process:
            _write_json(staging / TRAINER_STATE_NAME, {**trainer_state, "step": step})
        accelerator.wait_for_everyone()

        if accelerator.is_main_process:
            if before_rename is not None:
                before_rename(staging)
            _write_json(staging / COMPLETE_MARKER, {"step": step, "num_processes": accelerator.num_processes})
            if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
                _remove_tree(final)
            os.replace(staging, final)
            self._rotate()
            logger.info("Saved checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

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

    def load(self, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores model, optimiser, scaler and RNG states (`accelerator.load_state`) and returns
        `(trainer_state, this process's rank_state)`.

        Raises a ValueError when the checkpoint was written by a different number of processes (every process's
        data-stream position is its own) or for a model with other weights (names or shapes).
        """
        path = Path(path)
        accelerator = self.accelerator
        trainer_state = json.loads((path / TRAINER_STATE_NAME).read_text())
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
        return trainer_state, json.loads(rank_file.read_text())


__all__ = [
    "CHECKPOINTS_DIRNAME",
    "COMPLETE_MARKER",
    "CheckpointManager",
    "checkpoint_name",
    "checkpoint_step",
    "is_complete_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
]
