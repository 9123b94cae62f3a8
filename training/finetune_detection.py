#!/usr/bin/env python
"""Fine-tune a SelfPatch / DINO backbone for COCO-style object detection (Deformable DETR) or instance segmentation
(Mask2Former) with Accelerate, and save a transformers model folder that `AutoModelForObjectDetection` /
`AutoModelForUniversalSegmentation` and `pipeline("object-detection")` / `pipeline("image-segmentation")` load.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 training/finetune_detection.py \\
        training/configs/coco_vit_small_deformable_detr.yaml --backbone runs/selfpatch-vits16/backbone
    python training/finetune_detection.py training/configs/detection_offline.yaml            # CPU minutes
    python training/finetune_detection.py training/configs/instance_segmentation_offline.yaml
    accelerate launch training/finetune_detection.py RECIPE.yaml --resume_from_checkpoint latest

A recipe file (YAML or JSON, the first argument) sets any option below; options after it override the file.

The backbone (a ViTModel / SwinModel folder, a converted CLS-free SelfPatch model, or `random:PRESET`) feeds the
paper's multi-scale neck (strides 4-32: `BeitBackbone(add_fpn=True)` for a ViT, `SwinBackbone` for a Swin); the
head is new (selfpatch_hf.models.dense.detection). The data is any `datasets` dataset in the Hub's COCO layout, a
local COCO json + image folder, or the offline instance scenes (the default). Training follows DETR's COCO recipe
(flip, multi-scale resize with a resize-crop-resize branch, applied to the image, its boxes and masks together;
batches padded with a pixel mask), AdamW with optional layer-wise decay, linear warm-up then step (the 1x) or cosine
decay, per optimiser step.

The run writes into --output_dir: `metrics.jsonl` (and tracker logs under `logs/`), `checkpoints/checkpoint-<step>`
(accelerate state, written atomically; resuming continues the same batch order and augmentation) and, at the end,
`model/`: the detector + the image processor the evaluation used (resize to --eval_scale, normalise:
the pipelines reproduce the evaluation) + a model card with the COCO AP it measured (box AP; mask AP for
Mask2Former), which is the AP of the pipeline call the card states (`threshold=--eval_threshold`; the evaluation
reads boxes and masks as the pipelines return them), then `run_complete.json`.
"""

from __future__ import annotations

import sys

from selfpatch_hf.cli.errors import UsageError, run_command
from selfpatch_hf.training.arguments.detection import (
    DetectionDataArguments,
    DetectionModelArguments,
    DetectionTrainingArguments,
    parse_detection_arguments,
)

PROG = "finetune_detection.py"


def parse_arguments(argv: list[str] | None = None):
    """`(model_args, data_args, training_args)` of `[RECIPE.yaml] [--option value ...]`, checked."""
    return parse_detection_arguments(list(sys.argv[1:] if argv is None else argv), description=__doc__)


def check_arguments(argv: list[str] | None = None) -> None:
    """Parses and checks the arguments, nothing else: `--help` and argument mistakes are answered here."""
    parse_arguments(argv)


if __name__ == "__main__":
    # answer --help and argument mistakes before the imports below load torch, transformers and datasets (seconds)
    if status := run_command(PROG, check_arguments):
        sys.exit(status)

# ruff: noqa: E402 -- the heavy imports come after that early answer
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed

from selfpatch_hf.data.detection.augmentation import DetectionAugmentation, DetectionTrainTransform
from selfpatch_hf.data.detection.batching import collate_detection
from selfpatch_hf.data.detection.sources import (
    OFFLINE_INSTANCES,
    DetectionSource,
    HubDetectionSource,
    load_detection_source,
)
from selfpatch_hf.data.sources import hub_dataset_id
from selfpatch_hf.evaluation.configs import CocoEvalConfig
from selfpatch_hf.evaluation.detection import evaluate_coco
from selfpatch_hf.hub.cards.detection import DetectionCardInfo, write_detection_card
from selfpatch_hf.models.dense.detection import (
    build_deformable_detr,
    build_detection_image_processor,
    build_instance_segmentation_image_processor,
    build_mask2former,
)
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
    start_accelerator,
)
from selfpatch_hf.training.runtime import (
    enable_activation_checkpointing,
)

LABEL_FORMATS = {"deformable-detr": "detr", "mask2former": "mask2former"}


# ---------------------------------------------------------------------------------------------------------------------
# The run, top to bottom
# ---------------------------------------------------------------------------------------------------------------------


