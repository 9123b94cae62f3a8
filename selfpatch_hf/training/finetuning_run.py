"""The fine-tuning run every task shares (`training/finetune_segmentation.py`, `training/finetune_detection.py`):
the accelerator, the schedule, resumable training batches, and after that the output folder, the resume, the loop
over optimiser steps with its logging, checkpoints and stop requests, the final evaluation, the model folder and its
upload. A script builds its data and model, and hands them with a `FinetuningTask` (what differs between tasks) to
`run_finetuning`:

    accelerator = start_accelerator(training_args, data_args.num_workers, find_unused_parameters=False)
    ... data, model, optimiser ...
    task = SegmentationTask(...)                   # train_batches / evaluate / save_model / describe ...
    return run_finetuning(accelerator, model, optimizer, finetuning_schedule(training_args), task, *arguments)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from selfpatch_hf.atomic_folders import staged_folder
from selfpatch_hf.cli.errors import CommandFailure, UsageError
from selfpatch_hf.data.segmentation.loading import SegmentationBatchSampler
from selfpatch_hf.data.unreadable_examples import SKIPPED_KEY, SkipUnreadable, collate_with_skipped
from selfpatch_hf.training.arguments.common import RuntimeArguments
from selfpatch_hf.training.arguments.finetuning import RANDOM_BACKBONE_PREFIX
from selfpatch_hf.training.checkpointing import CheckpointManager, DamagedCheckpointError
from selfpatch_hf.training.finetuning_optimization import FinetuningSchedule, apply_learning_rate
from selfpatch_hf.training.metrics_log import MetricsLog, WindowMeans
from selfpatch_hf.training.output_folder import completed_step, record_complete, write_final_folder
from selfpatch_hf.training.preemption import StopRequest, stop_signals_held
from selfpatch_hf.training.runtime import (
    configure_host,
    create_accelerator,
    exit_status,
    init_trackers,
    limit_hub_requests,
    output_folder,
    record_uploads,
    save_checkpoint,
    start_uploader,
    wait_for_uploads,
)

logger = logging.getLogger(__name__)

MODEL_DIRNAME = "model"
FINAL_ARTEFACTS = (MODEL_DIRNAME,)  # recorded in run_complete.json, written last


def start_accelerator(training_args: RuntimeArguments, num_workers: int, *, find_unused_parameters: bool):
    """The run's `Accelerator`, after the Hub requests are bounded and before the host's threads are set.
    `find_unused_parameters`: DDP must expect parameters without a gradient in a step (blocks after the last one
    a head reads, heads whose losses skip some of their layers)."""
    limit_hub_requests(training_args)  # before anything talks to the Hub
    accelerator = create_accelerator(training_args, {"find_unused_parameters": find_unused_parameters})
    configure_host(accelerator, training_args, num_workers)
    return accelerator


def finetuning_schedule(training_args: Any, **task_options: Any) -> FinetuningSchedule:
    """The learning-rate schedule of the shared options (`FinetuningArguments`) and a task's own (`power` of the
    poly decay, `decay_steps` / `decay_factor` of the step decay)."""
    return FinetuningSchedule(
        learning_rate=training_args.learning_rate,
        total_steps=training_args.max_steps,
        warmup_steps=training_args.warmup_steps,
        warmup_ratio=training_args.warmup_ratio,
        kind=training_args.lr_scheduler,
        min_learning_rate=training_args.min_learning_rate,
        **task_options,
    )


def check_fills_a_batch(
    num_examples: int, dataset: str, split: str, training_args: RuntimeArguments, accelerator
):
    """A training split smaller than one global micro-batch (processes x per-device batch) cannot train: one usage
    line, found with the data, before the output folder is touched."""
    global_batch = training_args.per_device_train_batch_size * accelerator.num_processes
    if num_examples < global_batch:
        raise UsageError(
            f"--dataset_name {dataset}: its {split} split has {num_examples} images, fewer than one global batch of "
            f"{global_batch} ({accelerator.num_processes} processes x {training_args.per_device_train_batch_size}): "
            "lower --per_device_train_batch_size."
        )


def resumable_batches(
    dataset: torch.utils.data.Dataset,
    collate_fn: Callable[[list[Any]], dict[str, Any]],
    num_workers: int,
    training_args: RuntimeArguments,
    accelerator,
    start_step: int,
) -> tuple[Iterator[dict[str, Any]], int]:
    """This process's endless micro-batches from optimiser step `start_step` on, moved to the device, and the
    micro-batches per epoch. `dataset` is indexed by `(epoch, index)` keys of a seeded permutation per epoch
    (`SegmentationBatchSampler`), so a resumed run sees exactly the batches the uninterrupted one would. Examples
    whose image cannot be read are replaced by the next readable one, their reasons under `SKIPPED_KEY`
    (selfpatch_hf.data.unreadable_examples)."""
    sampler = (
        SegmentationBatchSampler(  # the split fills a global batch: `check_fills_a_batch`, before any work
            len(dataset),
            training_args.per_device_train_batch_size,
            training_args.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            start_batch=start_step * training_args.gradient_accumulation_steps,
        )
    )
    loader = torch.utils.data.DataLoader(
        SkipUnreadable(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_with_skipped(collate_fn),
        worker_init_fn=single_thread_worker,
        # its own generator: creating the iterator draws a seed, which would otherwise shift the global torch RNG
        # (drop-path masks) between an uninterrupted and a resumed run
        generator=torch.Generator().manual_seed(training_args.seed),
    )

    def batches() -> Iterator[dict[str, Any]]:
        for batch in started_with_workers(loader):
            yield _to_device(batch, accelerator.device)

    return batches(), sampler.batches_per_epoch


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, list):
        return [_to_device(item, device) for item in value]
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def backbone_source(backbone: str, image_size: int):
    """`--backbone` as the head builders take it: a path / Hub id, or for `random:PRESET` a randomly initialised
    ViT of that preset for `image_size` inputs."""
    if not backbone.startswith(RANDOM_BACKBONE_PREFIX):
        return backbone  # a missing folder is named by the loader
    from selfpatch_hf.models.dense.backbones import random_vit

    try:
        return random_vit(backbone[len(RANDOM_BACKBONE_PREFIX) :], image_size)
    except ValueError as error:
        raise UsageError(f"--backbone {backbone}: {error}") from None


@contextlib.contextmanager
def backbone_errors(backbone: str) -> Iterator[None]:
    """Around building a model on `--backbone`: what loading it raises (a missing folder, a folder that is not a
    backbone, damaged, truncated or refused weights: `selfpatch_hf.models.dense.backbones` says which) as one usage
    line naming the option."""
    try:
        yield
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(f"--backbone {backbone}: {' '.join(str(error).split())}") from None


def save_model_folder(
    target: Path, model: torch.nn.Module, processor: Any, write_card: Callable[[Path], Any]
) -> Path:
    """`target`: config, safetensors, image processor and the card `write_card(folder)` writes; staged and swapped
    in whole (a failure is one line naming the folder)."""

    def write() -> None:
        with staged_folder(target) as staging:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
            write_card(staging)

    write_final_folder(target, "the fine-tuned model", write)
    return target


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


class FinetuningTask(Protocol):
    """What a fine-tuning task brings to `run_finetuning`; the task holds its own data, processor and arguments."""

    #: the progress bar's label and the upload's commit message ("UperNet", "mask2former")
    name: str

    def train_batches(self, start_step: int) -> tuple[Iterator[dict[str, Any]], int]:
        """This process's endless micro-batches from optimiser step `start_step` on (on the device), and the
        micro-batches per epoch. The iterator is closed when the run ends (its data workers stop then)."""

    def describe(self, global_batch_size: int, batches_per_epoch: int) -> str:
        """The line logged before the first step: backbone, data, length, batch, learning rate."""

    def evaluate(self, model: torch.nn.Module) -> Any | None:
        """Scores on the evaluation split (every process calls it, all get the same scores), None without one."""

    def score_metrics(self, scores: Any) -> dict[str, float]:
        """`scores` as flat `eval_*` metrics for metrics.jsonl and the trackers."""

    def score_summary(self, scores: Any) -> str:
        """`scores` in one short line for the log ("mIoU 41.20, ...")."""

    def save_model(
        self, model: torch.nn.Module, target: Path, step: int, global_batch_size: int, scores: Any | None
    ) -> Path:
        """The final model folder of `model` (unwrapped): model, image processor, card with `scores`, written whole
        at `target`; main process only."""


@dataclass
class FinetuningResult:
    accelerator: Any
    model: Any  # unwrapped
    global_step: int
    scores: Any | None  # the task's, None without an evaluation split or when stopped early
    model_dir: Path | None
    stopped_by: str | None
    upload_report: list[str]
    uploads_complete: bool = True  # False: --push_to_hub, but the model is not on the Hub

    def finish(self, prog: str) -> int:
        """Ends the trackers; the script's exit status: 0 done, 1 failed, 2 wrong arguments, 3 trained but the
        model is not on the Hub (docs/reliability.md), 128 + signal when pre-empted."""
        self.accelerator.end_training()
        return exit_status(prog, self.stopped_by, self.uploads_complete, "the fine-tuned model")


def global_batch_size(accelerator, training_args: RuntimeArguments) -> int:
    return (
        accelerator.num_processes
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
    )


def run_finetuning(
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: FinetuningSchedule,
    task: FinetuningTask,
    model_args: Any,
    data_args: Any,
    training_args: Any,
) -> FinetuningResult:
    """Prepares `model` and `optimizer`, takes the output folder (held by this run), resumes, trains to
    `--max_steps` (checkpoints every `--checkpointing_steps`, evaluates every `--eval_steps`, stops after a
    checkpoint on SIGTERM / SIGINT), then checkpoints, evaluates, saves and uploads the model. The argument groups
    are recorded in checkpoints and trackers."""
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(training_args.seed, device_specific=True)  # drop-path masks differ between processes
    hyperparameters = {
        **dataclasses.asdict(model_args),
        **dataclasses.asdict(data_args),
        **training_args.public_dict(),
    }
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    batch_size = global_batch_size(accelerator, training_args)
    max_steps = training_args.max_steps

    with output_folder(accelerator, training_args, FINAL_ARTEFACTS) as output_dir:
        metrics_log = MetricsLog(accelerator, output_dir)
        checkpoints = CheckpointManager(accelerator, output_dir, training_args.checkpoints_total_limit)
        global_step, resumed_from = resume_step(checkpoints, training_args, batch_size)
        if global_step >= max_steps and completed_step(output_dir, FINAL_ARTEFACTS) is not None:
            logger.info(
                "The run in %s is already complete (step %d of %d); its model is in %s. Nothing to do: pass a "
                "larger --max_steps to train on, or --overwrite_output_dir to start again.",
                output_dir,
                global_step,
                max_steps,
                output_dir / MODEL_DIRNAME,
            )
            return FinetuningResult(
                accelerator, unwrapped, global_step, None, output_dir / MODEL_DIRNAME, None, []
            )
        if resumed_from is not None:
            metrics_log.event("resumed", global_step, checkpoint=str(resumed_from))
            logger.info("Resumed from %s at step %d.", resumed_from, global_step)
        uploader = start_uploader(training_args, accelerator)
        init_trackers(accelerator, training_args, hyperparameters)

        def checkpoint(step: int) -> Path:
            trainer_state = {
                "step": step,
                "global_batch_size": batch_size,
                "num_processes": accelerator.num_processes,
                "arguments": hyperparameters,
            }
            return save_checkpoint(
                checkpoints, metrics_log, step, trainer_state, {"rank": accelerator.process_index}
            )

        def run_evaluation(step: int) -> Any | None:
            started = time.perf_counter()
            scores = task.evaluate(model)
            if scores is not None:
                metrics_log.metrics(step, task.score_metrics(scores))
                logger.info(
                    "Step %d: %s (%.0f s)", step, task.score_summary(scores), time.perf_counter() - started
                )
            return scores

        batches, batches_per_epoch = task.train_batches(global_step)
        logger.info("%s", task.describe(batch_size, batches_per_epoch))
        metrics_log.event("start", global_step, total_steps=max_steps, global_batch_size=batch_size)

        # ---- the loop
        progress = tqdm(
            total=max_steps,
            initial=global_step,
            disable=not accelerator.is_main_process,
            desc=f"fine-tuning {task.name}",
        )
        scores = model_dir = stopped_by = None
        window = WindowMeans()
        skipped_in_window = 0
        report_skipped = _SkippedReport()
        try:
            with StopRequest() as stop:
                while global_step < max_steps:
                    started = time.perf_counter()
                    learning_rate = schedule.at(global_step)
                    apply_learning_rate(optimizer, learning_rate)
                    step_loss, skipped = _optimiser_step(
                        accelerator, model, optimizer, batches, training_args
                    )
                    if not math.isfinite(step_loss):
                        raise CommandFailure(
                            f"non-finite loss at step {global_step}: lower --learning_rate, lengthen --warmup_steps "
                            "or train in fp32, then continue with --resume_from_checkpoint."
                        )
                    global_step += 1
                    window.add({"loss": step_loss}, batch_size, time.perf_counter() - started)
                    skipped_in_window += len(skipped)
                    report_skipped(skipped, global_step)
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{learning_rate:.2e}", refresh=False)
                    if global_step % training_args.logging_steps == 0 or global_step == max_steps:
                        epoch = global_step * training_args.gradient_accumulation_steps / batches_per_epoch
                        metrics_log.metrics(
                            global_step,
                            {
                                **window.means(),
                                "learning_rate": learning_rate,
                                "epoch": round(epoch, 4),
                                "images_per_second": window.images_per_second,
                                # since the last metrics line, all processes (a resume replays, as the loss)
                                "skipped_examples": accelerator.reduce(
                                    torch.tensor(skipped_in_window, device=accelerator.device),
                                    reduction="sum",
                                ).item(),
                            },
                        )
                        window.reset()
                        skipped_in_window = 0
                    record_uploads(uploader, metrics_log)
                    stop_now = accelerator.reduce(
                        torch.tensor(float(stop.requested), device=accelerator.device), reduction="sum"
                    ).item()
                    if stop_now or global_step == max_steps:
                        progress.close()  # the bar's last state once, before the final lines are logged
                    if stop_now:
                        stopped_by = stop.signal_name or "another process's signal"
                        path = checkpoint(global_step)
                        metrics_log.event("stopped", global_step, signal=stopped_by, checkpoint=str(path))
                        logger.warning(
                            "Stopped by %s at step %d; continue with --resume_from_checkpoint latest.",
                            stopped_by,
                            global_step,
                        )
                        break
                    every = training_args.checkpointing_steps
                    if every and global_step % every == 0:
                        checkpoint(global_step)
                    every = training_args.eval_steps
                    if every and global_step % every == 0 and global_step < max_steps:
                        run_evaluation(global_step)

                # ---- the end: a checkpoint, the evaluation, the model folder (whole) and its upload
                if stopped_by is None:
                    every = training_args.checkpointing_steps
                    if not (every and global_step % every == 0):
                        checkpoint(global_step)
                    scores = run_evaluation(global_step)
                    if accelerator.is_main_process:
                        model_dir = task.save_model(
                            unwrapped, output_dir / MODEL_DIRNAME, global_step, batch_size, scores
                        )
                        record_complete(output_dir, global_step, FINAL_ARTEFACTS)
                        metrics_log.event("saved", global_step, path=str(model_dir))
                        logger.info("Model saved to %s", model_dir)
                        if uploader is not None:
                            uploader.submit(
                                model_dir,
                                global_step,
                                commit_message=f"{task.name} fine-tuned for {global_step} steps",
                            )
                    accelerator.wait_for_everyone()
        finally:
            progress.close()
            batches.close()  # the data workers end now, not at the interpreter's exit
            upload_report = wait_for_uploads(uploader, training_args, stopped_by, metrics_log)
        metrics_log.event("end", global_step, stopped_by=stopped_by, scores=scores)
        return FinetuningResult(
            accelerator,
            unwrapped,
            global_step,
            scores,
            model_dir,
            stopped_by,
            upload_report,
            uploads_complete=uploader is None or uploader.complete,
        )


def _optimiser_step(
    accelerator, model, optimizer, batches: Iterator[dict[str, Any]], training_args
) -> tuple[float, list[str]]:
    """One optimiser step over `--gradient_accumulation_steps` micro-batches: the loss averaged over them and over
    the processes, and the reasons of this process's examples that were replaced as unreadable."""
    step_loss = torch.zeros((), device=accelerator.device)
    skipped: list[str] = []
    for _ in range(training_args.gradient_accumulation_steps):
        batch = next_batch(batches)
        skipped += batch.pop(SKIPPED_KEY, [])
        with accelerator.accumulate(model), accelerator.autocast():
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and training_args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach() / training_args.gradient_accumulation_steps
    return accelerator.reduce(step_loss, reduction="mean").item(), skipped


