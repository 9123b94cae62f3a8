#!/usr/bin/env python
"""Pretrain a SelfPatch (or plain DINO) ViT with Accelerate on streamed images, and publish its backbone.

    accelerate launch training/pretrain.py training/configs/selfpatch_vit_small_imagenet.yaml
    accelerate launch --num_processes 8 training/pretrain.py RECIPE.yaml --output_dir runs/vits16 --push_to_hub \
        --hub_model_id me/selfpatch-vits16
    python training/pretrain.py --preset vit-tiny-patch16 --config_overrides global_crop_size=96 \
        --dataset_name offline-sample --max_steps 20 --output_dir runs/demo
    accelerate launch training/pretrain.py RECIPE.yaml --resume_from_checkpoint latest

A recipe file (YAML or JSON, the first argument) sets any option below; options given on the command line after it
override the file. `config_overrides` sets any field of `SelfPatchConfig` or of the backbone's `ViTConfig`
(`key=value` pairs on the command line, a mapping in a recipe file; both merge, the command line winning).

The run writes into `--output_dir`: `metrics.jsonl` (and tracker logs under `logs/`), `checkpoints/checkpoint-<step>`
(accelerate state + per-process data positions, written atomically), `backbone/` (the teacher's backbone as a plain
`ViTModel` with image processor and model card, loadable with `AutoModel.from_pretrained`) and, at the end,
`pretraining_model/` (the whole `SelfPatchViTForPretraining`). Schedules follow docs/method.md section 10, per
optimiser step of the GLOBAL batch (processes x per-device batch x accumulation); see `selfpatch_hf.training.schedules`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
import transformers
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, TorchDynamoPlugin, set_seed
from huggingface_hub.errors import StrictDataclassError
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from selfpatch_hf import SelfPatchConfig, SelfPatchViTForPretraining, export_backbone
from selfpatch_hf.configuration_selfpatch import BACKBONE_PRESETS
from selfpatch_hf.data.augmentation import MultiCropAugmentation
from selfpatch_hf.data.streaming import MultiCropDataLoader, load_image_stream
from selfpatch_hf.model_card import BackboneCardInfo
from selfpatch_hf.training.checkpointing import CHECKPOINTS_DIRNAME, CheckpointManager, list_checkpoints
from selfpatch_hf.training.host_memory import keep_freed_host_memory
from selfpatch_hf.training.hub_uploads import AsyncHubUploader
from selfpatch_hf.training.metrics_log import METRICS_FILENAME, MetricsLog, WindowMeans
from selfpatch_hf.training.optimization import (
    apply_schedule,
    build_optimizer,
    cancel_gradients,
    clip_gradients_per_parameter,
)
from selfpatch_hf.training.preemption import StopRequest
from selfpatch_hf.training.schedules import PretrainingSchedule, ScheduleValues, optimizer_steps_per_epoch

logger = get_logger(__name__)

OFFLINE_SAMPLE = "offline-sample"
IMAGENET_TRAIN_SIZE = 1_281_167


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    preset: str = field(
        default="vit-small-patch16",
        metadata={"help": f"Backbone preset: {', '.join(sorted(BACKBONE_PRESETS))}."},
    )
    config_overrides: list[str] | None = field(
        default=None,
        metadata={
            "help": "key=value pairs setting any SelfPatchConfig or ViTConfig field, e.g. `patch_loss_weight=0 "
            "image_representation=cls` (plain DINO), `num_local_crops=6 local_crop_size=96 drop_path_rate=0.1`, "
            "`num_hidden_layers=6`. Values are parsed as YAML (numbers, true/false, [224,160])."
        },
    )


@dataclass
class DataArguments:
    dataset_name: str = field(
        default=OFFLINE_SAMPLE,
        metadata={
            "help": f"Images to train on: a Hub dataset (e.g. ILSVRC/imagenet-1k), a local folder / file / glob of "
            f"parquet, imagefolder or webdataset files, or `{OFFLINE_SAMPLE}` (photographs bundled with "
            "scikit-image; no network)."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of the Hub dataset."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str | None = field(
        default=None, metadata={"help": "Image column (default: the dataset's only Image column)."}
    )
    streaming: bool = field(
        default=True,
        metadata={"help": "Stream the dataset (default). --no_streaming downloads and prepares it first."},
    )
    samples_per_epoch: int = field(
        default=IMAGENET_TRAIN_SIZE,
        metadata={
            "help": "Images per epoch (a stream has no length). Epochs set the schedules' time scale; the default "
            "is the ImageNet-1k train set."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "Shuffle buffer per data worker (0: file order, exact resume)."}
    )
    num_workers: int = field(
        default=2, metadata={"help": "Data loading worker processes per training process."}
    )
    min_image_size: int = field(default=16, metadata={"help": "Skip images whose shorter side is smaller."})


@dataclass
class PretrainingArguments:
    output_dir: str | None = field(
        default=None, metadata={"help": "Where metrics, checkpoints and exports go (required)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh even if output_dir holds checkpoints of an earlier run."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, data order and crops."})
    per_device_train_batch_size: int = field(
        default=64, metadata={"help": "Images per process per micro-batch."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimiser step."}
    )
    epochs: float = field(
        default=300, metadata={"help": "Training length in epochs of samples_per_epoch images."}
    )
    max_steps: int = field(
        default=-1, metadata={"help": "Training length in optimiser steps; overrides epochs when > 0."}
    )
    learning_rate: float = field(
        default=5e-4,
        metadata={
            "help": "Peak learning rate for a global batch of 256; scaled linearly with the global batch."
        },
    )
    min_learning_rate: float = field(
        default=1e-6, metadata={"help": "Learning rate at the end of the cosine."}
    )
    warmup_epochs: float = field(default=10, metadata={"help": "Linear learning-rate warm-up from 0."})
    weight_decay: float = field(
        default=0.04, metadata={"help": "Weight decay at the start (cosine schedule)."}
    )
    weight_decay_end: float = field(default=0.4, metadata={"help": "Weight decay at the end."})
    teacher_momentum: float = field(
        default=0.996, metadata={"help": "Teacher EMA momentum at the start (cosine)."}
    )
    teacher_momentum_end: float = field(default=1.0, metadata={"help": "Teacher EMA momentum at the end."})
    teacher_temperature: float = field(
        default=0.04, metadata={"help": "Teacher temperature after the warm-up."}
    )
    warmup_teacher_temperature: float = field(
        default=0.04, metadata={"help": "Teacher temperature at step 0."}
    )
    warmup_teacher_temperature_epochs: float = field(
        default=0, metadata={"help": "Linear teacher-temperature warm-up (DINO ViT-S: 0.04 -> 0.07 over 30)."}
    )
    clip_grad: float = field(
        default=3.0, metadata={"help": "Clip EACH parameter's gradient to this L2 norm (0 disables)."}
    )
    freeze_last_layer_epochs: float = field(
        default=1, metadata={"help": "Epochs during which the heads' last layers get no update."}
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None,
        metadata={
            "help": "Autocast precision (default: accelerate launch's setting). fp16 uses loss scaling."
        },
    )
    cpu: bool = field(default=False, metadata={"help": "Train on the CPU even if an accelerator is present."})
    keep_freed_host_memory: bool = field(
        default=True,
        metadata={
            "help": "On the CPU, keep freed memory in the process for the next step instead of page-faulting it "
            "in again (glibc only; ViT-S/16 SelfPatch steps 1.16-1.26x faster; the resident size stays at its peak)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute the student backbone's activations in the backward pass."}
    )
    torch_compile: bool = field(default=False, metadata={"help": "Compile the model with torch.compile."})
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N optimiser steps."})
    report_to: Literal["none", "tensorboard", "wandb", "all"] = field(
        default="none", metadata={"help": "Trackers for the metrics (metrics.jsonl is always written)."}
    )
    run_name: str = field(default="selfpatch-pretraining", metadata={"help": "Tracker project / run name."})
    checkpointing_steps: int = field(
        default=1000, metadata={"help": "Write a checkpoint every N optimiser steps (0: only at the end)."}
    )
    checkpoints_total_limit: int | None = field(
        default=2, metadata={"help": "Keep at most this many checkpoints (oldest deleted)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "`latest` (of output_dir) or a checkpoint-<step> folder to continue from."},
    )
    export_steps: int = field(
        default=0,
        metadata={"help": "Export (and push) the teacher backbone every N steps; always at the end."},
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload every export to the Hub, in the background."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository to push to (user/name)."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repository private."})
    hub_token: str | None = field(
        default=None,
        metadata={"help": "Hub token for pushing and gated datasets (default: HF_TOKEN / login)."},
    )
    hub_upload_attempts: int = field(default=3, metadata={"help": "Attempts per upload before giving up."})
    hub_retry_delay: float = field(
        default=30.0, metadata={"help": "Seconds before retrying a failed upload (doubled each time)."}
    )


class SetupError(Exception):
    """A problem with the arguments or the inputs, found before any training work."""


class TrainingFailed(Exception):
    """Training cannot go on (the message says why and where to continue from)."""


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, losses: dict[str, float]):
        super().__init__(f"non-finite loss at optimiser step {step}: {losses}")
        self.step = step
        self.losses = losses


def _recipe_tokens(recipe: dict[str, Any], parser: HfArgumentParser, path: str) -> list[str]:
    """A recipe mapping as command-line tokens, so that argparse types and checks every value."""
    known = {action.dest: action for action in parser._actions}
    unknown = sorted(set(recipe) - set(known))
    if unknown:
        raise SetupError(f"{path}: unknown option(s) {unknown}. See `python training/pretrain.py --help`.")
    tokens = []
    for key, value in recipe.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            tokens += [f"--{key}", *(str(v) for v in value)]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def _parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SetupError(f"config_overrides entries are key=value pairs, got {item!r}.")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, PretrainingArguments, dict[str, Any]]:
    """Parses `[RECIPE.yaml|json] [--option value ...]`; returns the three argument groups and the merged config
    overrides."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, PretrainingArguments),
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_overrides: dict[str, Any] = {}
    recipe_tokens: list[str] = []
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = argv.pop(0)
        if not os.path.isfile(path):
            raise SetupError(f"Recipe file {path!r} not found.")
        with open(path) as handle:
            recipe = yaml.safe_load(handle) or {}  # YAML is a superset of JSON
        if not isinstance(recipe, dict):
            raise SetupError(f"{path} must hold a mapping of option: value.")
        recipe_overrides = _parse_overrides(recipe.pop("config_overrides", None))
        recipe_tokens = _recipe_tokens(recipe, parser, path)
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=recipe_tokens + argv)
    except ValueError as error:  # unknown options
        raise SetupError(f"{error}. See `python training/pretrain.py --help`.") from None
    overrides = {**recipe_overrides, **_parse_overrides(model_args.config_overrides)}
    return model_args, data_args, training_args, overrides


