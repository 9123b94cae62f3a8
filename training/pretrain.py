#!/usr/bin/env python
r"""Pretrain a SelfPatch (or plain DINO, or MoBY) backbone with Accelerate on streamed images, and publish it.

    accelerate launch training/pretrain.py training/configs/selfpatch_vit_small_imagenet.yaml
    accelerate launch --num_processes 8 training/pretrain.py RECIPE.yaml --output_dir runs/vits16 \
        --push_to_hub --hub_model_id me/selfpatch-vits16
    python training/pretrain.py --preset vit-tiny-patch16 --global_crop_size 96 \
        --dataset_name offline-sample --max_steps 20 --output_dir runs/demo
    accelerate launch training/pretrain.py RECIPE.yaml --resume_from_checkpoint latest

A recipe file (YAML or JSON, the first argument) sets any option below; options given on the command line after it
override the file. `config_overrides` sets any field of `SelfPatchConfig` or of the backbone's `ViTConfig`
(`key=value` pairs on the command line, a mapping in a recipe file; both merge, the command line winning). The
options left unset take the image objective's recipe (selfpatch_hf.models.selfpatch.recipes).

The run writes into `--output_dir`: `metrics.jsonl` (and tracker logs under `logs/`), `checkpoints/checkpoint-<step>`
(accelerate state + per-process data positions, written atomically), `backbone/` (the teacher's backbone as a plain
`ViTModel` with image processor and model card, loadable with `AutoModel.from_pretrained`) and, at the end,
`pretraining_model/` (the whole `SelfPatchForPretraining`) and `run_complete.json` (their manifest: the run is
complete). Schedules are defined per optimiser step of the GLOBAL batch (processes x per-device batch x
accumulation); see `selfpatch_hf.training.schedules` and docs/method.md section 10. Running the same command again
with `--resume_from_checkpoint latest` continues an interrupted run, or reports a finished one.
"""

from __future__ import annotations

import sys

