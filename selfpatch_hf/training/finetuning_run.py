"""What every fine-tuning script (`training/finetune_segmentation.py`, `training/finetune_detection.py`) does around
its data loaders and its resume, beyond `selfpatch_hf.training.runtime`: single-threaded data workers, workers
started with the stop signals held, and the step a run continues from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from selfpatch_hf.cli.errors import CommandFailure, UsageError
from selfpatch_hf.training.arguments.common import RuntimeArguments
from selfpatch_hf.training.checkpointing import CheckpointManager, DamagedCheckpointError
from selfpatch_hf.training.preemption import stop_signals_held


def single_thread_worker(_: int) -> None:
    """`worker_init_fn`: workers decode and augment with numpy / PIL; torch threads would only contend."""
    torch.set_num_threads(1)


def started_with_workers(loader: torch.utils.data.DataLoader) -> Iterator:
    """The loader's iterator, its workers started with the stop signals held: a SIGTERM to the whole process group
    reaches this process (which checkpoints) and not the workers (selfpatch_hf.training.preemption)."""
    with stop_signals_held():
        return iter(loader)


def resume_step(
    checkpoints: CheckpointManager, training_args: RuntimeArguments, global_batch_size: int
) -> tuple[int, Path | None]:
    """The step to continue from (0: a fresh run) and the checkpoint it was loaded from; a checkpoint of another
    global batch is refused (the schedule and the data order are defined per step of it)."""
    which = training_args.checkpoint_to_resume()
    if not which:
        return 0, None
    try:
        path = checkpoints.resolve(which)
        loaded = checkpoints.load(path) if path is not None else None
    except DamagedCheckpointError as error:
        raise CommandFailure(f"Cannot resume: {error}") from None
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--resume_from_checkpoint: {error}") from None
    if loaded is None:
        return 0, None
    trainer_state, _ = loaded
    if trainer_state["global_batch_size"] != global_batch_size:
        raise UsageError(
            f"{path} was trained with a global batch of {trainer_state['global_batch_size']}, this run has "
            f"{global_batch_size}: resume with the same processes x per-device batch x accumulation."
        )
    return trainer_state["step"], path


__all__ = ["resume_step", "single_thread_worker", "started_with_workers"]
