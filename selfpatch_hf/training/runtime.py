"""What every training script does around its loop: the accelerator and its launch checks, logging, the host's
threads / memory / precision, CUDA defaults, Hub request limits and the final upload wait with its deadline,
activation checkpointing, trackers, checkpoints that fail in one line, and the exit statuses.

`training/pretrain.py` and `training/finetune_segmentation.py` call these in this order (a new script does too):

    limit_hub_requests(args)                              # before anything talks to the Hub
    accelerator = create_accelerator(args, ddp_kwargs)    # + launch checks, logging, TF32 on CUDA
    configure_host(accelerator, args, num_workers)        # CPU threads, freed host memory, precision warnings
    with output_folder(accelerator, args, artefacts):     # selfpatch_hf.training.output_folder: held, prepared
        init_trackers(accelerator, args, hyperparameters)
        uploader = start_uploader(args, accelerator)
        ... the loop: save_checkpoint(...) ...
        report = wait_for_uploads(uploader, args, stopped_by, metrics_log, what)
    return exit_status(prog, stopped_by, uploads_complete, what)

Exit statuses (docs/reliability.md): 0 done, 1 failed (`CommandFailure`), 2 wrong arguments (`UsageError`), 3 trained
to the end but the final upload is not on the Hub, 128 + signal number when stopped by SIGTERM / SIGINT after a
checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from selfpatch_hf.cli.errors import CommandFailure, UsageError
from selfpatch_hf.training.arguments.common import RuntimeArguments
from selfpatch_hf.training.checkpointing import CheckpointManager, CheckpointWriteError
from selfpatch_hf.training.cuda_setup import enable_tf32
from selfpatch_hf.training.host_memory import keep_freed_host_memory
from selfpatch_hf.training.metrics_log import MetricsLog
from selfpatch_hf.training.output_folder import output_folder

logger = logging.getLogger(__name__)

EXIT_DONE = 0
EXIT_FAILED = CommandFailure.exit_status  # 1
EXIT_USAGE = UsageError.exit_status  # 2
EXIT_UPLOADS_INCOMPLETE = 3
UPLOADS_DIRNAME = ".hub_uploads"  # snapshots of the uploads under output_dir (kept when they fail)
# the libraries' per-call chatter (accelerate logs every file of a checkpoint, datasets every pass): warnings only
QUIET_LOGGERS = ("accelerate", "selfpatch_hf.data.streaming")
WORKING_LAUNCHES = (
    "accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no "
    "SCRIPT ... --cpu, or ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node N SCRIPT ..."
)


def exit_status_of_signal(name: str | None) -> int:
    """128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process it ended."""
    number = getattr(signal, name, signal.SIGTERM) if name and name.startswith("SIG") else signal.SIGTERM
    return 128 + int(number)


def exit_status(prog: str, stopped_by: str | None, uploads_complete: bool, what: str) -> int:
    """The script's exit status; with a final upload missing, one line saying that `what` (e.g. "the final
    backbone") is kept locally and how to push it."""
    if stopped_by is not None:
        return exit_status_of_signal(stopped_by)
    if not uploads_complete:
        print(
            f"{prog}: training finished, but {what} did not reach the Hub; the snapshots that are not on the Hub "
            "are kept (see the upload report above): push them with the `hf upload` command given there instead of "
            "training again.",
            file=sys.stderr,
        )
        return EXIT_UPLOADS_INCOMPLETE
    return EXIT_DONE


# ---------------------------------------------------------------------------------------------------- the Hub
def limit_hub_requests(args: RuntimeArguments) -> None:
    """huggingface_hub gives uploads (and some dataset calls) no timeout: a silent server would hold them, and the
    final wait for the uploads, forever. Every request gets a connect and a read timeout."""
    from selfpatch_hf.hub.request_limits import DEFAULT_CONNECT_TIMEOUT, bound_hub_requests

    bound_hub_requests(min(DEFAULT_CONNECT_TIMEOUT, args.hub_request_timeout), args.hub_request_timeout)