from selfpatch_hf.cli.errors import CommandFailure, UsageError, run_command
from selfpatch_hf.training.arguments.pretraining import (
    OFFLINE_SAMPLE,
    DataArguments,
    ModelArguments,
    PretrainingArguments,
    build_config,
    card_training_data,
    one_line_message,
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from huggingface_hub.errors import StrictDataclassError
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining, export_backbone
from selfpatch_hf.atomic_folders import staged_folder
from selfpatch_hf.data.augmentation import MultiCropAugmentation
from selfpatch_hf.data.streaming import MultiCropDataLoader, load_image_stream
from selfpatch_hf.hub.cards.backbone import BackboneCardInfo
from selfpatch_hf.models.selfpatch.modeling import sync_batch_norm
from selfpatch_hf.models.selfpatch.recipes import CropRecipe
from selfpatch_hf.training.checkpointing import CheckpointManager, DamagedCheckpointError
from selfpatch_hf.training.compilation import compile_for_training
from selfpatch_hf.training.cuda_setup import adamw_kwargs, ddp_kwargs
from selfpatch_hf.training.divergence import (
    DivergenceMonitor,
    check_divergence,
    non_finite_loss_message,
    weight_norm,
)
from selfpatch_hf.training.loop import (
    NonFiniteLossError,
    StepResult,
    endless_batches,
    take_batches,
    train_step,
)
from selfpatch_hf.training.metrics_log import MetricsLog, WindowMeans
from selfpatch_hf.training.mixed_precision import record_scaler_skip
from selfpatch_hf.training.optimization import apply_schedule, build_optimizer
from selfpatch_hf.training.output_folder import completed_step, record_complete, write_final_folder
from selfpatch_hf.training.preemption import StopRequest
from selfpatch_hf.training.resume import check_resumable, config_snapshot
from selfpatch_hf.training.runtime import (
    configure_host,
    create_accelerator,
    enable_activation_checkpointing,
    exit_status,
    init_trackers,
    limit_hub_requests,
    output_folder,
    record_uploads,
    save_checkpoint,
    start_uploader,
    wait_for_uploads,
)
from selfpatch_hf.training.schedules import PretrainingSchedule, optimizer_steps_per_epoch

logger = logging.getLogger(__name__)

BACKBONE_DIRNAME = "backbone"
PRETRAINING_MODEL_DIRNAME = "pretraining_model"
FINAL_ARTEFACTS = (BACKBONE_DIRNAME, PRETRAINING_MODEL_DIRNAME)  # recorded in run_complete.json, written last
# library objects check their own settings; their ValueErrors are argument mistakes of this script
LIBRARY_ARGUMENT_ERRORS = (ValueError, TypeError, StrictDataclassError)


@dataclass
class PretrainingResult:
    """What `train` leaves behind (the accelerator and model are still alive: `run` ends the run)."""

    accelerator: Any
    model: SelfPatchForPretraining  # unwrapped
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


# ---------------------------------------------------------------------------------------------------------------------
# The run, top to bottom
# ---------------------------------------------------------------------------------------------------------------------


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PretrainingArguments,
    config_overrides: dict[str, Any],
) -> PretrainingResult:
    """One pretraining run: arguments, accelerator, then the model configuration, data and schedules (every
    mistake in them is found before anything is written), the output folder (held by this run), model and
    optimiser, the resume, the loop, the final artefacts and the uploads."""
    validate_arguments(data_args, training_args)
    limit_hub_requests(training_args)
    accelerator = create_accelerator(
        training_args,
        # DDP broadcasts no buffers: the centres are all-reduced inside forward (on CUDA also bucket views)
        ddp_kwargs(
            "cpu" if training_args.cpu or not torch.cuda.is_available() else "cuda",
            training_args.gradient_accumulation_steps,
        ),
    )
    config, crops = build_config(model_args, data_args, training_args, config_overrides)
    dataset, image_column = open_image_stream(data_args, training_args)
    train_loader = build_dataloader(dataset, image_column, crops, data_args, training_args, accelerator)
    plan = plan_steps(accelerator, data_args, training_args)
    check_moby_queue(config, accelerator, training_args)
    configure_host(accelerator, training_args, data_args.num_workers)

    with output_folder(accelerator, training_args, FINAL_ARTEFACTS) as output_dir:
        metrics_log = MetricsLog(accelerator, output_dir)
        checkpoints = CheckpointManager(accelerator, output_dir, training_args.checkpoints_total_limit)
        model, optimizer = build_model_and_optimizer(accelerator, config, training_args)
        unwrapped = accelerator.unwrap_model(model)
        monitor = DivergenceMonitor() if training_args.divergence_check else None

        global_step, resumed_from = resume(
            accelerator, checkpoints, training_args, plan, config, crops, data_args, train_loader, monitor
        )
        if global_step >= plan.total_steps and completed_step(output_dir, FINAL_ARTEFACTS) is not None:
            return report_complete_run(accelerator, unwrapped, output_dir, global_step, plan)
        if resumed_from is not None:
            logger.info("Resumed from %s at optimiser step %d.", resumed_from, global_step)
            metrics_log.event("resumed", global_step, checkpoint=str(resumed_from))
        uploader = start_uploader(training_args, accelerator)
        init_trackers(
            accelerator,
            training_args,
            {
                **asdict(model_args),
                **asdict(data_args),
                **training_args.public_dict(),
                **{f"config.{k}": v for k, v in config_overrides.items()},
            },
        )
        announce_start(
            accelerator, model_args, data_args, training_args, plan, unwrapped, metrics_log, global_step
        )

        def checkpoint(step: int) -> Path:
            """A checkpoint of `step` with what resuming checks, marked healthy or not by the divergence check."""
            trainer_state = {
                "step": step,
                "epoch": step / plan.steps_per_epoch,
                "global_batch_size": plan.global_batch_size,
                "num_processes": accelerator.num_processes,
                "schedule": plan.schedule.to_dict(),
                "model_config": config_snapshot(config),
                "crop_recipe": crops.to_dict(),
                "config_overrides": config_overrides,
                "arguments": {**asdict(model_args), **asdict(data_args), **training_args.public_dict()},
                "divergence": monitor.state_dict() if monitor is not None else None,
            }
            rank_state = {"rank": accelerator.process_index, "data": train_loader.state_dict()}
            health = monitor.health() if monitor is not None else None
            return save_checkpoint(checkpoints, metrics_log, step, trainer_state, rank_state, health)

        def export(step: int) -> Path:
            """The teacher's backbone with its model card, written whole and queued for upload."""
            card = backbone_card(config, crops, model_args, data_args, training_args, plan, step)
            message = f"Teacher backbone at step {step} of {plan.total_steps}"
            return export_teacher(
                accelerator,
                unwrapped,
                output_dir / BACKBONE_DIRNAME,
                step,
                card,
                crops,
                metrics_log,
                uploader,
                message,
            )

        # ---- the loop: step, judge, log, checkpoint, export
        if monitor is not None:
            monitor.start(weight_norm(unwrapped.student.parameters()))
        batches = endless_batches(train_loader)
        progress = tqdm(
            total=plan.total_steps,
            initial=global_step,
            disable=not accelerator.is_main_process,
            desc="pretraining",
        )
        window = WindowMeans()
        skipped_steps = skips_in_a_row = 0
        stopped_by = export_dir = None
        try:
            with StopRequest() as stop, logging_redirect_tqdm():
                while global_step < plan.total_steps:
                    started = time.perf_counter()
                    values = plan.schedule.at(global_step)
                    apply_schedule(optimizer, values)
                    try:
                        result = train_step(
                            accelerator,
                            model,
                            optimizer,
                            take_batches(batches, training_args.gradient_accumulation_steps),
                            values,
                            training_args.clip_grad,
                            stop.requested,
                            clip_grad_mode=training_args.clip_grad_mode,
                        )
                    except NonFiniteLossError as error:
                        metrics_log.event("non_finite_loss", error.step, **error.losses)
                        raise CommandFailure(
                            non_finite_loss_message(
                                error.step, error.losses, plan.steps_per_epoch, checkpoints
                            )
                        ) from None
                    if result.skipped:  # fp16 overflow: nothing moved; the same schedule step runs again
                        skipped_steps, skips_in_a_row = skipped_steps + 1, skips_in_a_row + 1
                        record_scaler_skip(accelerator, metrics_log, global_step, skips_in_a_row)
                        continue
                    skips_in_a_row = 0
                    global_step += 1
                    check_divergence(
                        monitor,
                        unwrapped.student,
                        metrics_log,
                        checkpoints,
                        global_step,
                        result.loss,
                        result.grad_norm,
                    )
                    window.add(
                        {
                            "loss": result.loss,
                            "image_loss": result.image_loss,
                            "patch_loss": result.patch_loss,
                        },
                        plan.global_batch_size,
                        time.perf_counter() - started,
                    )
                    show_progress(progress, result, values.learning_rate, window)
                    if global_step % training_args.logging_steps == 0 or global_step == plan.total_steps:
                        log_metrics(
                            accelerator,
                            metrics_log,
                            train_loader,
                            plan,
                            global_step,
                            values,
                            window,
                            skipped_steps,
                        )
                    record_uploads(uploader, metrics_log)
                    if result.stop_requested or global_step == plan.total_steps:
                        progress.close()  # the bar's last state once, before the final lines are logged
                    if result.stop_requested:  # SIGTERM / SIGINT on any process: a checkpoint at once
                        stopped_by = stop.signal_name or "another process's signal"
                        path = checkpoint(global_step)
                        metrics_log.event("stopped", global_step, signal=stopped_by, checkpoint=str(path))
                        logger.warning(
                            "Stopped by %s at step %d; checkpoint %s. Continue with --resume_from_checkpoint latest.",
                            stopped_by,
                            global_step,
                            path,
                        )
                        break
                    every = training_args.checkpointing_steps
                    if (every and global_step % every == 0) or global_step == plan.total_steps:
                        checkpoint(global_step)
                    every = training_args.export_steps
                    if every and global_step % every == 0 and global_step < plan.total_steps:
                        export(global_step)
                if stopped_by is None:
                    export_dir = write_final_artefacts(
                        accelerator, unwrapped, output_dir, global_step, export
                    )
        finally:
            progress.close()
            batches.close()  # the data workers end now, not at the interpreter's exit
            upload_report = wait_for_uploads(uploader, training_args, stopped_by, metrics_log)
        metrics_log.event(
            "end", global_step, stopped_by=stopped_by, export=str(export_dir) if export_dir else None
        )
        return PretrainingResult(
            accelerator,
            unwrapped,
            global_step,
            plan.total_steps,
            stopped_by,
            export_dir,
            upload_report,
            uploads_complete=uploader is None or uploader.complete,
        )


