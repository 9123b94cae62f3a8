#!/usr/bin/env python
r"""Pretrain a SelfPatch (or plain DINO) ViT with Accelerate on streamed images, and publish its backbone.

    accelerate launch training/pretrain.py training/configs/selfpatch_vit_small_imagenet.yaml
    accelerate launch --num_processes 8 training/pretrain.py RECIPE.yaml --output_dir runs/vits16 \
        --push_to_hub --hub_model_id me/selfpatch-vits16
    python training/pretrain.py --preset vit-tiny-patch16 --config_overrides global_crop_size=96 \
        --dataset_name offline-sample --max_steps 20 --output_dir runs/demo
    accelerate launch training/pretrain.py RECIPE.yaml --resume_from_checkpoint latest

A recipe file (YAML or JSON, the first argument) sets any option below; options given on the command line after it
override the file. `config_overrides` sets any field of `SelfPatchConfig` or of the backbone's `ViTConfig`
(`key=value` pairs on the command line, a mapping in a recipe file; both merge, the command line winning).

The run writes into `--output_dir`: `metrics.jsonl` (and tracker logs under `logs/`), `checkpoints/checkpoint-<step>`
(accelerate state + per-process data positions, written atomically), `backbone/` (the teacher's backbone as a plain
`ViTModel` with image processor and model card, loadable with `AutoModel.from_pretrained`) and, at the end,
`pretraining_model/` (the whole `SelfPatchViTForPretraining`). Schedules are defined per optimiser step of the
GLOBAL batch (processes x per-device batch x accumulation); see `selfpatch_hf.training.schedules` and docs/method.md
section 10. Running the same command again with `--resume_from_checkpoint latest` continues an interrupted run, or
reports a finished one.
"""

from __future__ import annotations

import sys

from selfpatch_hf.cli.errors import CommandFailure, UsageError, run_command
from selfpatch_hf.training.arguments.pretraining import (
    OFFLINE_SAMPLE,
    DataArguments,
    ModelArguments,
    PretrainingArguments,
    parse_pretraining_arguments,
    validate_arguments,
)

PROG = "pretrain.py"


def parse_arguments(argv: list[str] | None = None):
    """`(model_args, data_args, training_args, config_overrides)` of `[RECIPE.yaml] [--option value ...]`."""
    return parse_pretraining_arguments(sys.argv[1:] if argv is None else argv, description=__doc__)


def check_arguments(argv: list[str] | None = None) -> None:
    """Parses and checks the arguments, nothing else: `--help` and argument mistakes are answered here."""
    _, data_args, training_args, _ = parse_arguments(argv)
    validate_arguments(data_args, training_args)


if __name__ == "__main__":
    # answer --help and argument mistakes before the imports below load torch, transformers and datasets (seconds)
    if status := run_command(PROG, check_arguments):
        sys.exit(status)

# ruff: noqa: E402 -- the heavy imports come after that early answer
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from huggingface_hub.errors import StrictDataclassError
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from selfpatch_hf import SelfPatchConfig, SelfPatchViTForPretraining, export_backbone
from selfpatch_hf.atomic_folders import apply_default_permissions
from selfpatch_hf.data.augmentation import MultiCropAugmentation
from selfpatch_hf.data.streaming import MultiCropDataLoader, load_image_stream
from selfpatch_hf.hub.cards.backbone import BackboneCardInfo
from selfpatch_hf.hub.request_limits import DEFAULT_CONNECT_TIMEOUT, bound_hub_requests
from selfpatch_hf.hub.uploads import AsyncHubUploader
from selfpatch_hf.models.selfpatch.modeling import sync_batch_norm
from selfpatch_hf.training.checkpointing import (
    CHECKPOINTS_DIRNAME,
    CheckpointManager,
    CheckpointWriteError,
    DamagedCheckpointError,
)
from selfpatch_hf.training.compilation import compile_for_training
from selfpatch_hf.training.cuda_setup import adamw_kwargs, ddp_kwargs, enable_tf32
from selfpatch_hf.training.divergence import DivergenceMonitor, weight_norm
from selfpatch_hf.training.host_memory import keep_freed_host_memory
from selfpatch_hf.training.metrics_log import METRICS_FILENAME, MetricsLog, WindowMeans
from selfpatch_hf.training.mixed_precision import (
    MAX_CONSECUTIVE_SKIPPED_STEPS,
    ScalerSkipGuard,
    step_was_skipped,
)
from selfpatch_hf.training.optimization import (
    apply_schedule,
    build_optimizer,
    cancel_gradients,
    clip_gradients,
)
from selfpatch_hf.training.preemption import StopRequest
from selfpatch_hf.training.resume import check_resumable, config_snapshot
from selfpatch_hf.training.schedules import PretrainingSchedule, ScheduleValues, optimizer_steps_per_epoch

logger = get_logger(__name__)

BACKBONE_DIRNAME = "backbone"
PRETRAINING_MODEL_DIRNAME = "pretraining_model"  # written last: its presence marks a finished run
UPLOADS_INCOMPLETE = 3  # exit status: trained to the end, but the last export did not reach the Hub
# library objects check their own settings; their ValueErrors are argument mistakes of this script
LIBRARY_ARGUMENT_ERRORS = (ValueError, TypeError, StrictDataclassError)


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks, in the order `train` uses them
# ---------------------------------------------------------------------------------------------------------------------


