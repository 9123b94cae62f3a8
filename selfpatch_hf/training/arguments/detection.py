"""The options of `training/finetune_detection.py`: three argument dataclasses (the training one shares
`RuntimeArguments`), recipe files and the checks that need nothing but the arguments.

`parse_detection_arguments(["recipe.yaml", "--learning_rate", "1e-4"])` reads a recipe file and the command line
after it (the command line wins) through `HfArgumentParser`; mistakes raise `UsageError` (exit status 2, one line).
Importing this module loads no torch, datasets or model code, so `--help` and argument mistakes answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from selfpatch_hf.cli.errors import UsageError
from selfpatch_hf.training.arguments.finetuning import (
    RANDOM_BACKBONE_PREFIX,
    FinetuningArguments,
    check_drop_path_rate,
    parse_task_arguments,
    validate_finetuning_arguments,
)
from selfpatch_hf.training.arguments.recipe_files import option

HEADS = ("deformable-detr", "mask2former")
DEFAULT_EVAL_THRESHOLDS = {"deformable-detr": 0.0, "mask2former": 0.5}


@dataclass
class DetectionModelArguments:
    head: Literal["deformable-detr", "mask2former"] = option(
        "deformable-detr",
        "deformable-detr: boxes (DeformableDetrForObjectDetection); mask2former: instance masks "
        "(Mask2FormerForUniversalSegmentation).",
    )
    backbone: str | None = option(
        None,
        "The pretrained backbone (required): a ViTModel folder or Hub id (our export, a converted DINO), a converted "
        "CLS-free SelfPatch SiglipVisionModel, a SwinModel folder, or "
        f"`{RANDOM_BACKBONE_PREFIX}PRESET` (a randomly initialised ViT, e.g. {RANDOM_BACKBONE_PREFIX}vit-tiny-patch16).",
    )
    out_indices: list[int] | None = option(
        None, "The four ViT blocks (or Swin stages) of the multi-scale neck (default: 3, 6, 9, 12 of 12)."
    )
    multi_scale: bool = option(
        True, "Strides 4-32 from the BeitBackbone / SwinBackbone neck (false: four maps at the patch stride)."
    )
    num_queries: int | None = option(None, "Object queries (default: 300 Deformable DETR, 100 Mask2Former).")
    hidden_size: int = option(256, "Width of the head (Deformable DETR's d_model, Mask2Former's hidden_dim).")
    encoder_layers: int = option(6, "Layers of the multi-scale deformable-attention encoder / pixel decoder.")
    decoder_layers: int | None = option(None, "Decoder layers (default: 6 Deformable DETR, 10 Mask2Former).")
    feedforward_size: int | None = option(
        None, "Feed-forward width of the head's layers (default: the model's, 1024 / 2048)."
    )
    attention_heads: int = option(8, "Attention heads of the head's layers.")
    with_box_refine: bool = option(False, "Deformable DETR's iterative box refinement.")
    two_stage: bool = option(False, "Deformable DETR's two-stage variant (needs --with_box_refine).")
    train_num_points: int | None = option(
        None, "Mask2Former: points sampled per mask for its loss (default: the model's 12544)."
    )
    drop_path_rate: float = option(0.1, "Stochastic depth in the backbone.")


@dataclass
class DetectionDataArguments:
    dataset_name: str = option(
        "offline-instances",
        "A `datasets` dataset in the Hub's COCO layout (image + objects with bbox, category, optional segmentation): "
        "a Hub id, a save_to_disk / data folder, a COCO json file (images in --image_dir), or `offline-instances` "
        "(the synthetic instance scenes, built under --offline_data_dir).",
    )
    dataset_config_name: str | None = option(None, "Configuration of the Hub dataset.")
    dataset_revision: str | None = option(None, "Revision of the Hub dataset.")
    train_split: str = option("train", "Split to train on (for a COCO json: the training annotation file).")
    eval_split: str | None = option(
        "validation", "Split to evaluate on (for a COCO json: its annotation file; none: no evaluation)."
    )
    image_dir: str | None = option(None, "Image folder of a COCO json (default: COCO's layout).")
    eval_image_dir: str | None = option(
        None, "Image folder of the evaluation COCO json (default: COCO's layout)."
    )
    image_column: str | None = option(None, "Image column (default: the Image feature).")
    objects_column: str | None = option(
        None, "Objects column (default: the list-of-dicts feature, e.g. objects)."
    )
    label_names: list[str] | None = option(
        None, "Class names when the dataset's category is a plain integer."
    )
    box_format: Literal["xywh", "xyxy"] = option(
        "xywh", "Box convention of the dataset (COCO: x y width height; some conversions: x0 y0 x1 y1)."
    )
    offline_data_dir: str | None = option(
        None,
        "Where `offline-instances` is found or built (instances/ inside). Default: the cache folder "
        "`selfpatch eval make-offline-data` writes to.",
    )
    max_train_samples: int | None = option(None, "Use only the first N training images.")
    max_eval_samples: int | None = option(None, "Evaluate on the first N evaluation images only.")
    short_side: int = option(
        800,
        "Largest shorter side of the multi-scale training resize (COCO's 800; the scales are DETR's, scaled).",
    )
    eval_scale: list[int] = option(
        help="Evaluation resize: shorter side, longest side (also the saved image processor's).",
        default_factory=lambda: [800, 1333],
    )
    eval_threshold: float | None = option(
        None,
        "Score threshold of the evaluation, and of the pipeline call the model card states (the card's AP is what "
        "that call scores). Default: 0 for deformable-detr (every box; COCOeval keeps the best 100), 0.5 for "
        "mask2former (the image-segmentation pipeline paints all kept instances into one map, later ones over "
        "earlier ones, so low-scoring instances would cover the good ones).",
    )
    crop_prob: float = option(0.5, "Probability of the resize-crop-resize branch (DETR's).")
    flip_prob: float = option(0.5, "Horizontal flip probability.")
    num_workers: int = option(2, "Data loading worker processes per training process.")


@dataclass
class DetectionTrainingArguments(FinetuningArguments):
    per_device_train_batch_size: int = option(2, "Images per process per micro-batch.")
    max_steps: int = option(90000, "Training length in optimiser steps.")
    learning_rate: float = option(2e-4, "Peak learning rate (not scaled with the batch).")
    lr_scheduler: Literal["step", "cosine"] = option("step", "Decay after the warm-up.")
    lr_decay_steps: list[int] | None = option(
        None,
        "--lr_scheduler step: steps at which the learning rate drops (default: at 8/12 and 11/12, the 1x).",
    )
    lr_decay_factor: float = option(0.1, "--lr_scheduler step: factor of each drop.")
    min_learning_rate: float = option(0.0, "--lr_scheduler cosine: learning rate at the end.")
    max_grad_norm: float = option(0.1, "Clip the global gradient norm (0: no clipping; DETR's 0.1).")
    eval_batch_size: int = option(4, "Images per evaluation forward pass.")
    run_name: str = option("selfpatch-detection", "Tracker project / run name.")
    checkpointing_steps: int = option(
        5000, "Write a checkpoint every N optimiser steps (0: only at the end)."
    )


ARGUMENT_CLASSES = (DetectionModelArguments, DetectionDataArguments, DetectionTrainingArguments)


def parse_detection_arguments(
    argv: list[str], description: str | None = None
) -> tuple[DetectionModelArguments, DetectionDataArguments, DetectionTrainingArguments]:
    """`[RECIPE.yaml|json] [--option value ...]` -> the three argument groups (checked by `validate_arguments`)."""
    return parse_task_arguments(
        ARGUMENT_CLASSES,
        argv,
        script="training/finetune_detection.py",
        description=description,
        validate=validate_arguments,
    )


def validate_arguments(
    model_args: DetectionModelArguments,
    data_args: DetectionDataArguments,
    training_args: DetectionTrainingArguments,
) -> None:
    """Checks that need nothing but the arguments (the backbone and the dataset are checked when loaded)."""
    for name, value in (("backbone", model_args.backbone), ("output_dir", training_args.output_dir)):
        if not value:
            raise UsageError(f"--{name} is required (see --help).")
    validate_finetuning_arguments(
        training_args, hub_model_example="your-name/deformable-detr-selfpatch-vits16-coco"
    )
    positive = {
        "hidden_size": model_args.hidden_size,
        "encoder_layers": model_args.encoder_layers,
        "attention_heads": model_args.attention_heads,
        "short_side": data_args.short_side,
        "eval_batch_size": training_args.eval_batch_size,
    }
    for name in ("num_queries", "decoder_layers", "feedforward_size", "train_num_points"):
        if getattr(model_args, name) is not None:
            positive[name] = getattr(model_args, name)
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}.")
    if model_args.head == "deformable-detr" and (model_args.decoder_layers or 2) < 2:
        raise UsageError(
            "--decoder_layers must be >= 2 for deformable-detr (its box heads are tied across layers)."
        )
    if model_args.two_stage and not model_args.with_box_refine:
        raise UsageError(
            "--two_stage needs --with_box_refine (Deformable DETR's two-stage variant refines boxes)."
        )
    if data_args.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {data_args.num_workers}.")
    if data_args.eval_split in ("", "none", "None"):
        data_args.eval_split = None
    scale = data_args.eval_scale
    if len(scale) != 2 or not 1 <= scale[0] <= scale[1]:
        raise UsageError(f"--eval_scale takes two integers 1 <= shorter side <= longest side, got {scale}.")
    if data_args.eval_threshold is None:
        data_args.eval_threshold = DEFAULT_EVAL_THRESHOLDS[model_args.head]
    for name in ("crop_prob", "flip_prob", "eval_threshold"):
        value = getattr(data_args, name)
        if not 0 <= value <= 1:
            raise UsageError(f"--{name} must be in [0, 1], got {value}.")
    if training_args.lr_decay_steps is None:
        training_args.lr_decay_steps = [
            round(training_args.max_steps * 8 / 12),
            round(training_args.max_steps * 11 / 12),
        ]
    steps = training_args.lr_decay_steps
    if any(step < 1 for step in steps) or steps != sorted(steps):
        raise UsageError(f"--lr_decay_steps takes increasing positive steps, got {steps}.")
    if not 0 < training_args.lr_decay_factor <= 1:
        raise UsageError(f"--lr_decay_factor must be in (0, 1], got {training_args.lr_decay_factor}.")
    check_drop_path_rate(model_args.drop_path_rate)


__all__ = [
    "ARGUMENT_CLASSES",
    "DEFAULT_EVAL_THRESHOLDS",
    "HEADS",
    "DetectionDataArguments",
    "DetectionModelArguments",
    "DetectionTrainingArguments",
    "parse_detection_arguments",
    "validate_arguments",
]