def train(
    model_args: DetectionModelArguments,
    data_args: DetectionDataArguments,
    training_args: DetectionTrainingArguments,
) -> FinetuningResult:
    """One fine-tuning run: accelerator, data and model (every mistake in them is found before anything is
    written), then the shared run (selfpatch_hf.training.finetuning_run): output folder, resume, loop, evaluation,
    final model and its upload."""
    # blocks after the last selected one and some of the heads' parameters get no gradient in a step
    accelerator = start_accelerator(training_args, data_args.num_workers, find_unused_parameters=True)

    # ---- data, model, optimiser, schedule (the same seed on every process gives the same initial heads)
    train_source, eval_source = load_data(model_args, data_args, training_args, accelerator)
    set_seed(training_args.seed)
    model = build_model(model_args, data_args, train_source.label_names)
    prefix, backbone = find_backbone(model)
    num_layers = backbone_depth(backbone)
    if training_args.gradient_checkpointing:
        enable_activation_checkpointing(backbone)
    optimizer = build_finetuning_optimizer(
        model, training_args.weight_decay, training_args.layer_decay, num_layers, backbone_prefix=prefix
    )
    task = DetectionTask(
        model_args,
        data_args,
        training_args,
        accelerator,
        train_source,
        eval_source,
        evaluation_processor(model_args, data_args),
        backbone_class=type(backbone).__name__,
        num_layers=num_layers,
    )
    schedule = finetuning_schedule(
        training_args,
        decay_steps=tuple(training_args.lr_decay_steps),
        decay_factor=training_args.lr_decay_factor,
    )
    return run_finetuning(accelerator, model, optimizer, schedule, task, model_args, data_args, training_args)


def main(argv: list[str] | None = None) -> int:
    """The script's exit status (`FinetuningResult.finish`; docs/reliability.md)."""
    return train(*parse_arguments(argv)).finish(PROG)


# ---------------------------------------------------------------------------------------------------------------------
# The steps `train` names
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DetectionTask:
    """Detection / instance segmentation for `run_finetuning`: the augmented training split, COCO AP on the
    evaluation split, the detector + image processor + card as the model folder."""

    model_args: DetectionModelArguments
    data_args: DetectionDataArguments
    training_args: DetectionTrainingArguments
    accelerator: Any
    train_source: DetectionSource
    eval_source: DetectionSource | None
    processor: Any
    backbone_class: str
    num_layers: int

    @property
    def name(self) -> str:
        return self.model_args.head

    def train_batches(self, start_step: int) -> tuple[Iterator[dict[str, Any]], int]:
        return train_batches(
            self.train_source,
            self.model_args,
            self.data_args,
            self.training_args,
            self.accelerator,
            start_step,
        )

    def describe(self, global_batch_size: int, batches_per_epoch: int) -> str:
        args = self.training_args
        epochs = args.max_steps * args.gradient_accumulation_steps / batches_per_epoch
        return (
            f"Fine-tuning {self.model_args.head} on {self.model_args.backbone} ({self.backbone_class}, "
            f"{self.num_layers} blocks) on {self.data_args.dataset_name}: {args.max_steps} steps of "
            f"{global_batch_size} images ({epochs:.1f} epochs of {len(self.train_source)}), peak lr "
            f"{args.learning_rate:g}."
        )

    def evaluate(self, model) -> dict[str, dict[str, float]] | None:
        if self.eval_source is None:
            return None
        return evaluate(
            model, self.eval_source, self.processor, self.data_args, self.training_args, self.accelerator
        )

    def score_metrics(self, scores: dict[str, dict[str, float]]) -> dict[str, float]:
        return {
            f"eval_{_IOU_NAMES[iou_type]}_{name}": value
            for iou_type, values in scores.items()
            for name, value in values.items()
        }

    def score_summary(self, scores: dict[str, dict[str, float]]) -> str:
        return ", ".join(
            f"{_IOU_NAMES[iou_type]} AP {100 * values['AP']:.2f}" for iou_type, values in scores.items()
        )

    def save_model(self, model, target: Path, step: int, global_batch_size: int, scores) -> Path:
        card = detection_card(
            self.model_args,
            self.data_args,
            self.training_args,
            self.backbone_class,
            self.train_source.label_names,
            step,
            global_batch_size,
            scores,
            self.eval_source,
        )
        return save_model_folder(
            target, model, self.processor, lambda folder: write_detection_card(folder, card)
        )


_IOU_NAMES = {"bbox": "box", "segm": "mask"}  # pycocotools' IoU types, as the metrics and the log name them