def setup_logging(accelerator: Accelerator) -> None:
    """Our progress on the main process, warnings elsewhere; the libraries' own chatter kept to warnings."""
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=level,
    )
    logging.getLogger("selfpatch_hf").setLevel(level)
    # a line per data pass is noise; skipped images still show (warnings)
    logging.getLogger("selfpatch_hf.data.streaming").setLevel(logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    logger.info(accelerator.state, main_process_only=False)


def _message(error: Exception) -> str:
    """One line for a library's argument error (a strict dataclass wraps the validator's own error)."""
    while isinstance(error, StrictDataclassError) and error.__cause__ is not None:
        error = error.__cause__
    return " ".join(str(error).split())


def build_config(model_args: ModelArguments, overrides: dict[str, Any]) -> SelfPatchConfig:
    try:
        config = SelfPatchConfig.from_preset(model_args.preset, **overrides)
    except LIBRARY_ARGUMENT_ERRORS as error:
        raise UsageError(f"Invalid model configuration: {_message(error)}") from None
    return config


def card_training_data(dataset_name: str) -> dict[str, Any]:
    """How the model card names the training data: a Hub dataset id goes into its `datasets` metadata; the offline
    sample and local files are described in its body (they are no Hub datasets)."""
    from selfpatch_hf.data.samples.photographs import SAMPLE_DATASET_DESCRIPTION
    from selfpatch_hf.data.streaming import hub_dataset_id

    if dataset_name == OFFLINE_SAMPLE:
        return {"training_data": SAMPLE_DATASET_DESCRIPTION}
    hub_id = hub_dataset_id(dataset_name)
    return {"datasets": [hub_id]} if hub_id else {"training_data": f"local files (`{dataset_name}`)"}


def open_image_stream(data_args: DataArguments, training_args: PretrainingArguments):
    """The dataset as a stream of undecoded images and its image column; fails early on a missing dataset or a
    dataset without images."""
    source = data_args.dataset_name
    if source == OFFLINE_SAMPLE:
        from selfpatch_hf.data.samples.photographs import sample_dataset_path

        source = str(sample_dataset_path())  # built once, atomically (safe with several processes)
    kwargs = {"name": data_args.dataset_config_name} if data_args.dataset_config_name else {}
    try:
        return load_image_stream(
            source,
            split=data_args.dataset_split,
            image_column=data_args.image_column,
            token=training_args.hub_token,
            streaming=data_args.streaming,
            **kwargs,
        )
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise UsageError(f"Cannot train on the dataset {data_args.dataset_name!r}: {error}") from None


def build_dataloader(
    dataset,
    image_column: str,
    data_args: DataArguments,
    training_args: PretrainingArguments,
    config: SelfPatchConfig,
    accelerator: Accelerator,
) -> MultiCropDataLoader:
    """This process's stream of multi-crop batches. Each process reads its own part of the data; the loader is not
    passed through `accelerator.prepare`, whose default for iterable datasets would make rank 0 read for everyone."""
    try:
        augmentation = MultiCropAugmentation(
            global_crop_size=config.global_crop_size,
            local_crop_size=config.local_crop_size,
            num_local_crops=config.num_local_crops,
            global_crops_scale=config.global_crops_scale,
            local_crops_scale=config.local_crops_scale,
            # MoBY keeps torchvision's default bilinear resampling for its two views (DINO/SelfPatch: bicubic)
            interpolation="bilinear" if config.image_objective == "moby" else "bicubic",
        )
        return MultiCropDataLoader(
            dataset,
            image_column,
            augmentation,
            training_args.per_device_train_batch_size,
            num_workers=data_args.num_workers,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            seed=training_args.seed,
            shuffle_buffer_size=data_args.shuffle_buffer_size,
            min_image_size=data_args.min_image_size,
            token=training_args.hub_token,
            device=accelerator.device,  # workers hand over uint8 crops, normalised on the training device
            augmentation_device=data_args.augmentation_device,
        )
    except LIBRARY_ARGUMENT_ERRORS as error:
        raise UsageError(_message(error)) from None


def set_cpu_threads(accelerator: Accelerator, num_workers: int, requested: int | None) -> None:
    """Torch threads per process on the CPU: `requested`, or the cores left to each process after its data
    workers. Oversubscribed cores make torch's threads wait for each other at every parallel region, which costs
    far more than the threads gain (5-25x slower steps on 2 cores)."""
    if requested is not None:
        torch.set_num_threads(requested)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
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


def configure_cpu_training(
    accelerator: Accelerator, data_args: DataArguments, training_args: PretrainingArguments
) -> None:
    """Torch threads, host-memory reuse and precision warnings for training on the CPU (nothing on accelerators)."""
    if accelerator.device.type != "cpu":
        return
    set_cpu_threads(accelerator, data_args.num_workers, training_args.cpu_threads)
    if training_args.keep_freed_host_memory and keep_freed_host_memory():
        logger.info("Freed host memory is kept for reuse (glibc mallopt).")
    if accelerator.mixed_precision == "fp16":
        logger.warning("--mixed_precision fp16 has no effect on the CPU (accelerate runs fp32 there).")
    elif accelerator.mixed_precision == "bf16":
        logger.warning(
            "bf16 on a CPU without bf16 units is far slower than fp32; consider --mixed_precision no."
        )


def enable_activation_checkpointing(backbone: torch.nn.Module) -> None:
    """Recompute the backbone's activations in the backward pass. Older transformers 5 releases (e.g. 5.17) have
    only the older method name; both checkpoint non-reentrantly."""
    enable = getattr(backbone, "activation_checkpointing_enable", None)
    (enable or backbone.gradient_checkpointing_enable)()


def _tracker_values(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """Trackers take numbers, strings and booleans: anything else (lists, None) as its text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hyperparameters.items()}


def endless_batches(loader: MultiCropDataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Passes over the stream, one after the other (each with a new order and new crops)."""
    empty_passes = 0
    while True:
        produced = 0
        for batch in loader:
            produced += 1
            yield batch
        # a pass resumed at its very end may legitimately be empty; two in a row mean too little data
        empty_passes = empty_passes + 1 if produced == 0 else 0
        if empty_passes >= 2:
            raise CommandFailure(
                f"a whole pass over the data gave process {loader.rank} no batch of "
                f"{loader.batch_size} images: the dataset is too small for this per-device batch size and "
                f"{loader.num_workers} worker(s) (each worker drops its incomplete last batch), or all its images "
                f"were skipped ({loader.skipped_images} so far). Use a smaller batch or fewer workers."
            )


def _take(batches: Iterator, count: int) -> Iterator:
    """The next `count` batches. Reading them must not touch the global torch RNG that drop-path draws from:
    every DataLoader iteration draws its base seed from it, and a resumed run starts one more iteration than an
    uninterrupted one (the rest of the interrupted pass), which would shift every later drop-path mask."""
    for _ in range(count):
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)
        yield batch


# ---------------------------------------------------------------------------------------------------------------------
# One optimiser step
# ---------------------------------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, losses: dict[str, float]):
        super().__init__(f"non-finite loss at optimiser step {step}: {losses}")
        self.step = step
        self.losses = losses


@dataclass
class StepResult:
    loss: float
    image_loss: float
    patch_loss: float | None
    stop_requested: bool
    skipped: bool = False  # the fp16 loss scaler skipped the optimiser step (inf/NaN gradients)
    grad_norm: float = math.nan  # of the student's gradients before clipping (the divergence check reads it)


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    values: ScheduleValues,
    clip_grad: float,
    stop_requested: bool = False,
    clip_grad_mode: str = "per_parameter",
) -> StepResult:
    """One optimiser step over `gradient_accumulation_steps` micro-batches, then the teacher's EMA update (MoBY:
    the target's momentum update runs inside the first micro-batch's forward, before its keys, as MoBY does).

    `model` is the prepared (DDP-wrapped) model, so gradients are averaged over processes; the centres are
    all-reduced inside its forward. Losses are averaged over micro-batches and processes, and the stop flag is
    or-ed over processes, in one all-reduce before the optimiser step: every process takes the same decision, and
    a non-finite loss raises `NonFiniteLossError` before it can reach the weights.
    """
    unwrapped = accelerator.unwrap_model(model)
    objective = unwrapped.objective
    moves_teacher = objective.moves_teacher_in_forward  # MoBY
    # fp16: a step the loss scaler skips leaves centres, queues and (MoBY) the target as they were
    # (selfpatch_hf.training.mixed_precision)
    guard = ScalerSkipGuard(unwrapped, enabled=accelerator.scaler is not None, include_teacher=moves_teacher)
    guard.before_forward()
    totals = torch.zeros(3, device=accelerator.device)
    micro_steps = 0
    for global_crops, local_crops in micro_batches:
        global_crops = global_crops.to(accelerator.device, non_blocking=True)
        local_crops = local_crops.to(accelerator.device, non_blocking=True)
        # the objective's per-step schedule values (DINO: the teacher temperature); an objective that moves the
        # teacher in its forward (MoBY) takes the momentum with the first micro-batch: once per optimiser step
        inputs = {name: getattr(values, name) for name in objective.step_inputs}
        if moves_teacher:
            inputs["teacher_momentum"] = values.teacher_momentum if micro_steps == 0 else None
        if not objective.uses_local_crops:  # MoBY: two views, no local crops
            local_crops = None
        with accelerator.accumulate(model):
            outputs = model(global_crops, local_crops, **inputs)
            accelerator.backward(outputs.loss)
            patch_loss = (
                outputs.patch_loss if outputs.patch_loss is not None else torch.full_like(outputs.loss, -1)
            )
            totals += torch.stack([outputs.loss, outputs.image_loss, patch_loss]).detach().float()
            micro_steps += 1
            if accelerator.sync_gradients:
                flag = torch.tensor([float(stop_requested)], device=accelerator.device)
                reduced = accelerator.reduce(
                    torch.cat([totals / micro_steps, flag]), reduction="mean"
                ).tolist()
                loss, image_loss, patch_value, stop_share = reduced
                if not all(math.isfinite(v) for v in (loss, image_loss, patch_value)):
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLossError(
                        values.step, {"loss": loss, "image_loss": image_loss, "patch_loss": patch_value}
                    )
                accelerator.unscale_gradients(optimizer)  # fp16: measure and clip the true gradients
                # the norm before clipping feeds the divergence check; the clip measures it anyway
                grad_norm = clip_gradients(unwrapped.student.parameters(), clip_grad, clip_grad_mode)
                if values.freeze_last_layer:
                    cancel_gradients(unwrapped.get_last_layer_parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    skipped = guard.after_step(step_was_skipped(optimizer))
    if not skipped and not moves_teacher:  # the student did not move: neither does the teacher
        unwrapped.update_teacher(values.teacher_momentum)
    return StepResult(
        loss=loss,
        image_loss=image_loss,
        patch_loss=patch_value if outputs.patch_loss is not None else None,
        stop_requested=stop_share > 0,
        skipped=skipped,
        grad_norm=grad_norm,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Training: `train` runs these phases in order
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PretrainingResult:
    """What `train` leaves behind (the accelerator and model are still alive: `main` ends the run)."""

    accelerator: Accelerator
    model: SelfPatchViTForPretraining  # unwrapped
    global_step: int
    total_steps: int
    stopped_by: str | None  # signal name when pre-empted
    export_dir: Path | None
    upload_report: list[str] = field(default_factory=list)
    uploads_complete: bool = True  # False: --push_to_hub, but the last export is not on the Hub


@dataclass
class StepPlan:
    """The run's length in optimiser steps of the GLOBAL batch, and the schedules along those steps."""

    global_batch_size: int  # processes x per-device batch x accumulation
    steps_per_epoch: int
    total_steps: int
    schedule: PretrainingSchedule


@dataclass
class TrainingRun:
    """What the phases of one run share, built by `train` before the loop starts."""

    accelerator: Accelerator
    model_args: ModelArguments
    data_args: DataArguments
    training_args: PretrainingArguments
    config_overrides: dict[str, Any]
    config: SelfPatchConfig
    train_loader: MultiCropDataLoader
    plan: StepPlan
    checkpoints: CheckpointManager
    metrics_log: MetricsLog
    model: torch.nn.Module  # prepared (DDP-wrapped)
    optimizer: torch.optim.Optimizer
    unwrapped: SelfPatchViTForPretraining
    monitor: DivergenceMonitor | None  # None: --no_divergence_check
    uploader: AsyncHubUploader | None = None  # main process with --push_to_hub only; started after the resume

    @property
    def output_dir(self) -> Path:
        return Path(self.training_args.output_dir)


def limit_hub_requests(training_args: PretrainingArguments) -> None:
    """huggingface_hub gives uploads (and some dataset calls) no timeout: a silent server would hold them, and the
    final wait for the uploads, forever."""
    bound_hub_requests(
        min(DEFAULT_CONNECT_TIMEOUT, training_args.hub_request_timeout), training_args.hub_request_timeout
    )


def create_accelerator(training_args: PretrainingArguments) -> Accelerator:
    """The accelerator (device, processes, mixed precision, accumulation, trackers) and the logging set-up. DDP
    broadcasts no buffers: the centres are all-reduced inside forward (on CUDA also bucket views, static graph)."""
    output_dir = Path(training_args.output_dir)
    accelerator = Accelerator(
        cpu=training_args.cpu,
        mixed_precision=training_args.mixed_precision,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        log_with=None if training_args.report_to == "none" else training_args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        kwargs_handlers=[
            DistributedDataParallelKwargs(
                **ddp_kwargs(
                    "cpu" if training_args.cpu or not torch.cuda.is_available() else "cuda",
                    training_args.gradient_accumulation_steps,
                )
            )
        ],
    )
    enable_tf32(accelerator.device)  # CUDA only: TF32 for what runs in fp32
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise UsageError("Several processes but no distributed setup: launch with `accelerate launch`.")
    setup_logging(accelerator)
    return accelerator


def plan_steps(
    accelerator: Accelerator, data_args: DataArguments, training_args: PretrainingArguments
) -> tuple[StepPlan, CheckpointManager]:
    """The global batch, the run's length and its schedules, and the checkpoint folder's manager; a setting that
    cannot work is an argument mistake naming the batch arithmetic, found before anything is written."""
    global_batch_size = (
        accelerator.num_processes
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
    )
    steps_per_epoch = optimizer_steps_per_epoch(data_args.samples_per_epoch, global_batch_size)
    total_steps = (
        training_args.max_steps
        if training_args.max_steps > 0
        else max(1, round(training_args.epochs * steps_per_epoch))
    )
    try:
        schedule = PretrainingSchedule.from_recipe(
            training_args.schedule_recipe(),
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            global_batch_size=global_batch_size,
        )
        checkpoints = CheckpointManager(
            accelerator, training_args.output_dir, training_args.checkpoints_total_limit
        )
    except ValueError as error:
        raise UsageError(
            f"{error} (samples_per_epoch {data_args.samples_per_epoch}, global batch {global_batch_size} = "
            f"{accelerator.num_processes} processes x {training_args.per_device_train_batch_size} per device x "
            f"{training_args.gradient_accumulation_steps} accumulation steps)"
        ) from None
    return StepPlan(global_batch_size, steps_per_epoch, total_steps, schedule), checkpoints


def prepare_output_dir(accelerator: Accelerator, training_args: PretrainingArguments) -> None:
    """Creates the output folder; with --overwrite_output_dir removes an earlier run's checkpoints, final model and
    metrics, which `--resume_from_checkpoint latest` would otherwise take for this run's."""
    output_dir = Path(training_args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if training_args.overwrite_output_dir:
            shutil.rmtree(output_dir / CHECKPOINTS_DIRNAME, ignore_errors=True)
            shutil.rmtree(output_dir / PRETRAINING_MODEL_DIRNAME, ignore_errors=True)
            (output_dir / METRICS_FILENAME).unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def build_model_and_optimizer(
    accelerator: Accelerator, config: SelfPatchConfig, training_args: PretrainingArguments
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and its AdamW, prepared by the accelerator. The same seed on every process gives the same initial
    weights; afterwards each process gets its own seed, so that drop-path masks differ between processes."""
    set_seed(training_args.seed)
    model = SelfPatchViTForPretraining(config)
    if config.image_objective == "moby" and accelerator.num_processes > 1:
        model = sync_batch_norm(model, accelerator.device)  # MoBY's BatchNorm over the global batch (GPUs)
    if training_args.gradient_checkpointing:
        enable_activation_checkpointing(model.student.backbone)
    if training_args.torch_compile:  # in place: parameter names, checkpoints and exports are unchanged
        compile_for_training(model, backend=training_args.torch_compile_backend)
    optimizer = build_optimizer(model.student, **adamw_kwargs(accelerator.device))  # fused AdamW on CUDA
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    set_seed(training_args.seed, device_specific=True)
    return model, optimizer


def run_is_complete(run: TrainingRun, step: int) -> bool:
    """A run resumed at its last step whose final model was written (`pretraining_model/` is written last)."""
    return step >= run.plan.total_steps and (run.output_dir / PRETRAINING_MODEL_DIRNAME).is_dir()


def resume(run: TrainingRun) -> int:
    """Loads the checkpoint named by --resume_from_checkpoint (weights, optimiser, RNGs, data positions, divergence
    history) after checking it belongs to this model and run; returns the optimiser step to continue from (0: no
    checkpoint yet). A damaged checkpoint is a failure; a missing or foreign one an argument mistake."""
    which = run.training_args.checkpoint_to_resume()
    if not which:
        return 0
    try:
        checkpoint = run.checkpoints.resolve(which)
        loaded = run.checkpoints.load(checkpoint) if checkpoint is not None else None
    except DamagedCheckpointError as error:  # its files do not match its manifest: a failure, not usage
        raise CommandFailure(f"Cannot resume: {error}") from None
    except (FileNotFoundError, ValueError) as error:  # no such checkpoint, or not one of this model/run
        raise UsageError(f"Cannot resume: {error}") from None
    if loaded is None:
        logger.info("No checkpoint in %s yet: starting from scratch.", run.checkpoints.directory)
        return 0
    trainer_state, rank_state = loaded
    check_resumable(
        trainer_state,
        checkpoint,
        global_batch_size=run.plan.global_batch_size,
        arguments={**asdict(run.data_args), **asdict(run.training_args)},
        model_config=config_snapshot(run.config),
    )
    changed = run.plan.schedule.differences(PretrainingSchedule.from_dict(trainer_state["schedule"]))
    if changed:
        logger.warning("Schedules differ from the checkpoint's (now, saved): %s", changed)
    try:
        run.train_loader.load_state_dict(rank_state["data"])
    except ValueError as error:  # a data-stream setting check_resumable does not know
        raise UsageError(f"Cannot resume from {checkpoint}: {error}") from None
    step = trainer_state["step"]
    if run.monitor is not None and trainer_state.get("divergence"):
        run.monitor.load_state_dict(trainer_state["divergence"])
    if not run_is_complete(run, step):
        logger.info("Resumed from %s at optimiser step %d.", checkpoint, step)
        run.metrics_log.event("resumed", step, checkpoint=str(checkpoint))
    return step


def report_complete_run(run: TrainingRun, step: int) -> PretrainingResult:
    """A second run of a finished command: says so and where the backbone is, trains nothing."""
    logger.info(
        "The run in %s is already complete (optimiser step %d of %d); its backbone is in %s. Nothing to "
        "do: pass a larger --max_steps / --epochs to train on, or --overwrite_output_dir to start again.",
        run.output_dir,
        step,
        run.plan.total_steps,
        run.output_dir / BACKBONE_DIRNAME,
    )
    return PretrainingResult(
        run.accelerator, run.unwrapped, step, run.plan.total_steps, None, run.output_dir / BACKBONE_DIRNAME
    )


def start_uploader(training_args: PretrainingArguments, accelerator: Accelerator) -> AsyncHubUploader | None:
    """With --push_to_hub, the main process's background uploader of the exported backbones (retries included)."""
    if not (training_args.push_to_hub and accelerator.is_main_process):
        return None
    return AsyncHubUploader(
        training_args.hub_model_id,
        Path(training_args.output_dir) / ".hub_uploads",
        token=training_args.hub_token,
        private=training_args.hub_private,
        max_attempts=training_args.hub_upload_attempts,
        retry_delay=training_args.hub_retry_delay,
    )


def announce_start(run: TrainingRun, step: int) -> None:
    """The hyperparameters to the trackers, the run's size to the log, a `start` event to metrics.jsonl."""
    accelerator, training_args, plan = run.accelerator, run.training_args, run.plan
    if accelerator.is_main_process and training_args.report_to != "none":
        hyperparameters = {
            **asdict(run.model_args),
            **asdict(run.data_args),
            **training_args.public_dict(),
            **{f"config.{k}": v for k, v in run.config_overrides.items()},
        }
        accelerator.init_trackers(training_args.run_name, config=_tracker_values(hyperparameters))
    logger.info(
        "Training %s on %s: %d optimiser steps (%.2f epochs of %d images), global batch %d = %d processes x %d x %d "
        "accumulation, peak lr %.3g, %d student parameters.",
        run.model_args.preset,
        run.data_args.dataset_name,
        plan.total_steps,
        plan.total_steps / plan.steps_per_epoch,
        run.data_args.samples_per_epoch,
        plan.global_batch_size,
        accelerator.num_processes,
        training_args.per_device_train_batch_size,
        training_args.gradient_accumulation_steps,
        plan.schedule.learning_rate,
        sum(p.numel() for p in run.unwrapped.student.parameters() if p.requires_grad),
    )
    run.metrics_log.event(
        "start", step, total_steps=plan.total_steps, global_batch_size=plan.global_batch_size
    )


def save_checkpoint(run: TrainingRun, step: int) -> Path:
    """A checkpoint of `step` (accelerate state + this process's data position + what resuming checks), marked
    healthy or not by the divergence check. A failed write ends the run; the earlier checkpoints are untouched."""
    trainer_state = {
        "step": step,
        "epoch": step / run.plan.steps_per_epoch,
        "global_batch_size": run.plan.global_batch_size,
        "num_processes": run.accelerator.num_processes,
        "schedule": run.plan.schedule.to_dict(),
        "model_config": config_snapshot(run.config),
        "config_overrides": run.config_overrides,
        "arguments": {**asdict(run.model_args), **asdict(run.data_args), **run.training_args.public_dict()},
        "divergence": run.monitor.state_dict() if run.monitor is not None else None,
    }
    rank_state = {"rank": run.accelerator.process_index, "data": run.train_loader.state_dict()}
    try:
        path = run.checkpoints.save(
            step, trainer_state, rank_state, health=run.monitor.health() if run.monitor is not None else None
        )
    except CheckpointWriteError as error:  # the partial checkpoint is gone, the earlier ones untouched
        run.metrics_log.event("checkpoint_failed", step, error=str(error))
        raise CommandFailure(str(error)) from None
    run.metrics_log.event("checkpoint", step, path=str(path))
    return path


def export(run: TrainingRun, step: int) -> Path | None:
    """The teacher's backbone as a plain ViTModel folder with its model card, queued for upload (main process).
    Draws nothing from the training RNG (export_backbone leaves it as it was), so that a resumed run stays exact."""
    path = None
    if run.accelerator.is_main_process:
        training_args, plan = run.training_args, run.plan
        card = BackboneCardInfo.from_selfpatch_config(
            run.config,
            architecture=run.model_args.preset,
            source="trained",
            **card_training_data(run.data_args.dataset_name),
            epochs=round(step / plan.steps_per_epoch, 4),
            steps=step,
            global_batch_size=plan.global_batch_size,
            learning_rate=plan.schedule.learning_rate,
            repo_id=training_args.hub_model_id if training_args.push_to_hub else None,
        )
        path = export_backbone(
            run.unwrapped, run.output_dir / BACKBONE_DIRNAME, source="teacher", card_info=card
        )
        run.metrics_log.event("export", step, path=str(path))
        if run.uploader is not None:
            run.uploader.submit(
                path, step, commit_message=f"Teacher backbone at step {step} of {plan.total_steps}"
            )
    run.accelerator.wait_for_everyone()
    return path


def _last_healthy(checkpoints: CheckpointManager) -> str:
    """Where to continue from after a failure: the newest checkpoint written while training was healthy."""
    healthy = checkpoints.last_healthy()
    return f"the last healthy checkpoint is {healthy}" if healthy else "there is no healthy checkpoint yet"


# ---- the loop body: step, log, checkpoint, export


def optimiser_step(
    run: TrainingRun, batches: Iterator, values: ScheduleValues, stop_requested: bool
) -> StepResult:
    """`train_step` on the next micro-batches with the schedules' values of this step. A non-finite loss ends the
    run before it reaches the weights, naming the checkpoint to continue from."""
    apply_schedule(run.optimizer, values)
    micro_batches = _take(batches, run.training_args.gradient_accumulation_steps)
    try:
        return train_step(
            run.accelerator,
            run.model,
            run.optimizer,
            micro_batches,
            values,
            run.training_args.clip_grad,
            stop_requested,
            clip_grad_mode=run.training_args.clip_grad_mode,
        )
    except NonFiniteLossError as error:
        run.metrics_log.event("non_finite_loss", error.step, **error.losses)
        raise CommandFailure(
            f"non-finite loss at optimiser step {error.step} (epoch {error.step / run.plan.steps_per_epoch:.2f}; "
            f"{error.losses}); {_last_healthy(run.checkpoints)}. Lower --learning_rate, lengthen --warmup_epochs, "
            "lower --clip_grad or train in fp32, then continue with --resume_from_checkpoint."
        ) from None


def record_skipped_step(run: TrainingRun, step: int, in_a_row: int) -> None:
    """fp16 overflow: the scaler halved its scale and no weight moved; the same schedule step runs again on the
    next batch (selfpatch_hf.training.mixed_precision). Too many in a row end the run."""
    run.metrics_log.event("skipped_step", step, loss_scale=run.accelerator.scaler.get_scale())
    if in_a_row >= MAX_CONSECUTIVE_SKIPPED_STEPS:
        raise CommandFailure(
            f"the fp16 loss scaler skipped {in_a_row} optimiser steps in a row at step {step}: the gradients "
            "are not finite at any scale. Train with --mixed_precision bf16 or no, or lower --learning_rate, then "
            "continue with --resume_from_checkpoint."
        )


def check_divergence(run: TrainingRun, step: int, result: StepResult) -> None:
    """Judges the step before anything is saved, so that a diverging state never becomes a checkpoint: a diverged
    run ends naming the last healthy checkpoint; a suspect step is said once and marks checkpoints unhealthy."""
    if run.monitor is None:
        return
    previous = run.monitor.last.status if run.monitor.last is not None else "ok"
    verdict = run.monitor.update(
        step, result.loss, result.grad_norm, weight_norm(run.unwrapped.student.parameters())
    )
    if verdict.status == "diverged":
        run.metrics_log.event("diverged", step, reasons=verdict.reasons)
        raise CommandFailure(
            f"training diverged at optimiser step {step} ({'; '.join(verdict.reasons)}); "
            f"nothing was saved from this state; {_last_healthy(run.checkpoints)}. Lower "
            "--learning_rate, lengthen --warmup_epochs or lower --clip_grad, then continue with "
            "--resume_from_checkpoint PATH."
        )
    if verdict.status == "suspect" and previous != "suspect":
        logger.warning(
            "Step %d looks unhealthy (%s): checkpoints are marked unhealthy until it passes.",
            step,
            "; ".join(verdict.reasons),
        )


def log_step(
    run: TrainingRun,
    step: int,
    result: StepResult,
    values: ScheduleValues,
    window: WindowMeans,
    progress: tqdm,
    seconds: float,
    skipped_steps: int,
) -> None:
    """The step on the progress bar; every --logging_steps (and at the end) the window's means, the schedules'
    values and the data's skipped images (summed over processes) to metrics.jsonl and the trackers; finished
    uploads to metrics.jsonl."""
    window.add(
        {"loss": result.loss, "image_loss": result.image_loss, "patch_loss": result.patch_loss},
        run.plan.global_batch_size,
        seconds,
    )
    progress.update(1)
    progress.set_postfix(
        loss=f"{result.loss:.4f}",
        img=f"{result.image_loss:.4f}",
        patch="-" if result.patch_loss is None else f"{result.patch_loss:.4f}",
        lr=f"{values.learning_rate:.2e}",
        ips=f"{window.images_per_second or 0:.1f}",
        refresh=False,
    )
    if step % run.training_args.logging_steps == 0 or step == run.plan.total_steps:
        skipped = run.accelerator.reduce(
            torch.tensor(run.train_loader.skipped_images, device=run.accelerator.device), reduction="sum"
        ).item()
        run.metrics_log.metrics(
            step,
            {
                **window.means(),
                "epoch": round(step / run.plan.steps_per_epoch, 6),
                "learning_rate": values.learning_rate,
                "weight_decay": values.weight_decay,
                "teacher_momentum": values.teacher_momentum,
                "teacher_temperature": values.teacher_temperature,
                "images_per_second": window.images_per_second,
                "samples_seen": step * run.plan.global_batch_size,
                "skipped_images": int(skipped),
                "skipped_steps": skipped_steps,  # by the fp16 loss scaler, in this process's run
            },
        )
        window.reset()
    if run.uploader is not None:
        for outcome in run.uploader.poll():
            run.metrics_log.event("upload", outcome.step, status=outcome.status, url=outcome.commit_url)


def checkpoint_when_stopped(run: TrainingRun, step: int, stopped_by: str) -> None:
    """A process got SIGTERM / SIGINT: a checkpoint at once, and how to continue."""
    checkpoint = save_checkpoint(run, step)
    run.metrics_log.event("stopped", step, signal=stopped_by, checkpoint=str(checkpoint))
    logger.warning(
        "Stopped by %s at step %d; checkpoint %s. Continue with --resume_from_checkpoint latest.",
        stopped_by,
        step,
        checkpoint,
    )


def checkpoint_and_export(run: TrainingRun, step: int) -> None:
    """A checkpoint every --checkpointing_steps and at the last step; a backbone export every --export_steps
    (the last step's export is the final one, after the loop)."""
    every = run.training_args.checkpointing_steps
    if (every and step % every == 0) or step == run.plan.total_steps:
        save_checkpoint(run, step)
    every = run.training_args.export_steps
    if every and step % every == 0 and step < run.plan.total_steps:
        export(run, step)


def final_export(run: TrainingRun, step: int) -> Path | None:
    """The last backbone export, then the whole pretraining model (written last: its presence marks a finished
    run)."""
    export_dir = export(run, step)
    if run.accelerator.is_main_process:
        run.unwrapped.save_pretrained(run.output_dir / PRETRAINING_MODEL_DIRNAME)
        apply_default_permissions(run.output_dir / PRETRAINING_MODEL_DIRNAME)
        logger.info("Done: %d steps; teacher backbone in %s", step, export_dir)
    return export_dir


def wait_for_uploads(run: TrainingRun, stopped_by: str | None) -> list[str]:
    """Waits for the pending Hub uploads (at most --hub_upload_timeout; SIGTERM / Ctrl-C end the wait with the same
    report) and reports them. A pre-empted run does not wait: the grace period before SIGKILL is short."""
    uploader = run.uploader
    if uploader is None:
        return []
    if uploader.pending and not stopped_by:
        logger.info(
            "Waiting for the pending Hub upload(s), at most %g s (--hub_upload_timeout)...",
            run.training_args.hub_upload_timeout,
        )
    if stopped_by:
        uploader.finish(0, why_not_waiting=f"not waited for: the run was stopped by {stopped_by}")
    else:
        uploader.finish(run.training_args.hub_upload_timeout)
    upload_report = uploader.report()
    for outcome in uploader.outcomes:
        run.metrics_log.event("upload", outcome.step, status=outcome.status, url=outcome.commit_url)
    for line in upload_report:
        logger.info("Hub upload %s", line)
    return upload_report


def training_loop(run: TrainingRun, global_step: int) -> PretrainingResult:
    """Optimiser steps from `global_step` to the last (step, log, checkpoint, export), or to a stop signal; then
    the final export. The uploads are waited for and reported whatever happened."""
    if run.monitor is not None:
        run.monitor.start(weight_norm(run.unwrapped.student.parameters()))
    total_steps = run.plan.total_steps
    batches = endless_batches(run.train_loader)
    progress = tqdm(
        total=total_steps,
        initial=global_step,
        disable=not run.accelerator.is_main_process,
        desc="pretraining",
    )
    window = WindowMeans()
    skipped_steps = skips_in_a_row = 0
    stopped_by = None
    export_dir = None
    try:
        with StopRequest() as stop, logging_redirect_tqdm():
            while global_step < total_steps:
                started = time.perf_counter()
                values = run.plan.schedule.at(global_step)
                result = optimiser_step(run, batches, values, stop.requested)
                if result.skipped:
                    skipped_steps += 1
                    skips_in_a_row += 1
                    record_skipped_step(run, global_step, skips_in_a_row)
                    continue
                skips_in_a_row = 0
                global_step += 1
                check_divergence(run, global_step, result)
                log_step(
                    run,
                    global_step,
                    result,
                    values,
                    window,
                    progress,
                    time.perf_counter() - started,
                    skipped_steps,
                )
                if result.stop_requested:
                    stopped_by = stop.signal_name or "another process's signal"
                    checkpoint_when_stopped(run, global_step, stopped_by)
                    break
                checkpoint_and_export(run, global_step)
            if stopped_by is None:
                export_dir = final_export(run, global_step)
    finally:
        progress.close()
        upload_report = wait_for_uploads(run, stopped_by)
    run.metrics_log.event(
        "end", global_step, stopped_by=stopped_by, export=str(export_dir) if export_dir else None
    )
    return PretrainingResult(
        run.accelerator,
        run.unwrapped,
        global_step,
        total_steps,
        stopped_by,
        export_dir,
        upload_report,
        uploads_complete=run.uploader is None or run.uploader.complete,
    )


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PretrainingArguments,
    config_overrides: dict[str, Any],
) -> PretrainingResult:
    """One pretraining run, in the order things happen: arguments, accelerator, then the model configuration, data
    and schedules (every mistake in them is found before anything is written), the output folder, model and
    optimiser, the resume, the loop and the final export with its uploads."""
    validate_arguments(data_args, training_args)
    limit_hub_requests(training_args)
    accelerator = create_accelerator(training_args)

    config = build_config(model_args, config_overrides)
    training_args.apply_objective_defaults(config)  # unset options: the objective's defaults
    dataset, image_column = open_image_stream(data_args, training_args)
    train_loader = build_dataloader(dataset, image_column, data_args, training_args, config, accelerator)
    plan, checkpoints = plan_steps(accelerator, data_args, training_args)

    configure_cpu_training(accelerator, data_args, training_args)
    prepare_output_dir(accelerator, training_args)
    metrics_log = MetricsLog(accelerator, Path(training_args.output_dir))

    model, optimizer = build_model_and_optimizer(accelerator, config, training_args)
    run = TrainingRun(
        accelerator,
        model_args,
        data_args,
        training_args,
        config_overrides,
        config,
        train_loader,
        plan,
        checkpoints,
        metrics_log,
        model,
        optimizer,
        unwrapped=accelerator.unwrap_model(model),
        monitor=DivergenceMonitor() if training_args.divergence_check else None,
    )

    global_step = resume(run)
    if run_is_complete(run, global_step):
        return report_complete_run(run, global_step)
    run.uploader = start_uploader(training_args, accelerator)
    announce_start(run, global_step)
    return training_loop(run, global_step)


def run(argv: list[str] | None = None) -> int:
    result = train(*parse_arguments(argv))
    result.accelerator.end_training()
    if result.stopped_by is not None:
        return 128 + {"SIGTERM": 15, "SIGINT": 2}.get(result.stopped_by, 15)
    if not result.uploads_complete:
        print(
            f"{PROG}: training finished, but its last export did not reach the Hub; the snapshots that are not on "
            "the Hub are kept (see the upload report above): push them with the `hf upload` command given there "
            "instead of training again.",
            file=sys.stderr,
        )
        return UPLOADS_INCOMPLETE
    return 0


def main(argv: list[str] | None = None) -> int:
    """The script's exit status: 0 done, 2 wrong arguments, 1 failed, 3 trained but the last export is not on the
    Hub (docs/reliability.md), 128 + signal when pre-empted."""
    return run_command(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
