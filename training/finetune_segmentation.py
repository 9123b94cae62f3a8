#!/usr/bin/env python
"""Fine-tune a SelfPatch / DINO ViT backbone for semantic segmentation (UperNet) with Accelerate, and save a
transformers model folder that `AutoModelForSemanticSegmentation` and `pipeline("image-segmentation")` load.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 training/finetune_segmentation.py \\
        training/configs/segmentation_ade20k_vit_small.yaml --backbone runs/selfpatch-vits16/backbone
    python training/finetune_segmentation.py training/configs/segmentation_offline.yaml   # a few minutes, CPU
    accelerate launch training/finetune_segmentation.py RECIPE.yaml --resume_from_checkpoint latest

A recipe file (YAML or JSON, the first argument) sets any option below; options after it override the file.

The data is any `datasets` dataset with an image and a mask column (`scene_parse_150` is ADE20K: pass
--reduce_labels; `offline-scenes` is the synthetic set of selfpatch_hf.data.samples.synthetic_scenes). Training follows
mmsegmentation's ADE20K recipe (random rescale 0.5-2x, crop, flip, photometric distortion; AdamW with optional
layer-wise learning-rate decay; linear warm-up then poly or cosine decay, per iteration). The head is transformers'
UperNet on the backbone's selected blocks (the paper used a Semantic FPN in mmsegmentation, which transformers lacks).

The run writes into --output_dir: `metrics.jsonl` (and tracker logs under `logs/`), `checkpoints/checkpoint-<step>`
(accelerate state, written atomically; resuming continues the same batch order and crops) and, at the end, `model/`:
UperNet + backbone + the image processor the evaluation used (resize into --scale keeping the aspect ratio,
normalise: `pipeline("image-segmentation")` reproduces the whole-image evaluation) + a model card with its mIoU /
mAcc / aAcc, then `run_complete.json` (the run is complete).
"""

from __future__ import annotations

import sys

from selfpatch_hf.cli.errors import CommandFailure, UsageError, run_command
from selfpatch_hf.training.arguments.segmentation import (
    RANDOM_BACKBONE_PREFIX,
    SegmentationDataArguments,
    SegmentationModelArguments,
    SegmentationTrainingArguments,
    parse_finetuning_arguments,
)

PROG = "finetune_segmentation.py"


def parse_arguments(argv: list[str] | None = None):
    """`(model_args, data_args, training_args)` of `[RECIPE.yaml] [--option value ...]`, checked."""
    return parse_finetuning_arguments(list(sys.argv[1:] if argv is None else argv), description=__doc__)


def check_arguments(argv: list[str] | None = None) -> None:
    """Parses and checks the arguments, nothing else: `--help` and argument mistakes are answered here."""
    parse_arguments(argv)


if __name__ == "__main__":
    # answer --help and argument mistakes before the imports below load torch, transformers and datasets (seconds)
    if status := run_command(PROG, check_arguments):
        sys.exit(status)

# ruff: noqa: E402 -- the heavy imports come after that early answer
import copy
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from selfpatch_hf.atomic_folders import staged_folder
from selfpatch_hf.data.segmentation.augmentation import SegmentationTrainTransform, prepare_mask
from selfpatch_hf.data.segmentation.loading import (
    OFFLINE_SCENES,
    ExampleProblem,
    SegmentationBatchSampler,
    SegmentationDataError,
    SegmentationEvalSet,
    SegmentationTrainSet,
    SkippedExample,
    check_evaluation_masks,
    check_label_range,
    collate_segmentation,
    find_columns,
    label_names,
    load_segmentation_splits,
)
from selfpatch_hf.evaluation.segmentation_inference import evaluate_segmentation
from selfpatch_hf.evaluation.semseg_metrics import MaskValueError
from selfpatch_hf.hub.cards.segmentation import SegmentationCardInfo, write_segmentation_card
from selfpatch_hf.models.dense.backbones import random_vit
from selfpatch_hf.models.dense.heads import build_segmentation_image_processor, build_upernet
from selfpatch_hf.training.checkpointing import CheckpointManager
from selfpatch_hf.training.finetuning_optimization import (
    FinetuningSchedule,
    apply_learning_rate,
    build_finetuning_optimizer,
)
from selfpatch_hf.training.finetuning_run import resume_step, single_thread_worker, started_with_workers
from selfpatch_hf.training.metrics_log import MetricsLog
from selfpatch_hf.training.output_folder import completed_step, record_complete, write_final_folder
from selfpatch_hf.training.preemption import StopRequest
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