def build_model(model_args: DetectionModelArguments, data_args: DetectionDataArguments, names: list[str]):
    """The detector of --head on the backbone, its heads sized by the options (None: the model's default)."""
    source = backbone_source(model_args.backbone, data_args.short_side)
    common = {"out_indices": model_args.out_indices, "multi_scale": model_args.multi_scale}
    common["drop_path_rate"] = model_args.drop_path_rate
    common["encoder_layers"] = model_args.encoder_layers
    optional = {"num_queries": model_args.num_queries, "decoder_layers": model_args.decoder_layers}
    width = model_args.feedforward_size
    if model_args.head == "deformable-detr":
        optional |= {"encoder_ffn_dim": width, "decoder_ffn_dim": width}
        build = functools.partial(
            build_deformable_detr,
            d_model=model_args.hidden_size,
            encoder_attention_heads=model_args.attention_heads,
            decoder_attention_heads=model_args.attention_heads,
            with_box_refine=model_args.with_box_refine,
            two_stage=model_args.two_stage,
        )
    else:
        optional |= {
            "dim_feedforward": width,
            "encoder_feedforward_dim": width,
            "train_num_points": model_args.train_num_points,
        }
        build = functools.partial(
            build_mask2former,
            hidden_dim=model_args.hidden_size,
            feature_size=model_args.hidden_size,
            num_attention_heads=model_args.attention_heads,
        )
    with backbone_errors(model_args.backbone):
        return build(
            source, names, **common, **{key: value for key, value in optional.items() if value is not None}
        )


def find_backbone(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(parameter-name prefix, module) of the multi-scale backbone inside a detector: the layer-wise decay's
    blocks are counted under that prefix."""
    for name, module in model.named_modules():
        if name and type(module).__name__.endswith("Backbone"):
            return f"{name}.", module
    raise TypeError(f"{type(model).__name__} holds no backbone module.")


def backbone_depth(backbone: torch.nn.Module) -> int:
    """Blocks of a ViT backbone, stages of a Swin one (the units of the layer-wise decay)."""
    config = backbone.config
    depths = getattr(config, "depths", None)
    return len(depths) if depths else int(config.num_hidden_layers)


def _source(data_args: DetectionDataArguments, training_args, split: str, image_dir: str | None):
    """One split: a COCO json split is a json file (`split` itself, or --dataset_name for the training split)."""
    dataset = data_args.dataset_name
    if split.endswith(".json"):
        dataset = split
    options: dict[str, Any] = {}
    if not str(dataset).endswith(".json"):
        options = {
            "image_column": data_args.image_column,
            "objects_column": data_args.objects_column,
            "label_names": data_args.label_names,
            "box_format": data_args.box_format,
        }
    return load_detection_source(
        dataset,
        split,
        image_dir=image_dir,
        config_name=data_args.dataset_config_name,
        revision=data_args.dataset_revision,
        token=training_args.hub_token,
        offline_data_dir=data_args.offline_data_dir,
        **options,
    )


def check_categories(source: DetectionSource, option: str) -> None:
    """Every object's category inside the label map (COCO json categories are renumbered from the file's list)."""
    unknown = source.first_unknown_category() if isinstance(source, HubDetectionSource) else None
    if unknown is not None:
        row, category = unknown
        count = len(source.label_names)
        raise UsageError(
            f"{option}: row {row} has category {category!r}, beyond the label map of {count} names (ids "
            f"0..{count - 1}): pass --label_names covering every category."
        )


def load_data(
    model_args: DetectionModelArguments,
    data_args: DetectionDataArguments,
    training_args: DetectionTrainingArguments,
    accelerator,
) -> tuple[DetectionSource, DetectionSource | None]:
    """(training source, evaluation source or None), checked: columns, categories, masks for Mask2Former, and the
    same label names in both splits."""
    option = f"--dataset_name {data_args.dataset_name}"
    try:
        with accelerator.main_process_first():  # one process builds / downloads, the others read its cache
            train_source = _source(data_args, training_args, data_args.train_split, data_args.image_dir)
            eval_source = None
            if data_args.eval_split:
                eval_source = _source(
                    data_args, training_args, data_args.eval_split, data_args.eval_image_dir
                )
    except (FileNotFoundError, ValueError, ConnectionError, KeyError) as error:
        raise UsageError(f"{option}: {error}") from None
    if model_args.head == "mask2former" and not train_source.with_masks:
        raise UsageError(f"{option}: --head mask2former trains on masks; the data has no segmentation field.")
    if eval_source is not None and list(eval_source.label_names) != list(train_source.label_names):
        raise UsageError(
            f"{option}: the {data_args.eval_split!r} split's classes {eval_source.label_names[:5]} differ from the "
            f"training split's {train_source.label_names[:5]}."
        )
    for source in (train_source, eval_source):
        if source is not None:
            check_categories(source, option)
    if data_args.max_train_samples:
        train_source = _limited(train_source, data_args.max_train_samples)
    check_fills_a_batch(
        len(train_source), data_args.dataset_name, data_args.train_split, training_args, accelerator
    )
    return train_source, eval_source


def _limited(source: DetectionSource, count: int) -> DetectionSource:
    if isinstance(source, HubDetectionSource):
        source.dataset = source.dataset.select(range(min(count, len(source.dataset))))
        return source
    source.image_ids = source.image_ids[:count]  # CocoJsonSource
    return source


def evaluation_processor(model_args: DetectionModelArguments, data_args: DetectionDataArguments):
    """The evaluation's preprocessing, as the image processor saved with the model (resize to --eval_scale keeping
    the aspect ratio, rescale, normalise): `evaluate_coco` and the pipelines run the same."""
    build = (
        build_instance_segmentation_image_processor
        if model_args.head == "mask2former"
        else build_detection_image_processor
    )
    return build(*data_args.eval_scale)


class DetectionTrainSet(torch.utils.data.Dataset):
    """Indexed by `(epoch, index)`: example `index` augmented with `default_rng([seed, epoch, index])`, so a resumed
    run sees exactly the images and augmentations the uninterrupted one would."""

    def __init__(self, source: DetectionSource, transform: DetectionTrainTransform, seed: int):
        self.source = source
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        return self.transform(self.source[int(index)], rng)


def train_batches(source, model_args, data_args, training_args, accelerator, start_step):
    """This process's endless micro-batches, from optimiser step `start_step` on (moved to the device)."""
    recipe = DetectionAugmentation.for_short_side(
        data_args.short_side, crop_prob=data_args.crop_prob, flip_prob=data_args.flip_prob
    )
    dataset = DetectionTrainSet(source, DetectionTrainTransform(recipe), training_args.seed)
    collate = functools.partial(collate_detection, label_format=LABEL_FORMATS[model_args.head])
    return resumable_batches(dataset, collate, data_args.num_workers, training_args, accelerator, start_step)


