"""The options every training script shares: the output folder, processes and precision, CPU threads, trackers,
checkpoints and resuming, and the Hub with its time limits. `selfpatch_hf.training.runtime` reads them.

Each script's training arguments subclass `RuntimeArguments` (a field declared again in a subclass keeps its place
and takes the new default or help), and call `validate_runtime_arguments` before their own checks. Importing this
module loads no torch, datasets or model code.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from selfpatch_hf.cli.errors import UsageError
from selfpatch_hf.training.arguments.recipe_files import (
    check_no_unresumed_run,
    check_trackers_installed,
    option,
)


@dataclass
class RuntimeArguments:
    output_dir: str | None = option(None, "Where metrics, checkpoints and the final model go (required).")
    overwrite_output_dir: bool = option(
        False,
        "Start afresh even if output_dir holds checkpoints of an earlier run (they are deleted; it overrides "
        "--resume_from_checkpoint latest).",
    )
    seed: int = option(0, "Seed of the initialisation, data order and augmentation.")
    per_device_train_batch_size: int = option(8, "Images per process per micro-batch.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimiser step.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        None, "Autocast precision (default: accelerate launch's setting). fp16 uses loss scaling."
    )
    cpu: bool = option(
        False,
        "Train on the CPU even if an accelerator is present (also what several CPU processes need: accelerate "
        "launch --multi_gpu --num_processes N ... --cpu).",
    )
    cpu_threads: int | None = option(
        None,
        "Torch threads per process on the CPU (default: the cores left after the data workers, at most "
        "OMP_NUM_THREADS).",
    )
    keep_freed_host_memory: bool = option(
        True,
        "On the CPU, keep freed memory in the process for the next step instead of page-faulting it in again "
        "(glibc only; ViT-S/16 SelfPatch steps 1.16-1.26x faster; the resident size stays at its peak).",
    )
    gradient_checkpointing: bool = option(
        False, "Recompute the backbone's activations in the backward pass (less memory, slower steps)."
    )
    logging_steps: int = option(10, "Log metrics every N optimiser steps.")
    report_to: Literal["none", "tensorboard", "wandb", "all"] = option(
        "none", "Trackers for the metrics (metrics.jsonl is always written)."
    )
    run_name: str = option("selfpatch", "Tracker project / run name.")
    checkpointing_steps: int = option(
        1000, "Write a checkpoint every N optimiser steps (0: only at the end)."
    )
    checkpoints_total_limit: int | None = option(2, "Keep at most this many checkpoints (oldest deleted).")
    resume_from_checkpoint: str | None = option(
        None,
        "`latest` (of output_dir; starts afresh when there is none) or a checkpoint-<step> folder to continue from.",
    )
    push_to_hub: bool = option(False, "Upload the model to the Hub, in the background.")
    hub_model_id: str | None = option(None, "Hub repository to push to (user/name).")
    hub_private: bool = option(False, "Create the Hub repository private.")
    hub_token: str | None = option(
        None, "Hub token for pushing and gated datasets (default: HF_TOKEN / login)."
    )
    hub_upload_attempts: int = option(3, "Attempts per upload before giving up.")
    hub_retry_delay: float = option(30.0, "Seconds before retrying a failed upload (doubled each time).")
    hub_request_timeout: float = option(
        60.0,
        "Seconds a Hub request (uploads, dataset reads) may go without any data before it fails (and is retried).",
    )
    hub_upload_timeout: float = option(
        900.0,
        "At the end, wait at most this many seconds for the uploads; what is not on the Hub by then is reported and "
        "kept under output_dir/.hub_uploads (exit status 3).",
    )

    def checkpoint_to_resume(self) -> str | None:
        """`resume_from_checkpoint`, or None when the run starts afresh: none given, or `latest` together with
        `overwrite_output_dir` (whose earlier checkpoints are deleted), e.g. a recipe that always resumes run with
        --overwrite_output_dir."""
        if self.overwrite_output_dir and self.resume_from_checkpoint == "latest":
            return None
        return self.resume_from_checkpoint or None

    def public_dict(self) -> dict[str, Any]:
        """The arguments without secrets (what checkpoints and trackers record)."""
        values = dataclasses.asdict(self)
        if values.get("hub_token"):
            values["hub_token"] = "***"
        return values


def validate_runtime_arguments(args: RuntimeArguments, *, hub_model_example: str) -> None:
    """The checks of the shared options that need nothing but the arguments: the output folder, batch and logging
    periods, threads, the Hub repository id and time limits, the trackers, resuming or overwriting."""
    output_dir = args.output_dir
    if not output_dir:
        raise UsageError("--output_dir is required (metrics, checkpoints and the final model go there).")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(
            f"--output_dir {output_dir} is a file, not a folder: pass a folder (new or of this run)."
        )
    at_least_one = {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "logging_steps": args.logging_steps,
        "hub_upload_attempts": args.hub_upload_attempts,
    }
    for name, value in at_least_one.items():
        if value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}.")
    if args.checkpointing_steps < 0:
        raise UsageError(
            f"--checkpointing_steps must be >= 0 (0: only at the end), got {args.checkpointing_steps}."
        )
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError(
            f"--checkpoints_total_limit must be >= 1 (or unset: keep all), got {args.checkpoints_total_limit}."
        )
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise UsageError(f"--cpu_threads must be >= 1 (or unset: automatic), got {args.cpu_threads}.")
    if args.push_to_hub and not args.hub_model_id:
        raise UsageError(f"--push_to_hub needs --hub_model_id (e.g. {hub_model_example}).")
    for name in ("hub_request_timeout", "hub_upload_timeout"):
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value)):  # also NaN
            raise UsageError(f"--{name} must be > 0 seconds, got {value}.")
    if not (args.hub_retry_delay >= 0 and math.isfinite(args.hub_retry_delay)):
        raise UsageError(f"--hub_retry_delay must be >= 0 seconds, got {args.hub_retry_delay}.")
    if args.hub_model_id is not None:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(args.hub_model_id)
        except HFValidationError as error:
            reason = str(error).replace(" Use `repo_type` argument if needed.", "")  # not an option of ours
            raise UsageError(
                f"--hub_model_id {args.hub_model_id!r} is not a valid Hub repository id ({reason}). Use "
                "`user-or-org/name`."
            ) from None
    check_trackers_installed(args.report_to)
    from selfpatch_hf.training.checkpointing import CHECKPOINTS_DIRNAME  # loads torch: not needed for --help

    checkpoints_dir = Path(output_dir) / CHECKPOINTS_DIRNAME
    resume = args.checkpoint_to_resume()
    if args.overwrite_output_dir and resume is not None:
        if Path(resume).resolve().is_relative_to(checkpoints_dir.resolve()):
            raise UsageError(
                f"--overwrite_output_dir deletes the checkpoints in {checkpoints_dir}, including "
                f"--resume_from_checkpoint {resume}: drop one of the two (or copy the checkpoint elsewhere first)."
            )
    check_no_unresumed_run(output_dir, resume, args.overwrite_output_dir)


__all__ = ["RuntimeArguments", "validate_runtime_arguments"]