def start_uploader(args: RuntimeArguments, accelerator):
    """With --push_to_hub, the main process's background uploader (retries included; `AsyncHubUploader`)."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return None
    from selfpatch_hf.hub.uploads import AsyncHubUploader

    return AsyncHubUploader(
        args.hub_model_id,
        Path(args.output_dir) / UPLOADS_DIRNAME,
        token=args.hub_token,
        private=args.hub_private,
        max_attempts=args.hub_upload_attempts,
        retry_delay=args.hub_retry_delay,
    )


def record_uploads(uploader, metrics_log: MetricsLog) -> None:
    """Finished uploads to metrics.jsonl (never blocks)."""
    if uploader is not None:
        for outcome in uploader.poll():
            metrics_log.event("upload", outcome.step, status=outcome.status, url=outcome.commit_url)


def wait_for_uploads(
    uploader, args: RuntimeArguments, stopped_by: str | None, metrics_log: MetricsLog
) -> list[str]:
    """Waits for the pending Hub uploads at most --hub_upload_timeout, saying what it waits for (SIGTERM / Ctrl-C
    end the wait with the same report), and reports them. A pre-empted run does not wait: the grace period before
    SIGKILL is short."""
    if uploader is None:
        return []
    if uploader.pending and not stopped_by:
        steps = [str(outcome.step) for outcome in uploader.outcomes if outcome.status == "pending"]
        logger.info(
            "Waiting for the pending Hub upload(s): step %s to %s at %s, at most %g s (--hub_upload_timeout; a "
            "request that gets no answer for %g s fails, --hub_request_timeout)...",
            ", ".join(steps),
            args.hub_model_id,
            uploader.api.endpoint,
            args.hub_upload_timeout,
            args.hub_request_timeout,
        )
    if stopped_by:
        uploader.finish(0, why_not_waiting=f"not waited for: the run was stopped by {stopped_by}")
    else:
        uploader.finish(args.hub_upload_timeout)
    report = uploader.report()
    for outcome in uploader.outcomes:
        metrics_log.event("upload", outcome.step, status=outcome.status, url=outcome.commit_url)
    for line in report:
        logger.info("Hub upload %s", line)
    return report


# ------------------------------------------------------------------------------------------------ accelerator
def create_accelerator(args: RuntimeArguments, ddp_kwargs: Mapping[str, Any]):
    """The accelerator (device, processes, mixed precision, accumulation, trackers), checked against how the script
    was launched, and the logging set-up; TF32 for what runs in fp32 on CUDA."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(**ddp_kwargs)],
    )
    check_launch(accelerator, os.environ)
    enable_tf32(accelerator.device)  # CUDA only
    setup_logging(accelerator)
    return accelerator


def check_launch(accelerator, environ: Mapping[str, str]) -> None:
    """Refuses, in one line naming a launch that works, the launches that would not give the processes asked for:

    - `accelerate launch --multi_gpu --num_processes N` (or torchrun) without a GPU and without the script's
      `--cpu`: the launcher starts N processes that each train alone, as rank 0, and race on the output folder;
    - `accelerate launch --cpu --num_processes N`: accelerate starts ONE process (its simple launcher only sets
      the rendezvous address), which would silently train alone.
    """
    from accelerate.utils import DistributedType

    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes != launched:
        raise UsageError(
            f"launched as {launched} processes (WORLD_SIZE={launched}) but accelerate set up "
            f"{accelerator.num_processes} on {accelerator.device.type}: without a GPU, pass --cpu to the script "
            f"(DDP over gloo), i.e. {WORKING_LAUNCHES}."
        )
    simple_launcher = (
        "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ
    )
    mpi = any(name in environ for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    if simple_launcher and not mpi and accelerator.num_processes == 1:
        raise UsageError(
            "accelerate launch --cpu --num_processes N starts ONE process (its simple launcher runs several CPU "
            f"processes only through MPI): run {WORKING_LAUNCHES}."
        )
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise UsageError(f"Several processes but no distributed set-up: run {WORKING_LAUNCHES}.")


def setup_logging(accelerator) -> None:
    """Our progress on the main process, warnings elsewhere; the libraries' own chatter kept to warnings."""
    import datasets
    import transformers

    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=level,
    )
    logging.getLogger("selfpatch_hf").setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    logger.info("%s", str(accelerator.state).strip())