def evaluation_config(
    data_args: DetectionDataArguments, training_args: DetectionTrainingArguments, device: str
) -> CocoEvalConfig:
    """The card's evaluation is what the pipelines return for the call the card states: the image-segmentation
    pipeline's one-map masks (not each query's own mask) and the detection pipeline's whole-pixel boxes, at
    --eval_threshold."""
    return CocoEvalConfig(
        threshold=data_args.eval_threshold,
        overlapping_masks=False,
        pipeline_boxes=True,
        batch_size=training_args.eval_batch_size,
        max_samples=data_args.max_eval_samples,
        device=device,
    )


def evaluate(model, source, processor, data_args, training_args, accelerator) -> dict[str, dict[str, float]]:
    """COCO AP over the evaluation split with `evaluate_coco` (the saved image processor's resize, the pipelines'
    post-processing), on the main process; the others wait."""
    unwrapped = accelerator.unwrap_model(model)
    scores: list[Any] = [None]
    if accelerator.is_main_process:
        config = evaluation_config(data_args, training_args, str(accelerator.device))
        # fp32, no autocast: the pipeline a user runs on the saved folder computes in fp32, and the card's AP is
        # its AP
        result = evaluate_coco(unwrapped, source, config, image_processor=processor)
        scores[0] = {
            iou_type: {
                name: float(value) for name, value in values.items() if isinstance(value, (int, float))
            }
            for iou_type, values in result.scores.items()
        }
    unwrapped.train()
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(scores, src=0)
    return scores[0]


def detection_card(
    model_args: DetectionModelArguments,
    data_args: DetectionDataArguments,
    training_args: DetectionTrainingArguments,
    backbone_class: str,
    names: list[str],
    step: int,
    global_batch_size: int,
    scores: dict[str, dict[str, float]] | None,
    eval_source: DetectionSource | None,
) -> DetectionCardInfo:
    """The model card: head, backbone, data, recipe and the evaluation's AP."""
    dataset = data_args.dataset_name
    hub_dataset = None if dataset == OFFLINE_INSTANCES else hub_dataset_id(dataset)
    num_images = None
    if eval_source is not None:
        num_images = len(eval_source)
        if data_args.max_eval_samples:
            num_images = min(num_images, data_args.max_eval_samples)
    return DetectionCardInfo(
        head=model_args.head,
        model_class=(
            "Mask2FormerForUniversalSegmentation"
            if model_args.head == "mask2former"
            else "DeformableDetrForObjectDetection"
        ),
        backbone=model_args.backbone,
        backbone_class=backbone_class,
        dataset=dataset,
        num_labels=len(names),
        eval_scale=tuple(data_args.eval_scale),
        eval_threshold=data_args.eval_threshold,
        steps=step,
        global_batch_size=global_batch_size,
        learning_rate=training_args.learning_rate,
        layer_decay=training_args.layer_decay,
        schedule=training_args.lr_scheduler,
        scores=scores,
        eval_split=data_args.eval_split,
        num_eval_images=num_images,
        hub_dataset_id=hub_dataset,
        data_description=(
            "the offline instance scenes (real photographs from scikit-image pasted as instances with known masks)"
            if dataset == OFFLINE_INSTANCES
            else None
        ),
    )


if __name__ == "__main__":
    sys.exit(run_command(PROG, main))
