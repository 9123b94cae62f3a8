"""The options of `training/finetune_segmentation.py`: three argument dataclasses, recipe files and the checks that
need nothing but the arguments.

`parse_finetuning_arguments(["recipe.yaml", "--learning_rate", "1e-4"])` reads a recipe file (YAML or JSON, a
mapping of option: value) and the command line after it, the command line winning, through `HfArgumentParser`, so
every value of the file is typed and checked like the same option on the command line. Mistakes raise
`selfpatch_hf.cli.errors.UsageError` (exit status 2, one line naming the option and the fix).

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


@dataclass
class SegmentationModelArguments:
    backbone: str | None = option(
        None,
        "The pretrained backbone (required): a ViTModel folder or Hub id (our export, a converted DINO), a converted "
        "CLS-free SelfPatch SiglipVisionModel, a SelfPatch pretraining folder, a Dinov2Backbone folder, or "
        f"`{RANDOM_BACKBONE_PREFIX}PRESET` (a randomly initialised ViT, e.g. {RANDOM_BACKBONE_PREFIX}vit-tiny-patch16).",
    )
    neck: Literal["multiscale", "single"] = option(
        "multiscale",
        "multiscale: UperNet on strides 4, 8, 16, 32 made from four blocks by the reference's neck "
        "(BeitBackbone(add_fpn=True); the paper's Semantic FPN reads such maps); single: UperNet on four blocks at "
        "the patch stride (Dinov2Backbone). A Swin backbone is multi-scale either way.",
    )
    out_indices: list[int] | None = option(
        None,
        "Blocks whose outputs feed the head (default: --neck multiscale 3, 6, 9, 12 of 12 (a quarter, half, three "
        "quarters and all of the depth; exactly four), --neck single 4, 6, 8, 12 (a third, half, two thirds, all)).",
    )
    decoder_hidden_size: int = option(512, "UperNet's channel width.")
    use_auxiliary_head: bool = option(True, "Train UperNet's auxiliary FCN head on the third feature map.")
    auxiliary_loss_weight: float = option(0.4, "Weight of the auxiliary head's loss.")
    drop_path_rate: float = option(0.1, "Stochastic depth in the backbone (ViT backbones).")


@dataclass
class SegmentationDataArguments:
    dataset_name: str | None = option(
        None,
        "A `datasets` dataset with an image and a mask column (required): a Hub id (scene_parse_150 = ADE20K, with "
        "--reduce_labels), a local folder, or `offline-scenes` (the synthetic set, built under --offline_data_dir).",
    )
    dataset_config_name: str | None = option(None, "Configuration of the Hub dataset.")
    dataset_revision: str | None = option(
        None,
        "Revision of the Hub dataset, e.g. `refs/convert/parquet` (the Hub's parquet conversion of a dataset that "
        "still ships a loading script, which `datasets` 4+ no longer runs).",
    )
    train_split: str = option("train", "Split to train on.")
    eval_split: str | None = option("validation", "Split to evaluate on (none: no evaluation).")
    image_column: str | None = option(None, "Image column (default: `image`).")
    mask_column: str | None = option(
        None, "Mask column (default: mask / annotation / ... among Image columns)."
    )
    label_names: str | None = option(
        None, "Class names: `ade20k`, `offline-scenes` or a JSON file (default: known from the dataset name)."
    )
    reduce_labels: bool = option(False, "Label 0 is 'other' (ignored) and l becomes l - 1 (ADE20K).")
    ignore_index: int = option(255, "Label value that is not trained on or scored.")
    offline_data_dir: str | None = option(
        None,
        "Where `offline-scenes` is found or built (segmentation/ inside). Default: the cache folder "
        "`selfpatch eval make-offline-data` writes to ($SELFPATCH_HF_CACHE/offline-eval, else "
        "~/.cache/selfpatch_hf/offline-eval).",
    )
    max_train_samples: int | None = option(None, "Use only the first N training images.")
    max_eval_samples: int | None = option(None, "Evaluate on the first N evaluation images only.")
    crop_size: list[int] = option(help="Training crop (height width).", default_factory=lambda: [512, 512])
    scale: list[int] = option(
        help="Long and short side bounds of the rescale before the random ratio, and of evaluation.",
        default_factory=lambda: [2048, 512],
    )
    ratio_range: list[float] = option(help="Random rescale ratio range.", default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = option(0.75, "Redraw a crop (up to 10 times) when one class covers more of it.")
    flip_prob: float = option(0.5, "Horizontal flip probability.")
    photometric: bool = option(True, "Photometric distortion (brightness, contrast, saturation, hue).")
    num_workers: int = option(2, "Data loading worker processes per training process.")


@dataclass
class SegmentationTrainingArguments(FinetuningArguments):
    seed: int = option(0, "Seed of the head initialisation, data order and augmentation.")
    per_device_train_batch_size: int = option(4, "Images per process per micro-batch (>= 2: UperNet has BN).")
    max_steps: int = option(40000, "Training length in optimiser steps (iterations).")
    learning_rate: float = option(6e-5, "Peak learning rate (not scaled with the batch).")
    weight_decay: float = option(0.01, "AdamW weight decay (none on biases, norms, position embeddings).")
    lr_scheduler: Literal["poly", "cosine"] = option("poly", "Decay after the warm-up.")
    poly_power: float = option(1.0, "Power of the poly decay.")
    warmup_steps: int = option(1500, "Linear warm-up steps.")
    warmup_ratio: float = option(1e-6, "Warm-up starts at this fraction of the learning rate.")
    inference_mode: Literal["whole", "slide"] = option(
        "whole",
        "Evaluation on whole images (what pipeline(image-segmentation) does with the saved model and its image "
        "processor) or sliding windows.",
    )
    slide_stride: list[int] | None = option(
        None, "Sliding-window stride (height width; default: two thirds of --crop_size, mmseg's 341 for 512)."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        None, "Autocast precision (default: accelerate launch's setting). The CPU stays fp32 by default."
    )
    sync_batch_norm: bool = option(True, "SyncBatchNorm in the heads with several GPUs (mmseg's SyncBN).")
    run_name: str = option("selfpatch-segmentation", "Tracker project / run name.")
    checkpointing_steps: int = option(
        4000, "Write a checkpoint every N optimiser steps (0: only at the end)."
    )


ARGUMENT_CLASSES = (SegmentationModelArguments, SegmentationDataArguments, SegmentationTrainingArguments)


def parse_finetuning_arguments(
    argv: list[str], description: str | None = None
) -> tuple[SegmentationModelArguments, SegmentationDataArguments, SegmentationTrainingArguments]:
    """`[RECIPE.yaml|json] [--option value ...]` -> the three argument groups (checked by `validate_arguments`)."""
    return parse_task_arguments(
        ARGUMENT_CLASSES,
        argv,
        script="training/finetune_segmentation.py",
        description=description,
        validate=validate_arguments,
    )


def validate_arguments(
    model_args: SegmentationModelArguments,
    data_args: SegmentationDataArguments,
    training_args: SegmentationTrainingArguments,
) -> None:
    """Checks that need nothing but the arguments (the backbone and the dataset are checked when loaded)."""
    for name, value in (
        ("backbone", model_args.backbone),
        ("dataset_name", data_args.dataset_name),
        ("output_dir", training_args.output_dir),
    ):
        if not value:
            raise UsageError(f"--{name} is required (see --help).")
    if model_args.decoder_hidden_size < 1:
        raise UsageError(f"--decoder_hidden_size must be >= 1, got {model_args.decoder_hidden_size}.")
    if data_args.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {data_args.num_workers}.")
    for name in ("crop_size", "scale"):
        values = getattr(data_args, name)
        if len(values) != 2 or min(values) < 1:
            raise UsageError(f"--{name} takes two positive integers (height width), got {values}.")
    if training_args.slide_stride is None:
        training_args.slide_stride = [size * 2 // 3 for size in data_args.crop_size]
    stride = training_args.slide_stride
    if len(stride) != 2 or min(stride) < 1 or any(s > c for s, c in zip(stride, data_args.crop_size)):
        raise UsageError(
            f"--slide_stride takes two positive integers no larger than --crop_size {data_args.crop_size}, got "
            f"{stride}."
        )
    low, high = data_args.ratio_range if len(data_args.ratio_range) == 2 else (0, -1)
    if not 0 < low <= high:
        raise UsageError(f"--ratio_range takes two numbers 0 < low <= high, got {data_args.ratio_range}.")
    if not training_args.poly_power >= 0:
        raise UsageError(f"--poly_power must be >= 0, got {training_args.poly_power}.")
    if not model_args.auxiliary_loss_weight >= 0:
        raise UsageError(f"--auxiliary_loss_weight must be >= 0, got {model_args.auxiliary_loss_weight}.")
    if not 0 < data_args.cat_max_ratio <= 1:
        raise UsageError(f"--cat_max_ratio must lie in (0, 1], got {data_args.cat_max_ratio}.")
    if not 0 <= data_args.flip_prob <= 1:
        raise UsageError(f"--flip_prob must lie in [0, 1], got {data_args.flip_prob}.")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1 (or unset: all), got {value}.")
    check_drop_path_rate(model_args.drop_path_rate)
    validate_finetuning_arguments(
        training_args, hub_model_example="your-name/upernet-selfpatch-vits16-ade20k"
    )


__all__ = [
    "ARGUMENT_CLASSES",
    "RANDOM_BACKBONE_PREFIX",
    "SegmentationDataArguments",
    "SegmentationModelArguments",
    "SegmentationTrainingArguments",
    "parse_finetuning_arguments",
    "validate_arguments",
]