def run(argv: list[str] | None = None) -> int:
    result = train(*parse_arguments(argv))
    result.accelerator.end_training()
    return exit_status(PROG, result.stopped_by, result.uploads_complete, "its last export")


def main(argv: list[str] | None = None) -> int:
    """The script's exit status: 0 done, 2 wrong arguments, 1 failed, 3 trained but the last export is not on the
    Hub (docs/reliability.md), 128 + signal when pre-empted."""
    return run_command(PROG, run, argv)


# ---------------------------------------------------------------------------------------------------------------------
# The steps `train` names, in the order it takes them
# ---------------------------------------------------------------------------------------------------------------------


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
    crops: CropRecipe,
    data_args: DataArguments,
    training_args: PretrainingArguments,
    accelerator,
) -> MultiCropDataLoader:
    """This process's stream of multi-crop batches. Each process reads its own part of the data; the loader is not
    passed through `accelerator.prepare`, whose default for iterable datasets would make rank 0 read for everyone."""
    try:
        return MultiCropDataLoader(
            dataset,
            image_column,
            MultiCropAugmentation.from_recipe(crops),
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
        raise UsageError(one_line_message(error)) from None


def plan_steps(accelerator, data_args: DataArguments, training_args: PretrainingArguments) -> StepPlan:
    """The global batch, the run's length and its schedules; a setting that cannot work is an argument mistake
    naming the batch arithmetic, found before anything is written."""
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
    except ValueError as error:
        raise UsageError(
            f"{error} (samples_per_epoch {data_args.samples_per_epoch}, global batch {global_batch_size} = "
            f"{accelerator.num_processes} processes x {training_args.per_device_train_batch_size} per device x "
            f"{training_args.gradient_accumulation_steps} accumulation steps)"
        ) from None
    return StepPlan(global_batch_size, steps_per_epoch, total_steps, schedule)


def check_moby_queue(config: SelfPatchConfig, accelerator, training_args: PretrainingArguments) -> None:
    """MoBY writes every forward's keys, gathered from all processes, into its queues: a queue smaller than that
    batch fails in the first step, so it is an argument mistake said before anything is written."""
    keys = accelerator.num_processes * training_args.per_device_train_batch_size
    if config.image_objective == "moby" and config.moby_queue_size < keys:
        raise UsageError(
            f"moby_queue_size={config.moby_queue_size} is smaller than the {keys} keys each step writes into it "
            f"({accelerator.num_processes} processes x {training_args.per_device_train_batch_size} per device): "
            "raise moby_queue_size (config_overrides) to at least that, or lower --per_device_train_batch_size."
        )


def build_model_and_optimizer(accelerator, config: SelfPatchConfig, training_args: PretrainingArguments):
    """The model and its AdamW, prepared by the accelerator. The same seed on every process gives the same initial
    weights; afterwards each process gets its own seed, so that drop-path masks differ between processes."""
    set_seed(training_args.seed)
    model = SelfPatchForPretraining(config)
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


def resume(
    accelerator,
    checkpoints: CheckpointManager,
    training_args: PretrainingArguments,
    plan: StepPlan,
    config: SelfPatchConfig,
    crops: CropRecipe,
    data_args: DataArguments,
    train_loader: MultiCropDataLoader,
    monitor: DivergenceMonitor | None,
) -> tuple[int, Path | None]:
    """Loads the checkpoint named by --resume_from_checkpoint (weights, optimiser, RNGs, data positions, divergence
    history) after checking it belongs to this model and run; returns the optimiser step to continue from (0: no
    checkpoint yet) and the checkpoint. A damaged checkpoint is a failure; a missing or foreign one an argument
    mistake."""
    which = training_args.checkpoint_to_resume()
    if not which:
        return 0, None
    try:
        path = checkpoints.resolve(which)
        loaded = checkpoints.load(path) if path is not None else None
    except DamagedCheckpointError as error:  # its files do not match its manifest: a failure, not usage
        raise CommandFailure(f"Cannot resume: {error}") from None
    except (FileNotFoundError, ValueError) as error:  # no such checkpoint, or not one of this model/run
        raise UsageError(f"Cannot resume: {error}") from None
    if loaded is None:
        logger.info("No checkpoint in %s yet: starting from scratch.", checkpoints.directory)
        return 0, None
    trainer_state, rank_state = loaded
    check_resumable(
        trainer_state,
        path,
        global_batch_size=plan.global_batch_size,
        arguments={**asdict(data_args), **asdict(training_args)},
        model_config=config_snapshot(config),
        crop_recipe=crops.to_dict(),
    )
    changed = plan.schedule.differences(PretrainingSchedule.from_dict(trainer_state["schedule"]))
    if changed:
        logger.warning("Schedules differ from the checkpoint's (now, saved): %s", changed)
    try:
        train_loader.load_state_dict(rank_state["data"])
    except ValueError as error:  # a data-stream setting check_resumable does not know
        raise UsageError(f"Cannot resume from {path}: {error}") from None
    if monitor is not None and trainer_state.get("divergence"):
        monitor.load_state_dict(trainer_state["divergence"])
    return trainer_state["step"], path


def report_complete_run(
    accelerator, unwrapped, output_dir: Path, step: int, plan: StepPlan
) -> PretrainingResult:
    """A second run of a finished command: says so and where the backbone is, trains nothing."""
    logger.info(
        "The run in %s is already complete (optimiser step %d of %d); its backbone is in %s. Nothing to "
        "do: pass a larger --max_steps / --epochs to train on, or --overwrite_output_dir to start again.",
        output_dir,
        step,
        plan.total_steps,
        output_dir / BACKBONE_DIRNAME,
    )
    return PretrainingResult(
        accelerator, unwrapped, step, plan.total_steps, None, output_dir / BACKBONE_DIRNAME
    )


def announce_start(
    accelerator,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PretrainingArguments,
    plan: StepPlan,
    unwrapped: SelfPatchForPretraining,
    metrics_log: MetricsLog,
    step: int,
) -> None:
    """The run's size to the log, a `start` event to metrics.jsonl."""
    logger.info(
        "Training %s on %s: %d optimiser steps (%.2f epochs of %d images), global batch %d = %d processes x %d x %d "
        "accumulation, peak lr %.3g, %d student parameters.",
        model_args.preset,
        data_args.dataset_name,
        plan.total_steps,
        plan.total_steps / plan.steps_per_epoch,
        data_args.samples_per_epoch,
        plan.global_batch_size,
        accelerator.num_processes,
        training_args.per_device_train_batch_size,
        training_args.gradient_accumulation_steps,
        plan.schedule.learning_rate,
        sum(p.numel() for p in unwrapped.student.parameters() if p.requires_grad),
    )
    metrics_log.event("start", step, total_steps=plan.total_steps, global_batch_size=plan.global_batch_size)


def show_progress(progress: tqdm, result: StepResult, learning_rate: float, window: WindowMeans) -> None:
    progress.update(1)
    progress.set_postfix(
        loss=f"{result.loss:.4f}",
        img=f"{result.image_loss:.4f}",
        patch="-" if result.patch_loss is None else f"{result.patch_loss:.4f}",
        lr=f"{learning_rate:.2e}",
        ips=f"{window.images_per_second or 0:.1f}",
        refresh=False,
    )


def log_metrics(
    accelerator,
    metrics_log: MetricsLog,
    train_loader: MultiCropDataLoader,
    plan: StepPlan,
    step: int,
    values,
    window: WindowMeans,
    skipped_steps: int,
) -> None:
    """The window's means, the schedules' values and the data's skipped images (summed over processes) to
    metrics.jsonl and the trackers."""
    skipped = accelerator.reduce(
        torch.tensor(train_loader.skipped_images, device=accelerator.device), reduction="sum"
    ).item()
    metrics_log.metrics(
        step,
        {
            **window.means(),
            "epoch": round(step / plan.steps_per_epoch, 6),
            "learning_rate": values.learning_rate,
            "weight_decay": values.weight_decay,
            "teacher_momentum": values.teacher_momentum,
            "teacher_temperature": values.teacher_temperature,
            "images_per_second": window.images_per_second,
            "samples_seen": step * plan.global_batch_size,
            "skipped_images": int(skipped),
            "skipped_steps": skipped_steps,  # by the fp16 loss scaler, in this process's run
        },
    )
    window.reset()


def backbone_card(
    config: SelfPatchConfig,
    crops: CropRecipe,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PretrainingArguments,
    plan: StepPlan,
    step: int,
) -> BackboneCardInfo:
    """The exported backbone's model card: architecture, method, crop recipe, data and training so far."""
    return BackboneCardInfo.from_selfpatch_config(
        config,
        architecture=model_args.preset,
        source="trained",
        **crops.card_fields(),
        **card_training_data(data_args.dataset_name),
        epochs=round(step / plan.steps_per_epoch, 4),
        steps=step,
        global_batch_size=plan.global_batch_size,
        learning_rate=plan.schedule.learning_rate,
        repo_id=training_args.hub_model_id if training_args.push_to_hub else None,
    )


def export_teacher(
    accelerator,
    unwrapped: SelfPatchForPretraining,
    path: Path,
    step: int,
    card: BackboneCardInfo,
    crops: CropRecipe,
    metrics_log: MetricsLog,
    uploader,
    commit_message: str,
) -> Path:
    """The teacher's backbone as a plain ViTModel / SwinModel folder (main process), written staged (its image
    processor at the global crop size) and queued for upload. Draws nothing from the training RNG (export_backbone
    leaves it as it was), so that a resumed run stays exact."""
    if accelerator.is_main_process:
        write_final_folder(
            path,
            f"the teacher backbone of step {step}",
            lambda: export_backbone(
                unwrapped, path, source="teacher", card_info=card, image_size=crops.global_crop_size
            ),
        )
        metrics_log.event("export", step, path=str(path))
        if uploader is not None:
            uploader.submit(path, step, commit_message=commit_message)
    accelerator.wait_for_everyone()
    return path


def write_final_artefacts(accelerator, unwrapped, output_dir: Path, step: int, export) -> Path | None:
    """The last backbone export, the whole pretraining model, then the completion record (their manifest): a run
    is complete only when both are there and whole."""
    export_dir = export(step)
    if accelerator.is_main_process:
        target = output_dir / PRETRAINING_MODEL_DIRNAME

        def save() -> None:
            with staged_folder(target) as staging:
                unwrapped.save_pretrained(staging)

        write_final_folder(target, "the pretraining model", save)
        record_complete(output_dir, step, FINAL_ARTEFACTS)
        logger.info("Done: %d steps; teacher backbone in %s", step, export_dir)
    accelerator.wait_for_everyone()
    return export_dir


if __name__ == "__main__":
    sys.exit(main())