MODEL_DIRNAME = "model"
FINAL_ARTEFACTS = (MODEL_DIRNAME,)  # recorded in run_complete.json, written last
logger = logging.getLogger("finetune_segmentation")


@dataclass
class FinetuningResult:
    accelerator: Any
    model: Any
    global_step: int
    scores: dict[str, float] | None
    model_dir: Path | None
    stopped_by: str | None
    upload_report: list[str]
    uploads_complete: bool = True  # False: --push_to_hub, but the model is not on the Hub


# ---------------------------------------------------------------------------------------------------------------------
# The run, top to bottom
# ---------------------------------------------------------------------------------------------------------------------


def train(
    model_args: SegmentationModelArguments,
    data_args: SegmentationDataArguments,
    training_args: SegmentationTrainingArguments,
) -> FinetuningResult:
    """One fine-tuning run: accelerator, data and model (every mistake in them is found before anything is
    written), the output folder (held by this run), the resume, the loop, the evaluation, the final model and its
    upload."""
    limit_hub_requests(training_args)
    # blocks after the last selected one get no gradient: tell DDP (see below)
    accelerator = create_accelerator(training_args, {"find_unused_parameters": False})
    configure_host(accelerator, training_args, data_args.num_workers)

    # ---- data, model, optimiser, schedule (the same seed on every process gives the same initial heads)
    train_set, eval_set, image_column, mask_column, names = load_data(data_args, training_args, accelerator)
    processor = evaluation_processor(data_args)
    set_seed(training_args.seed)
    model = build_model(model_args, data_args, names)
    backbone_class = type(model.backbone).__name__
    num_layers = model.backbone.config.num_hidden_layers
    if training_args.gradient_checkpointing:
        enable_activation_checkpointing(model.backbone)
    if training_args.sync_batch_norm and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    if max(model.backbone.config.out_indices) < num_layers:  # later blocks get no gradient
        accelerator.ddp_handler.find_unused_parameters = True
    optimizer = build_finetuning_optimizer(
        model, training_args.weight_decay, training_args.layer_decay, num_layers
    )
    schedule = FinetuningSchedule(
        learning_rate=training_args.learning_rate,
        total_steps=training_args.max_steps,
        warmup_steps=training_args.warmup_steps,
        warmup_ratio=training_args.warmup_ratio,
        kind=training_args.lr_scheduler,
        power=training_args.poly_power,
        min_learning_rate=training_args.min_learning_rate,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    set_seed(training_args.seed, device_specific=True)  # drop-path masks differ between processes
    global_batch_size = (
        accelerator.num_processes
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
    )

    with output_folder(accelerator, training_args, FINAL_ARTEFACTS) as output_dir:
        metrics_log = MetricsLog(accelerator, output_dir)
        checkpoints = CheckpointManager(accelerator, output_dir, training_args.checkpoints_total_limit)
        global_step, resumed_from = resume_step(checkpoints, training_args, global_batch_size)
        if global_step >= training_args.max_steps and completed_step(output_dir, FINAL_ARTEFACTS) is not None:
            logger.info(
                "The run in %s is already complete (step %d of %d); its model is in %s. Nothing to do: pass a "
                "larger --max_steps to train on, or --overwrite_output_dir to start again.",
                output_dir,
                global_step,
                training_args.max_steps,
                output_dir / MODEL_DIRNAME,
            )
            return FinetuningResult(
                accelerator, unwrapped, global_step, None, output_dir / MODEL_DIRNAME, None, []
            )
        if resumed_from is not None:
            metrics_log.event("resumed", global_step, checkpoint=str(resumed_from))
            logger.info("Resumed from %s at step %d.", resumed_from, global_step)
        uploader = start_uploader(training_args, accelerator)
        init_trackers(
            accelerator,
            training_args,
            {**asdict(model_args), **asdict(data_args), **training_args.public_dict()},
        )

        def checkpoint(step: int) -> Path:
            trainer_state = {
                "step": step,
                "global_batch_size": global_batch_size,
                "num_processes": accelerator.num_processes,
                "arguments": {**asdict(model_args), **asdict(data_args), **training_args.public_dict()},
            }
            return save_checkpoint(
                checkpoints, metrics_log, step, trainer_state, {"rank": accelerator.process_index}
            )

        def run_evaluation(step: int) -> dict[str, float] | None:
            if eval_set is None:
                return None
            started = time.perf_counter()
            scores = evaluate(
                model,
                eval_set,
                (image_column, mask_column),
                processor,
                data_args,
                training_args,
                accelerator,
                names,
            )
            metrics_log.metrics(step, {f"eval_{key}": value for key, value in scores.items()})
            logger.info(
                "Step %d: mIoU %.2f, mAcc %.2f, aAcc %.2f (%.0f s)",
                step,
                100 * scores["mean_iou"],
                100 * scores["mean_accuracy"],
                100 * scores["overall_accuracy"],
                time.perf_counter() - started,
            )
            return scores

        batches, batches_per_epoch = train_batches(
            train_set,
            image_column,
            mask_column,
            data_args,
            training_args,
            accelerator,
            global_step,
            len(names),
        )
        logger.info(
            "Fine-tuning %s (%s, %d blocks, out_indices %s) on %s: %d steps of %d images (%.1f epochs of %d), peak "
            "lr %g.",
            model_args.backbone,
            backbone_class,
            num_layers,
            unwrapped.backbone.config.out_indices,
            data_args.dataset_name,
            training_args.max_steps,
            global_batch_size,
            training_args.max_steps * training_args.gradient_accumulation_steps / batches_per_epoch,
            len(train_set),
            training_args.learning_rate,
        )
        metrics_log.event(
            "start", global_step, total_steps=training_args.max_steps, global_batch_size=global_batch_size
        )

        # ---- the loop
        progress = tqdm(
            total=training_args.max_steps,
            initial=global_step,
            disable=not accelerator.is_main_process,
            desc="fine-tuning",
        )
        scores = model_dir = stopped_by = None
        window_loss, window_steps, window_started = 0.0, 0, time.perf_counter()
        try:
            with StopRequest() as stop:
                while global_step < training_args.max_steps:
                    learning_rate = schedule.at(global_step)
                    apply_learning_rate(optimizer, learning_rate)
                    step_loss = torch.zeros((), device=accelerator.device)
                    for _ in range(training_args.gradient_accumulation_steps):
                        batch = next(batches)
                        with accelerator.accumulate(model), accelerator.autocast():
                            loss = model(**batch).loss
                            accelerator.backward(loss)
                            if accelerator.sync_gradients and training_args.max_grad_norm > 0:
                                accelerator.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                        step_loss += loss.detach() / training_args.gradient_accumulation_steps
                    step_loss = accelerator.reduce(step_loss, reduction="mean").item()
                    if not math.isfinite(step_loss):
                        raise CommandFailure(
                            f"non-finite loss at step {global_step}: lower --learning_rate, lengthen --warmup_steps "
                            "or train in fp32, then continue with --resume_from_checkpoint."
                        )
                    global_step += 1
                    window_loss, window_steps = window_loss + step_loss, window_steps + 1
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{learning_rate:.2e}", refresh=False)

                    if (
                        global_step % training_args.logging_steps == 0
                        or global_step == training_args.max_steps
                    ):
                        elapsed = time.perf_counter() - window_started
                        metrics_log.metrics(
                            global_step,
                            {
                                "loss": window_loss / window_steps,
                                "learning_rate": learning_rate,
                                "epoch": round(
                                    global_step
                                    * training_args.gradient_accumulation_steps
                                    / batches_per_epoch,
                                    4,
                                ),
                                "images_per_second": window_steps * global_batch_size / elapsed
                                if elapsed
                                else None,
                            },
                        )
                        window_loss, window_steps, window_started = 0.0, 0, time.perf_counter()
                    record_uploads(uploader, metrics_log)
                    stop_now = accelerator.reduce(
                        torch.tensor(float(stop.requested), device=accelerator.device), reduction="sum"
                    ).item()
                    if stop_now or global_step == training_args.max_steps:
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
                    if every and global_step % every == 0 and global_step < training_args.max_steps:
                        run_evaluation(global_step)

                # ---- the end: a checkpoint, the evaluation, the model folder (whole) and its upload
                if stopped_by is None:
                    every = training_args.checkpointing_steps
                    if not (every and global_step % every == 0):
                        checkpoint(global_step)
                    scores = run_evaluation(global_step)
                    if accelerator.is_main_process:
                        card = segmentation_card(
                            model_args,
                            data_args,
                            training_args,
                            backbone_class,
                            names,
                            global_step,
                            global_batch_size,
                            scores,
                        )
                        model_dir = save_model(unwrapped, processor, card, output_dir / MODEL_DIRNAME)
                        record_complete(output_dir, global_step, FINAL_ARTEFACTS)
                        metrics_log.event("saved", global_step, path=str(model_dir))
                        logger.info("Model saved to %s", model_dir)
                        if uploader is not None:
                            uploader.submit(
                                model_dir,
                                global_step,
                                commit_message=f"UperNet fine-tuned for {global_step} steps",
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


def main(argv: list[str] | None = None) -> int:
    """The script's exit status: 0 done, 2 wrong arguments, 1 failed, 3 trained but the model is not on the Hub
    (docs/reliability.md), 128 + signal when pre-empted."""
    result = train(*parse_arguments(argv))
    result.accelerator.end_training()
    return exit_status(PROG, result.stopped_by, result.uploads_complete, "the fine-tuned model")


# ---------------------------------------------------------------------------------------------------------------------
# The steps `train` names
# ---------------------------------------------------------------------------------------------------------------------


def backbone_source(model_args: SegmentationModelArguments, crop_size: list[int]):
    """The backbone argument as `build_upernet` takes it: a path / Hub id, or a random ViT for `random:PRESET`."""
    if not model_args.backbone.startswith(RANDOM_BACKBONE_PREFIX):
        return model_args.backbone
    try:
        return random_vit(model_args.backbone[len(RANDOM_BACKBONE_PREFIX) :], max(crop_size))
    except ValueError as error:
        raise UsageError(f"--backbone {model_args.backbone}: {error}") from None


def build_model(
    model_args: SegmentationModelArguments, data_args: SegmentationDataArguments, names: list[str]
):
    source = backbone_source(model_args, data_args.crop_size)
    try:
        return build_upernet(
            source,
            names,
            out_indices=model_args.out_indices,
            hidden_size=model_args.decoder_hidden_size,
            use_auxiliary_head=model_args.use_auxiliary_head,
            auxiliary_loss_weight=model_args.auxiliary_loss_weight,
            ignore_index=data_args.ignore_index,
            drop_path_rate=model_args.drop_path_rate,
        )
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(f"--backbone {model_args.backbone}: {' '.join(str(error).split())}") from None


def load_data(
    data_args: SegmentationDataArguments, training_args: SegmentationTrainingArguments, accelerator
):
    """(train, eval or None, image column, mask column, class names), with the first training mask checked."""
    try:
        with accelerator.main_process_first():  # one process builds / downloads, the others read its cache
            train, evaluation = load_segmentation_splits(
                data_args.dataset_name,
                data_args.train_split,
                data_args.eval_split,
                data_args.dataset_config_name,
                training_args.hub_token,
                data_args.offline_data_dir,
                data_args.dataset_revision,
            )
        image_column, mask_column = find_columns(train, data_args.image_column, data_args.mask_column)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise UsageError(f"--dataset_name {data_args.dataset_name}: {error}") from None
    try:
        names = label_names(data_args.label_names, data_args.dataset_name)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if evaluation is not None and data_args.max_eval_samples:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    synced = (
        training_args.sync_batch_norm and accelerator.num_processes > 1 and accelerator.device.type == "cuda"
    )
    if training_args.per_device_train_batch_size < 2 and not synced:
        raise UsageError(
            "--per_device_train_batch_size 1 cannot train UperNet: its BatchNorm layers (after the 1x1 pyramid "
            "pooling) need at least 2 images per batch; use 2 or more (or several GPUs with --sync_batch_norm)."
        )
    global_batch = training_args.per_device_train_batch_size * accelerator.num_processes
    if len(train) < global_batch:
        raise UsageError(
            f"--dataset_name {data_args.dataset_name}: its {data_args.train_split} split has {len(train)} images, "
            f"fewer than one global batch of {global_batch} ({accelerator.num_processes} processes x "
            f"{training_args.per_device_train_batch_size}): lower --per_device_train_batch_size."
        )
    try:  # the first mask now: a dataset that needs other label settings fails before any work
        labels = prepare_mask(train[0][mask_column], data_args.reduce_labels, data_args.ignore_index)
        check_label_range(labels, len(names), data_args.ignore_index)
    except (SegmentationDataError, MaskValueError) as error:
        raise UsageError(f"--dataset_name {data_args.dataset_name}: training example 0: {error}.") from None
    except Exception:  # undecodable: skipped and counted by the training set
        pass
    if evaluation is not None:
        evaluation = checked_evaluation_split(evaluation, image_column, mask_column, data_args, len(names))
    return train, evaluation, image_column, mask_column, names


def checked_evaluation_split(evaluation, image_column, mask_column, data_args, num_labels: int):
    """The evaluation split without its undecodable examples (named in a warning), after every mask was read: a
    mask that cannot be scored stops the run now, before training, not when the trained model is evaluated."""
    if image_column not in evaluation.column_names or mask_column not in evaluation.column_names:
        raise UsageError(
            f"--dataset_name {data_args.dataset_name}: the {data_args.eval_split} split has no column "
            f"{image_column!r} / {mask_column!r} (columns: {evaluation.column_names}); pass --image_column / "
            "--mask_column, or --eval_split none."
        )
    try:
        indices, skipped = check_evaluation_masks(
            evaluation,
            image_column,
            mask_column,
            num_labels,
            data_args.ignore_index,
            lambda mask: prepare_mask(mask, data_args.reduce_labels, data_args.ignore_index),
        )
    except SegmentationDataError as error:
        raise UsageError(
            f"--dataset_name {data_args.dataset_name} ({data_args.eval_split} split): {error}"
        ) from None
    if skipped:
        logger.warning(
            "Skipping %d of the %d evaluation examples, which cannot be decoded (%s%s).",
            len(skipped),
            len(evaluation),
            skipped[0].reason,
            "; ..." if len(skipped) > 1 else "",
        )
    if not indices:
        raise UsageError(
            f"--dataset_name {data_args.dataset_name}: no example of the {data_args.eval_split} split can be decoded."
        )
    return evaluation.select(indices) if skipped else evaluation


def evaluation_processor(data_args: SegmentationDataArguments):
    """The evaluation's preprocessing, as the image processor saved with the model: resize into --scale keeping
    the aspect ratio (the short side to its smaller value unless the long side would exceed the larger: mmseg's
    keep-ratio rescale), rescale, normalise. The whole-image evaluation is then exactly what
    `pipeline("image-segmentation")` does with the saved folder."""
    return build_segmentation_image_processor(
        {"shortest_edge": min(data_args.scale), "longest_edge": max(data_args.scale)},
        reduce_labels=data_args.reduce_labels,
    )


@dataclass
class ProcessorEvalTransform:
    """An evaluation example: the image through the saved image processor, the labels at full resolution."""

    processor: Any
    reduce_labels: bool
    ignore_index: int

    def __call__(self, image, mask) -> tuple[np.ndarray, np.ndarray]:
        pixels = self.processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0]
        return pixels, prepare_mask(mask, self.reduce_labels, self.ignore_index)


def train_batches(
    train, image_column, mask_column, data_args, training_args, accelerator, start_step, num_labels=None
):
    """This process's endless micro-batches, from optimiser step `start_step` on (moved to the device). An
    undecodable example is replaced by the next readable one and named once in a warning; a mask that cannot be
    trained on (labels beyond `num_labels`, another size than its image) ends the run in one line."""
    transform = SegmentationTrainTransform(
        crop_size=tuple(data_args.crop_size),
        scale=tuple(data_args.scale),
        ratio_range=tuple(data_args.ratio_range),
        cat_max_ratio=data_args.cat_max_ratio,
        flip_prob=data_args.flip_prob,
        photometric=data_args.photometric,
        reduce_labels=data_args.reduce_labels,
        ignore_index=data_args.ignore_index,
    )
    sampler = SegmentationBatchSampler(
        len(train),
        training_args.per_device_train_batch_size,
        training_args.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        start_batch=start_step * training_args.gradient_accumulation_steps,
    )
    loader = torch.utils.data.DataLoader(
        SegmentationTrainSet(
            train,
            image_column,
            mask_column,
            transform,
            training_args.seed,
            num_labels,
            data_args.ignore_index,
        ),
        batch_sampler=sampler,
        num_workers=data_args.num_workers,
        collate_fn=collate_segmentation,
        worker_init_fn=single_thread_worker,
        # its own generator: creating the iterator draws a seed, which would otherwise shift the global torch RNG
        # (drop-path masks) between an uninterrupted and a resumed run
        generator=torch.Generator().manual_seed(training_args.seed),
    )

    skipped: set[int] = set()

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for batch in started_with_workers(loader):
            if "problem" in batch:
                raise CommandFailure(
                    f"--dataset_name {data_args.dataset_name} ({data_args.train_split} split): {batch['problem']}"
                )
            if bool((batch["labels"] == data_args.ignore_index).all()):
                # the loss of a batch without a labelled pixel is NaN, which would read as a learning-rate problem
                raise CommandFailure(
                    f"--dataset_name {data_args.dataset_name} ({data_args.train_split} split): a batch of "
                    f"{len(batch['labels'])} training crops holds no labelled pixel (every mask value is "
                    f"--ignore_index {data_args.ignore_index}): check --ignore_index and --reduce_labels, or the "
                    "masks themselves."
                )
            for example in batch.pop("skipped"):
                if example.index not in skipped:
                    skipped.add(example.index)
                    logger.warning(
                        "Skipped training example %d (%s), the next readable one takes its place; %d skipped so far.",
                        example.index,
                        example.reason,
                        len(skipped),
                    )
            yield {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}

    return batches(), sampler.batches_per_epoch


def evaluate(model, evaluation, columns, processor, data_args, training_args, accelerator, names):
    """mIoU / mAcc / aAcc over the evaluation split; each process scores its share, the confusion matrices add up.
    Whole images go in as `pipeline("image-segmentation")` feeds them (the saved processor's resize, no padding)."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:
        # DDP keeps the weights equal but not the BatchNorm running statistics (each rank updates them with its own
        # batch after rank 0's were broadcast): evaluate every shard with rank 0's, the model that is saved
        import torch.distributed as dist

        for buffer in unwrapped.buffers():
            dist.broadcast(buffer.data, src=0)
    indices = range(accelerator.process_index, len(evaluation), accelerator.num_processes)
    transform = ProcessorEvalTransform(processor, data_args.reduce_labels, data_args.ignore_index)
    examples = torch.utils.data.DataLoader(
        SegmentationEvalSet(evaluation, *columns, transform, indices),
        batch_size=None,
        num_workers=data_args.num_workers,
        worker_init_fn=single_thread_worker,
        generator=torch.Generator(),  # leaves the global torch RNG (drop-path masks) alone
    )
    whole = training_args.inference_mode == "whole"
    skipped: list[SkippedExample] = []

    def scored_examples() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for example in started_with_workers(examples):
            if isinstance(
                example, ExampleProblem
            ):  # checked before training: only a changed dataset gets here
                raise CommandFailure(f"--dataset_name {data_args.dataset_name}: {example.message}")
            if isinstance(example, SkippedExample):  # truncated image data behind a readable header
                skipped.append(example)
                continue
            pixels, labels = example
            yield pixels.numpy(), labels.numpy()

    confusion = evaluate_segmentation(
        unwrapped,
        scored_examples(),
        len(names),
        data_args.ignore_index,
        training_args.inference_mode,
        tuple(data_args.crop_size),
        tuple(training_args.slide_stride),
        # whole images unpadded, as the pipeline runs them (a ViT drops a partial last patch; UperNet resizes its
        # logits to the input); sliding windows have the crop size, a multiple of the patch size
        1 if whole else unwrapped.backbone.config.patch_size,
        accelerator.device,
        accelerator.autocast,
    )
    if skipped:
        logger.warning(
            "The evaluation skipped %d example(s) that cannot be decoded (%s).",
            len(skipped),
            skipped[0].reason,
        )
    total = accelerator.reduce(torch.as_tensor(confusion.matrix, device=accelerator.device), reduction="sum")
    confusion.matrix = total.cpu().numpy()
    scores = confusion.compute()
    return {
        "mean_iou": scores.mean_iou,
        "mean_accuracy": scores.mean_accuracy,
        "overall_accuracy": scores.overall_accuracy,
    }


def segmentation_card(
    model_args: SegmentationModelArguments,
    data_args: SegmentationDataArguments,
    training_args: SegmentationTrainingArguments,
    backbone_class: str,
    names: list[str],
    step: int,
    global_batch_size: int,
    scores: dict[str, float] | None,
) -> SegmentationCardInfo:
    """The model card: backbone, data, recipe and the evaluation's scores."""
    hub_dataset = None
    if data_args.dataset_name != OFFLINE_SCENES and not os.path.exists(data_args.dataset_name):
        hub_dataset = data_args.dataset_name
    return SegmentationCardInfo(
        backbone=model_args.backbone,
        backbone_class=backbone_class,
        dataset=data_args.dataset_name,
        num_labels=len(names),
        crop_size=tuple(data_args.crop_size),
        steps=step,
        global_batch_size=global_batch_size,
        learning_rate=training_args.learning_rate,
        layer_decay=training_args.layer_decay,
        schedule=training_args.lr_scheduler,
        inference_mode=training_args.inference_mode,
        scores=scores,
        eval_split=data_args.eval_split,
        hub_dataset_id=hub_dataset,
        data_description=(
            "the offline synthetic scenes (real photographs from scikit-image composed with known masks)"
            if data_args.dataset_name == OFFLINE_SCENES
            else None
        ),
    )


def save_model(model, processor, card_info: SegmentationCardInfo, target: Path) -> Path:
    """`target`: config, safetensors, image processor, card; written staged and swapped in whole (a failure is one
    line naming the folder)."""
    if any(isinstance(module, torch.nn.SyncBatchNorm) for module in model.modules()):
        model = _with_plain_batch_norm(model)

    def write() -> None:
        with staged_folder(target) as staging:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
            write_segmentation_card(staging, card_info)

    write_final_folder(target, "the fine-tuned model", write)
    return target


def _with_plain_batch_norm(model):
    """A copy of `model` with SyncBatchNorm layers turned back into BatchNorm2d (the saved class's own modules)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.SyncBatchNorm):
                plain = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine)
                plain.load_state_dict(child.state_dict())
                setattr(module, child_name, plain)
    return model


if __name__ == "__main__":
    sys.exit(run_command(PROG, main))