class _SkippedReport:
    """Warns of unreadable training examples: each of the first `detailed` with its reason, then one line per
    further `every` (the metrics' `skipped_examples` count them all)."""

    def __init__(self, detailed: int = 10, every: int = 100):
        self.count, self.detailed, self.every = 0, detailed, every

    def __call__(self, reasons: list[str], step: int) -> None:
        for reason in reasons:
            self.count += 1
            if self.count <= self.detailed:
                logger.warning(
                    "Step %d: skipped unreadable %s (replaced by the next readable example).", step, reason
                )
            elif self.count % self.every == 0:
                logger.warning("Step %d: %d unreadable training examples skipped so far.", step, self.count)


def next_batch(batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The next micro-batch; an example the data checks refuse (an unreadable mask, a malformed box) stops the run
    with its own line (a data worker's error arrives with the worker's traceback around it)."""
    try:
        return next(batches)
    except ValueError as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        # from a data worker the message ends its traceback, as `SomeError: message`
        message = re.sub(r"^\w+Error: ", "", lines[-1].strip()) if lines else str(error)
        raise CommandFailure(
            f"training data: {message} (fix or drop that example, then resume with --resume_from_checkpoint "
            "latest)."
        ) from None


__all__ = [
    "FINAL_ARTEFACTS",
    "MODEL_DIRNAME",
    "FinetuningResult",
    "FinetuningTask",
    "backbone_errors",
    "backbone_source",
    "check_fills_a_batch",
    "global_batch_size",
    "finetuning_schedule",
    "next_batch",
    "resumable_batches",
    "resume_step",
    "run_finetuning",
    "save_model_folder",
    "single_thread_worker",
    "start_accelerator",
    "started_with_workers",
]