class _HelpFormatter(transformers.hf_argparser.ArgumentDefaultsHelpFormatter):
    def _fill_text(self, text, width, indent):  # keep the usage examples of the docstring as written
        return "".join(indent + line for line in text.splitlines(keepends=True))


def validate_arguments(data_args: DataArguments, training_args: PretrainingArguments) -> None:
    """Checks that need nothing but the arguments (the model config and the dataset are checked when built)."""
    if not training_args.output_dir:
        raise SetupError(
            "--output_dir is required (metrics, checkpoints and the exported backbone go there)."
        )
    positive = {
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "samples_per_epoch": data_args.samples_per_epoch,
        "logging_steps": training_args.logging_steps,
    }
    for name, value in positive.items():
        if value < 1:
            raise SetupError(f"--{name} must be >= 1, got {value}.")
    if training_args.max_steps <= 0 and training_args.epochs <= 0:
        raise SetupError("Give a training length: --epochs > 0 or --max_steps > 0.")
    for name in ("checkpointing_steps", "export_steps", "num_workers", "shuffle_buffer_size"):
        owner = data_args if hasattr(data_args, name) else training_args
        if getattr(owner, name) < 0:
            raise SetupError(f"--{name} must be >= 0, got {getattr(owner, name)}.")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise SetupError("--push_to_hub needs --hub_model_id (e.g. your-name/selfpatch-vit-small-patch16).")
    if training_args.report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            if training_args.report_to == "wandb":
                raise SetupError("--report_to wandb needs `pip install wandb`.") from None
    if training_args.report_to in ("tensorboard", "all"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            if training_args.report_to == "tensorboard":
                raise SetupError("--report_to tensorboard needs `pip install tensorboard`.") from None
    checkpoints = list_checkpoints(Path(training_args.output_dir) / CHECKPOINTS_DIRNAME)
    if checkpoints and not training_args.resume_from_checkpoint and not training_args.overwrite_output_dir:
        raise SetupError(
            f"{training_args.output_dir} already holds checkpoints of a run (latest: {checkpoints[-1].name}). Pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start afresh, or another "
            "--output_dir."
        )


def build_config(model_args: ModelArguments, overrides: dict[str, Any]) -> SelfPatchConfig:
    try:
        config = SelfPatchConfig.from_preset(model_args.preset, **overrides)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise SetupError(f"Invalid model configuration: {error}") from error
    return config


def card_training_data(dataset_name: str) -> dict[str, Any]:
    """How the model card names the training data: a Hub dataset id goes into its `datasets` metadata; the offline
    sample and local files are described in its body (they are no Hub datasets)."""
    from selfpatch_hf.data.sample_photographs import SAMPLE_DATASET_DESCRIPTION
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
        from selfpatch_hf.data.sample_photographs import sample_dataset_path

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
        raise SetupError(f"Cannot train on the dataset {data_args.dataset_name!r}: {error}") from error


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
    augmentation = MultiCropAugmentation(
        global_crop_size=config.global_crop_size,
        local_crop_size=config.local_crop_size,
        num_local_crops=config.num_local_crops,
        global_crops_scale=config.global_crops_scale,
        local_crops_scale=config.local_crops_scale,
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
    )


def limit_cpu_threads(accelerator: Accelerator, num_workers: int) -> None:
    """On the CPU, leave a core to each data worker: oversubscribed cores make torch's threads wait for each other
    at every parallel region, which costs far more than the threads gain (5-25x slower steps on 2 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    threads = max(1, min(torch.get_num_threads(), cores // max(1, local_processes) - num_workers))
    if threads < torch.get_num_threads():
        logger.info(
            "Using %d torch thread(s) per process: %d core(s) for %d process(es) on this machine, %d data worker(s) "
            "each.",
            threads,
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
    limit_cpu_threads(accelerator, data_args.num_workers)
    if training_args.keep_freed_host_memory and keep_freed_host_memory():
        logger.info("Freed host memory is kept for reuse (glibc mallopt).")
    if accelerator.mixed_precision == "fp16":
        logger.warning("--mixed_precision fp16 has no effect on the CPU (accelerate runs fp32 there).")
    elif accelerator.mixed_precision == "bf16":
        logger.warning(
            "bf16 on a CPU without bf16 units is far slower than fp32; consider --mixed_precision no."
        )


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
            raise TrainingFailed(
                f"a whole pass over the data gave process {loader.rank} no batch of "
                f"{loader.batch_size} images: the dataset is too small for this per-device batch size and "
                f"{loader.num_workers} worker(s) (each worker drops its incomplete last batch), or all its images "
                f"were skipped ({loader.skipped_images} so far). Use a smaller batch or fewer workers."
            )


# ---------------------------------------------------------------------------------------------------------------------
# One optimiser step
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: float
    image_loss: float
    patch_loss: float | None
    stop_requested: bool


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    values: ScheduleValues,
    clip_grad: float,
    stop_requested: bool = False,
) -> StepResult:
    """One optimiser step over `gradient_accumulation_steps` micro-batches, then the teacher's EMA update.

    `model` is the prepared (DDP-wrapped) model, so gradients are averaged over processes; the centres are
    all-reduced inside its forward. Losses are averaged over micro-batches and processes, and the stop flag is
    or-ed over processes, in one all-reduce before the optimiser step: every process takes the same decision, and
    a non-finite loss raises `NonFiniteLossError` before it can reach the weights.
    """
    unwrapped = accelerator.unwrap_model(model)
    totals = torch.zeros(3, device=accelerator.device)
    micro_steps = 0
    for global_crops, local_crops in micro_batches:
        global_crops = global_crops.to(accelerator.device, non_blocking=True)
        local_crops = local_crops.to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            outputs = model(global_crops, local_crops, teacher_temperature=values.teacher_temperature)
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
                if clip_grad > 0:
                    accelerator.unscale_gradients(optimizer)  # fp16: clip the true gradients
                    clip_gradients_per_parameter(unwrapped.student.parameters(), clip_grad)
                if values.freeze_last_layer:
                    cancel_gradients(unwrapped.get_last_layer_parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    unwrapped.update_teacher(values.teacher_momentum)
    return StepResult(
        loss=loss,
        image_loss=image_loss,
        patch_loss=patch_value if outputs.patch_loss is not None else None,
        stop_requested=stop_share > 0,
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
# Training
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


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PretrainingArguments,
    config_overrides: dict[str, Any],
) -> PretrainingResult:
    validate_arguments(data_args, training_args)
    output_dir = Path(training_args.output_dir)
    config = build_config(model_args, config_overrides)
    dataset, image_column = open_image_stream(data_args, training_args)

    # ---- accelerator
    accelerator = Accelerator(
        cpu=training_args.cpu,
        mixed_precision=training_args.mixed_precision,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        log_with=None if training_args.report_to == "none" else training_args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        # the centres are all-reduced inside forward; the model has no other buffers worth broadcasting
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if training_args.torch_compile else None,
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    logging.getLogger("selfpatch_hf").setLevel(
        logging.INFO if accelerator.is_main_process else logging.WARNING
    )
    logging.getLogger("selfpatch_hf.data.streaming").setLevel(
        logging.WARNING
    )  # a line per data pass; skips still show
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    logger.info(accelerator.state, main_process_only=False)

    # ---- schedules, per optimiser step of the global batch (before anything is written: they check arguments)
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
        schedule = PretrainingSchedule.from_epochs(
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            base_learning_rate=training_args.learning_rate,
            global_batch_size=global_batch_size,
            min_learning_rate=training_args.min_learning_rate,
            warmup_epochs=training_args.warmup_epochs,
            weight_decay=training_args.weight_decay,
            weight_decay_end=training_args.weight_decay_end,
            teacher_momentum=training_args.teacher_momentum,
            teacher_momentum_end=training_args.teacher_momentum_end,
            teacher_temperature=training_args.teacher_temperature,
            warmup_teacher_temperature=training_args.warmup_teacher_temperature,
            warmup_teacher_temperature_epochs=training_args.warmup_teacher_temperature_epochs,
            freeze_last_layer_epochs=training_args.freeze_last_layer_epochs,
        )
    except ValueError as error:
        raise SetupError(
            f"{error} (samples_per_epoch {data_args.samples_per_epoch}, global batch {global_batch_size} = "
            f"{accelerator.num_processes} processes x {training_args.per_device_train_batch_size} per device x "
            f"{training_args.gradient_accumulation_steps} accumulation steps)"
        ) from error

    configure_cpu_training(accelerator, data_args, training_args)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if training_args.overwrite_output_dir and not training_args.resume_from_checkpoint:
            # an earlier run's checkpoints would otherwise be taken for this run's by `latest`
            shutil.rmtree(output_dir / CHECKPOINTS_DIRNAME, ignore_errors=True)
            (output_dir / METRICS_FILENAME).unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    # ---- data (each process streams its own part)
    train_loader = build_dataloader(dataset, image_column, data_args, training_args, config, accelerator)

    # ---- model and optimiser; the same seed on every process gives the same initial weights
    set_seed(training_args.seed)
    model = SelfPatchViTForPretraining(config)
    if training_args.gradient_checkpointing:
        model.student.backbone.activation_checkpointing_enable()
    optimizer = build_optimizer(model.student)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise SetupError("Several processes but no distributed setup: launch with `accelerate launch`.")
    # drop-path masks differ between processes (the initial weights were drawn above with the shared seed)
    set_seed(training_args.seed, device_specific=True)

    # ---- resume
    checkpoints = CheckpointManager(accelerator, output_dir, training_args.checkpoints_total_limit)
    metrics_log = MetricsLog(accelerator, output_dir)
    global_step = 0
    last_checkpoint: Path | None = None
    if training_args.resume_from_checkpoint:
        try:
            last_checkpoint = checkpoints.resolve(training_args.resume_from_checkpoint)
            loaded = checkpoints.load(last_checkpoint) if last_checkpoint is not None else None
        except (FileNotFoundError, ValueError) as error:  # no such checkpoint, or not one of this model/run
            raise SetupError(f"Cannot resume: {error}") from error
        if loaded is None:
            logger.info("No checkpoint in %s yet: starting from scratch.", checkpoints.directory)
        else:
            trainer_state, rank_state = loaded
            if trainer_state["global_batch_size"] != global_batch_size:
                raise SetupError(
                    f"{last_checkpoint} was trained with a global batch of {trainer_state['global_batch_size']}, "
                    f"this run has {global_batch_size}: the schedules are defined per optimiser step of that batch. "
                    "Resume with the same processes x per-device batch x accumulation."
                )
            changed = schedule.differences(PretrainingSchedule.from_dict(trainer_state["schedule"]))
            if changed:
                logger.warning("Schedules differ from the checkpoint's (now, saved): %s", changed)
            train_loader.load_state_dict(rank_state["data"])
            global_step = trainer_state["step"]
            logger.info("Resumed from %s at optimiser step %d.", last_checkpoint, global_step)
            metrics_log.event("resumed", global_step, checkpoint=str(last_checkpoint))

    def save_checkpoint(step: int) -> Path:
        trainer_state = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "global_batch_size": global_batch_size,
            "num_processes": accelerator.num_processes,
            "schedule": schedule.to_dict(),
            "config_overrides": config_overrides,
            "arguments": {**asdict(model_args), **asdict(data_args), **_public(asdict(training_args))},
        }
        rank_state = {"rank": accelerator.process_index, "data": train_loader.state_dict()}
        path = checkpoints.save(step, trainer_state, rank_state)
        metrics_log.event("checkpoint", step, path=str(path))
        return path

    # ---- publishing (main process; uploads in the background)
    uploader = None
    if training_args.push_to_hub and accelerator.is_main_process:
        uploader = AsyncHubUploader(
            training_args.hub_model_id,
            output_dir / ".hub_uploads",
            token=training_args.hub_token,
            private=training_args.hub_private,
            max_attempts=training_args.hub_upload_attempts,
            retry_delay=training_args.hub_retry_delay,
        )

    def export(step: int) -> Path | None:
        path = None
        if accelerator.is_main_process:
            card = BackboneCardInfo.from_selfpatch_config(
                config,
                architecture=model_args.preset,
                source="trained",
                **card_training_data(data_args.dataset_name),
                epochs=round(step / steps_per_epoch, 4),
                steps=step,
                global_batch_size=global_batch_size,
                learning_rate=schedule.learning_rate,
                repo_id=training_args.hub_model_id if training_args.push_to_hub else None,
            )
            path = export_backbone(unwrapped, output_dir / "backbone", source="teacher", card_info=card)
            metrics_log.event("export", step, path=str(path))
            if uploader is not None:
                uploader.submit(
                    path, step, commit_message=f"Teacher backbone at step {step} of {total_steps}"
                )
        accelerator.wait_for_everyone()
        return path

    # ---- trackers
    if accelerator.is_main_process and training_args.report_to != "none":
        hyperparameters = {
            **asdict(model_args),
            **asdict(data_args),
            **_public(asdict(training_args)),
            **{f"config.{k}": v for k, v in config_overrides.items()},
        }
        accelerator.init_trackers(
            training_args.run_name,
            config={
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hyperparameters.items()
            },
        )

    logger.info(
        "Training %s on %s: %d optimiser steps (%.2f epochs of %d images), global batch %d = %d processes x %d x %d "
        "accumulation, peak lr %.3g, %d student parameters.",
        model_args.preset,
        data_args.dataset_name,
        total_steps,
        total_steps / steps_per_epoch,
        data_args.samples_per_epoch,
        global_batch_size,
        accelerator.num_processes,
        training_args.per_device_train_batch_size,
        training_args.gradient_accumulation_steps,
        schedule.learning_rate,
        sum(p.numel() for p in unwrapped.student.parameters() if p.requires_grad),
    )
    metrics_log.event("start", global_step, total_steps=total_steps, global_batch_size=global_batch_size)

    # ---- the loop
    batches = endless_batches(train_loader)
    progress = tqdm(
        total=total_steps, initial=global_step, disable=not accelerator.is_main_process, desc="pretraining"
    )
    window = WindowMeans()
    stopped_by = None
    try:
        with StopRequest() as stop:
            while global_step < total_steps:
                started = time.perf_counter()
                values = schedule.at(global_step)
                apply_schedule(optimizer, values)
                micro_batches = _take(batches, training_args.gradient_accumulation_steps)
                try:
                    result = train_step(
                        accelerator,
                        model,
                        optimizer,
                        micro_batches,
                        values,
                        training_args.clip_grad,
                        stop.requested,
                    )
                except NonFiniteLossError as error:
                    metrics_log.event("non_finite_loss", error.step, **error.losses)
                    good = (
                        f"the last good checkpoint is {last_checkpoint}"
                        if last_checkpoint
                        else "no checkpoint yet"
                    )
                    raise TrainingFailed(
                        f"non-finite loss at optimiser step {error.step} (epoch {error.step / steps_per_epoch:.2f}; "
                        f"{error.losses}); {good}. Lower --learning_rate, lengthen --warmup_epochs, lower --clip_grad "
                        "or train in fp32, then continue with --resume_from_checkpoint."
                    ) from error
                global_step += 1
                losses = {
                    "loss": result.loss,
                    "image_loss": result.image_loss,
                    "patch_loss": result.patch_loss,
                }
                window.add(losses, global_batch_size, time.perf_counter() - started)
                progress.update(1)
                progress.set_postfix(
                    loss=f"{result.loss:.4f}",
                    img=f"{result.image_loss:.4f}",
                    patch="-" if result.patch_loss is None else f"{result.patch_loss:.4f}",
                    lr=f"{values.learning_rate:.2e}",
                    ips=f"{window.images_per_second or 0:.1f}",
                    refresh=False,
                )

                if global_step % training_args.logging_steps == 0 or global_step == total_steps:
                    skipped = accelerator.reduce(
                        torch.tensor(train_loader.skipped_images, device=accelerator.device), reduction="sum"
                    ).item()
                    metrics_log.metrics(
                        global_step,
                        {
                            **window.means(),
                            "epoch": round(global_step / steps_per_epoch, 6),
                            "learning_rate": values.learning_rate,
                            "weight_decay": values.weight_decay,
                            "teacher_momentum": values.teacher_momentum,
                            "teacher_temperature": values.teacher_temperature,
                            "images_per_second": window.images_per_second,
                            "samples_seen": global_step * global_batch_size,
                            "skipped_images": int(skipped),
                        },
                    )
                    window.reset()
                if uploader is not None:
                    for outcome in uploader.poll():
                        metrics_log.event(
                            "upload", outcome.step, status=outcome.status, url=outcome.commit_url
                        )

                if result.stop_requested:
                    stopped_by = stop.signal_name or "another process's signal"
                    last_checkpoint = save_checkpoint(global_step)
                    metrics_log.event(
                        "stopped", global_step, signal=stopped_by, checkpoint=str(last_checkpoint)
                    )
                    logger.warning(
                        "Stopped by %s at step %d; checkpoint %s. Continue with --resume_from_checkpoint latest.",
                        stopped_by,
                        global_step,
                        last_checkpoint,
                    )
                    break
                periodic = (
                    training_args.checkpointing_steps and global_step % training_args.checkpointing_steps == 0
                )
                if periodic or global_step == total_steps:
                    last_checkpoint = save_checkpoint(global_step)
                if training_args.export_steps and global_step % training_args.export_steps == 0:
                    if global_step < total_steps:
                        export(global_step)

        # ---- final export
        export_dir = None
        if stopped_by is None:
            export_dir = export(global_step)
            if accelerator.is_main_process:
                unwrapped.save_pretrained(output_dir / "pretraining_model")
                logger.info("Done: %d steps; teacher backbone in %s", global_step, export_dir)
    finally:
        progress.close()
        # ---- uploads: wait for them (not for retries when pre-empted: the grace period is short) and report
        upload_report = []
        if uploader is not None:
            if uploader.pending:
                logger.info("Waiting for the pending Hub upload(s)...")
            uploader.wait(timeout=0 if stopped_by else None)
            upload_report = uploader.report()
            for outcome in uploader.outcomes:
                metrics_log.event("upload", outcome.step, status=outcome.status, url=outcome.commit_url)
            for line in upload_report:
                logger.info("Hub upload %s", line)
    metrics_log.event(
        "end", global_step, stopped_by=stopped_by, export=str(export_dir) if export_dir else None
    )
    return PretrainingResult(
        accelerator=accelerator,
        model=unwrapped,
        global_step=global_step,
        total_steps=total_steps,
        stopped_by=stopped_by,
        export_dir=export_dir,
        upload_report=upload_report,
    )


def _public(arguments: dict[str, Any]) -> dict[str, Any]:
    """Arguments without secrets (what checkpoints and trackers record)."""
    return {key: ("***" if key == "hub_token" and value else value) for key, value in arguments.items()}


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, data_args, training_args, overrides = parse_arguments(argv)
        result = train(model_args, data_args, training_args, overrides)
    except SetupError as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingFailed as error:
        print(f"pretrain.py: training failed: {error}", file=sys.stderr)
        return 1
    result.accelerator.end_training()
    if result.stopped_by is not None:
        return 128 + {"SIGTERM": 15, "SIGINT": 2}.get(result.stopped_by, 15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