# ------------------------------------------------------------------------------------------------------- host
def set_cpu_threads(num_processes: int, num_workers: int, requested: int | None) -> None:
    """Torch threads per process on the CPU: `requested`, or the cores left to each process after its data
    workers. Oversubscribed cores make torch's threads wait for each other at every parallel region, which costs
    far more than the threads gain (5-25x slower steps on 2 cores)."""
    if requested is not None:
        torch.set_num_threads(requested)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    threads = max(1, min(torch.get_num_threads(), cores // max(1, local_processes) - num_workers))
    if threads < torch.get_num_threads():
        asked = os.environ.get("OMP_NUM_THREADS")
        logger.info(
            "Using %d torch thread(s) per process instead of %s: %d core(s) for %d process(es) with %d data "
            "worker(s) each. Set --cpu_threads to choose.",
            threads,
            f"OMP_NUM_THREADS={asked} (accelerate launch: --num_cpu_threads_per_process)"
            if asked
            else "all cores",
            cores,
            local_processes,
            num_workers,
        )
        torch.set_num_threads(threads)


def configure_host(accelerator, args: RuntimeArguments, num_workers: int) -> None:
    """Torch threads, host-memory reuse and precision warnings for training on the CPU (nothing on accelerators)."""
    if accelerator.device.type != "cpu":
        return
    set_cpu_threads(accelerator.num_processes, num_workers, args.cpu_threads)
    if args.keep_freed_host_memory and keep_freed_host_memory():
        logger.info("Freed host memory is kept for reuse (glibc mallopt).")
    if accelerator.mixed_precision == "fp16":
        logger.warning("--mixed_precision fp16 has no effect on the CPU (accelerate runs fp32 there).")
    elif accelerator.mixed_precision == "bf16":
        logger.warning(
            "bf16 on a CPU without bf16 units is far slower than fp32; consider --mixed_precision no."
        )


# ------------------------------------------------------------------------------------------------------ model
def enable_activation_checkpointing(backbone: torch.nn.Module) -> None:
    """Recompute the backbone's activations in the backward pass. Older transformers 5 releases (e.g. 5.17) have
    only the older method name; both checkpoint non-reentrantly."""
    enable = getattr(backbone, "activation_checkpointing_enable", None)
    (enable or backbone.gradient_checkpointing_enable)()


# ----------------------------------------------------------------------------------------------- bookkeeping
def tracker_values(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """Trackers take numbers, strings and booleans: anything else (lists, None) as its text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hyperparameters.items()}


def init_trackers(accelerator, args: RuntimeArguments, hyperparameters: Mapping[str, Any]) -> None:
    """The hyperparameters to the trackers of --report_to (main process)."""
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.run_name, config=tracker_values(hyperparameters))


def save_checkpoint(
    checkpoints: CheckpointManager,
    metrics_log: MetricsLog,
    step: int,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    health: dict[str, Any] | None = None,
) -> Path:
    """A checkpoint of `step` (`CheckpointManager.save`, every process). A failed write (a full disk, a read-only
    folder) ends the run in one line naming the folder; the earlier checkpoints are untouched."""
    try:
        path = checkpoints.save(step, trainer_state, rank_state, health=health)
    except CheckpointWriteError as error:  # the partial checkpoint is gone
        metrics_log.event("checkpoint_failed", step, error=str(error))
        raise CommandFailure(str(error)) from None
    metrics_log.event("checkpoint", step, path=str(path))
    return path


__all__ = [
    "EXIT_DONE",
    "EXIT_FAILED",
    "EXIT_UPLOADS_INCOMPLETE",
    "EXIT_USAGE",
    "UPLOADS_DIRNAME",
    "check_launch",
    "configure_host",
    "create_accelerator",
    "enable_activation_checkpointing",
    "exit_status",
    "exit_status_of_signal",
    "init_trackers",
    "limit_hub_requests",
    "output_folder",
    "record_uploads",
    "save_checkpoint",
    "set_cpu_threads",
    "setup_logging",
    "start_uploader",
    "tracker_values",
    "wait_for_uploads",
]
