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
UperNet; by default (--neck multiscale) on strides 4-32 made from four blocks by the reference's neck
(`BeitBackbone(add_fpn=True)`, the maps the paper's Semantic FPN reads; transformers has no Semantic FPN), with
--neck single on four blocks at the patch stride (`Dinov2Backbone`).

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed

from selfpatch_hf.data.segmentation.augmentation import SegmentationTrainTransform, prepare_mask
from selfpatch_hf.data.segmentation.loading import (
    OFFLINE_SCENES,
    ExampleProblem,
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
from selfpatch_hf.data.sources import hub_dataset_id
from selfpatch_hf.evaluation.segmentation_inference import evaluate_segmentation
from selfpatch_hf.evaluation.semseg_metrics import MaskValueError
from selfpatch_hf.hub.cards.segmentation import SegmentationCardInfo, write_segmentation_card
from selfpatch_hf.models.dense.heads import build_segmentation_image_processor, build_upernet
from selfpatch_hf.training.finetuning_optimization import (
    build_finetuning_optimizer,
)
from selfpatch_hf.training.finetuning_run import (
    FinetuningResult,
    backbone_errors,
    backbone_source,
    check_fills_a_batch,
    finetuning_schedule,
    resumable_batches,
    run_finetuning,
    save_model_folder,
    single_thread_worker,
    start_accelerator,
    started_with_workers,
)
from selfpatch_hf.training.runtime import (
    enable_activation_checkpointing,
)

logger = logging.getLogger("finetune_segmentation")


# ---------------------------------------------------------------------------------------------------------------------
# The run, top to bottom
# ---------------------------------------------------------------------------------------------------------------------


def train(
    model_args: SegmentationModelArguments,
    data_args: SegmentationDataArguments,
    training_args: SegmentationTrainingArguments,
) -> FinetuningResult:
    """One fine-tuning run: accelerator, data and model (every mistake in them is found before anything is
    written), then the shared run (selfpatch_hf.training.finetuning_run): output folder, resume, loop, evaluation,
    final model and its upload."""
    # blocks after the last selected one get no gradient: DDP is told below when there are any
    accelerator = start_accelerator(training_args, data_args.num_workers, find_unused_parameters=False)

    # ---- data, model, optimiser, schedule (the same seed on every process gives the same initial heads)
    train_set, eval_set, image_column, mask_column, names = load_data(data_args, training_args, accelerator)
    set_seed(training_args.seed)
    model = build_model(model_args, data_args, names)
    num_layers = model.backbone.config.num_hidden_layers
    if training_args.gradient_checkpointing:
        enable_activation_checkpointing(model.backbone)
    if training_args.sync_batch_norm and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
    # later blocks get no gradient, nor does BEiT's output norm: the multi-scale neck reads the raw block outputs
    multi_scale_neck = getattr(model.backbone.config, "add_fpn", False)
    if max(model.backbone.config.out_indices) < num_layers or multi_scale_neck:
        accelerator.ddp_handler.find_unused_parameters = True
    optimizer = build_finetuning_optimizer(
        model, training_args.weight_decay, training_args.layer_decay, num_layers
    )
    task = SegmentationTask(
        model_args,
        data_args,
        training_args,
        accelerator,
        train_set,
        eval_set,
        (image_column, mask_column),
        names,
        evaluation_processor(data_args),
        backbone_class=type(model.backbone).__name__,
        num_layers=num_layers,
        out_indices=list(model.backbone.config.out_indices),
    )
    schedule = finetuning_schedule(training_args, power=training_args.poly_power)
    return run_finetuning(accelerator, model, optimizer, schedule, task, model_args, data_args, training_args)


def main(argv: list[str] | None = None) -> int:
    """The script's exit status (`FinetuningResult.finish`; docs/reliability.md)."""
    return train(*parse_arguments(argv)).finish(PROG)


# ---------------------------------------------------------------------------------------------------------------------
# The steps `train` names
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SegmentationTask:
    """Semantic segmentation for `run_finetuning`: the crops of the training split, mIoU on the evaluation split,
    UperNet + image processor + card as the model folder."""

    model_args: SegmentationModelArguments
    data_args: SegmentationDataArguments
    training_args: SegmentationTrainingArguments
    accelerator: Any
    train_set: Any
    eval_set: Any | None
    columns: tuple[str, str]  # image, mask
    names: list[str]
    processor: Any
    backbone_class: str
    num_layers: int
    out_indices: list[int]
    name: str = "UperNet"

    def train_batches(self, start_step: int) -> tuple[Iterator[dict[str, torch.Tensor]], int]:
        return train_batches(
            self.train_set,
            *self.columns,
            self.data_args,
            self.training_args,
            self.accelerator,
            start_step,
            len(self.names),
        )

    def describe(self, global_batch_size: int, batches_per_epoch: int) -> str:
        args = self.training_args
        epochs = args.max_steps * args.gradient_accumulation_steps / batches_per_epoch
        return (
            f"Fine-tuning {self.model_args.backbone} ({self.backbone_class}, {self.num_layers} blocks, out_indices "
            f"{self.out_indices}) on {self.data_args.dataset_name}: {args.max_steps} steps of "
            f"{global_batch_size} images ({epochs:.1f} epochs of {len(self.train_set)}), peak lr "
            f"{args.learning_rate:g}."
        )

    def evaluate(self, model) -> dict[str, float] | None:
        if self.eval_set is None:
            return None
        return evaluate(
            model,
            self.eval_set,
            self.columns,
            self.processor,
            self.data_args,
            self.training_args,
            self.accelerator,
            self.names,
        )

    def score_metrics(self, scores: dict[str, float]) -> dict[str, float]:
        return {f"eval_{key}": value for key, value in scores.items()}

    def score_summary(self, scores: dict[str, float]) -> str:
        return (
            f"mIoU {100 * scores['mean_iou']:.2f}, mAcc {100 * scores['mean_accuracy']:.2f}, aAcc "
            f"{100 * scores['overall_accuracy']:.2f}"
        )

    def save_model(self, model, target: Path, step: int, global_batch_size: int, scores) -> Path:
        card = segmentation_card(
            self.model_args,
            self.data_args,
            self.training_args,
            self.backbone_class,
            self.names,
            step,
            global_batch_size,
            scores,
        )
        return save_model(model, self.processor, card, target)


def build_model(
    model_args: SegmentationModelArguments, data_args: SegmentationDataArguments, names: list[str]
):
    source = backbone_source(model_args.backbone, max(data_args.crop_size))
    with backbone_errors(model_args.backbone):
        return build_upernet(
            source,
            names,
            out_indices=model_args.out_indices,
            hidden_size=model_args.decoder_hidden_size,
            use_auxiliary_head=model_args.use_auxiliary_head,
            auxiliary_loss_weight=model_args.auxiliary_loss_weight,
            ignore_index=data_args.ignore_index,
            drop_path_rate=model_args.drop_path_rate,
            multi_scale=model_args.neck == "multiscale",
        )


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
    check_fills_a_batch(len(train), data_args.dataset_name, data_args.train_split, training_args, accelerator)
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
    """This process's endless micro-batches, from optimiser step `start_step` on (moved to the device). A mask
    that cannot be trained on (labels beyond `num_labels`, another size than its image) ends the run in one line;
    unreadable examples are replaced and counted by the shared run."""
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
    dataset = SegmentationTrainSet(
        train, image_column, mask_column, transform, training_args.seed, num_labels, data_args.ignore_index
    )
    batches, batches_per_epoch = resumable_batches(
        dataset, collate_segmentation, data_args.num_workers, training_args, accelerator, start_step
    )

    def labelled(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        try:
            for batch in batches:
                if bool((batch["labels"] == data_args.ignore_index).all()):
                    # the loss of a batch without a labelled pixel is NaN, which would read as a learning-rate problem
                    raise CommandFailure(
                        f"--dataset_name {data_args.dataset_name} ({data_args.train_split} split): a batch of "
                        f"{len(batch['labels'])} training crops holds no labelled pixel (every mask value is "
                        f"--ignore_index {data_args.ignore_index}): check --ignore_index and --reduce_labels, or "
                        "the masks themselves."
                    )
                yield batch
        finally:
            batches.close()  # the data workers end with the run

    return labelled(batches), batches_per_epoch


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
    hub_dataset = None if data_args.dataset_name == OFFLINE_SCENES else hub_dataset_id(data_args.dataset_name)
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
        multi_scale=model_args.neck == "multiscale" or backbone_class == "SwinBackbone",
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

    return save_model_folder(
        target, model, processor, lambda folder: write_segmentation_card(folder, card_info)
    )


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
