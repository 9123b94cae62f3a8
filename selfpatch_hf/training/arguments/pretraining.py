"""The options of `training/pretrain.py`: three argument dataclasses, recipe files, and the checks that need nothing
but the arguments.

`parse_pretraining_arguments(["recipe.yaml", "--learning_rate", "1e-3"])` reads a recipe file (YAML or JSON, a
mapping of option: value) and the command line after it, the command line winning (see `recipes`): every value of
the file is typed and checked exactly like the same option on the command line. `config_overrides`
(`key=value` pairs on the command line; a mapping or a list of `key=value` strings in a file) set fields of
`SelfPatchConfig` or of its backbone's `ViTConfig`; both sources merge, the command line winning.

Mistakes raise `selfpatch_hf.cli.errors.UsageError` (exit status 2, one line naming the option and the fix).
Checks the library makes itself (the model configuration, the schedules, the crop recipe, the data loader) are not
repeated here: the script turns their errors into the same one-line answer.

Importing this module loads no torch, datasets or model code, so `--help` and argument mistakes answer at once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from selfpatch_hf.cli.errors import UsageError
from selfpatch_hf.training.arguments.recipe_files import (
    check_no_unresumed_run,
    check_trackers_installed,
    option,
    parse_recipe_and_command_line,
    yaml_problem,
)
from selfpatch_hf.training.schedules import ScheduleRecipe

if TYPE_CHECKING:
    from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig

# the photographs bundled with scikit-image (selfpatch_hf.data.samples.photographs)
OFFLINE_SAMPLE = "offline-sample"
IMAGENET_TRAIN_SIZE = 1_281_167
SCRIPT = "training/pretrain.py"
_SCHEDULE_DEFAULTS = ScheduleRecipe()  # the schedules' defaults are written once, in `ScheduleRecipe`
# The options whose default depends on the image-level objective (`SelfPatchConfig.image_objective`): left unset
# (None) on the command line and in the recipe, they take these values. DINO: `ScheduleRecipe`'s (the reference
# ViT-S/16 run) and DINO's per-tensor clipping. MoBY (its public code, Transformer-SSL): lr 1e-3 per 512 images
# (= 5e-4 per 256; min 5e-6), 5 warm-up epochs, constant weight decay 0.05, momentum 0.99 -> 1 (cosine), the
# gradient clipped to a global norm of 5.0 over all parameters, no last layer to freeze.
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "dino": {
        **{name: getattr(_SCHEDULE_DEFAULTS, name) for name in ("min_learning_rate", "warmup_epochs")},
        **{name: getattr(_SCHEDULE_DEFAULTS, name) for name in ("weight_decay", "weight_decay_end")},
        "teacher_momentum": _SCHEDULE_DEFAULTS.teacher_momentum,
        "freeze_last_layer_epochs": _SCHEDULE_DEFAULTS.freeze_last_layer_epochs,
        "clip_grad": 3.0,
        "clip_grad_mode": "per_parameter",
    },
    "moby": {
        "min_learning_rate": 5e-6,
        "warmup_epochs": 5.0,
        "weight_decay": 0.05,
        "weight_decay_end": 0.05,
        "teacher_momentum": None,  # the model config's `moby_momentum` (one home: converted checkpoints set it)
        "freeze_last_layer_epochs": 0.0,
        "clip_grad": 5.0,
        "clip_grad_mode": "global",
    },
}


def _by_objective(name: str) -> str:
    dino, moby = OBJECTIVE_DEFAULTS["dino"][name], OBJECTIVE_DEFAULTS["moby"][name]
    moby = "the config's moby_momentum, 0.99 by default" if moby is None else moby
    return f" Default: the image objective's (DINO {dino}, MoBY {moby})."


@dataclass
class ModelArguments:
    preset: str = option(
        "vit-small-patch16",
        "Backbone preset of `SelfPatchConfig.from_preset`: vit-small-patch16 (the paper's), vit-tiny-patch16, "
        "vit-base-patch16, ... (an unknown name lists them all).",
    )
    config_overrides: list[str] | None = option(
        None,
        "key=value pairs setting any SelfPatchConfig or ViTConfig field, e.g. `patch_loss_weight=0 "
        "image_representation=cls` (plain DINO), `num_local_crops=6 local_crop_size=96 drop_path_rate=0.1`, "
        "`num_hidden_layers=6`. Values are read as YAML (numbers, true/false, [224,160]).",
    )


@dataclass
class DataArguments:
    dataset_name: str = option(
        OFFLINE_SAMPLE,
        "Images to train on: a Hub dataset (e.g. ILSVRC/imagenet-1k), a local folder / file / glob of parquet, "
        f"imagefolder or webdataset files, or `{OFFLINE_SAMPLE}` (photographs bundled with scikit-image; no "
        "network).",
    )
    dataset_config_name: str | None = option(None, "Configuration of the Hub dataset.")
    dataset_split: str = option("train", "Split to train on.")
    image_column: str | None = option(None, "Image column (default: the dataset's only Image column).")
    streaming: bool = option(
        True, "Stream the dataset (default). --no_streaming downloads and prepares it first."
    )
    samples_per_epoch: int = option(
        IMAGENET_TRAIN_SIZE,
        "Images per epoch (a stream has no length). Epochs set the schedules' time scale; the default is the "
        "ImageNet-1k train set.",
    )
    shuffle_buffer_size: int = option(1000, "Shuffle buffer per data worker (0: file order, exact resume).")
    num_workers: int = option(2, "Data loading worker processes per training process.")
    min_image_size: int = option(16, "Skip images whose shorter side is smaller.")
    augmentation_device: Literal["workers", "device", "device_crops"] = option(
        "workers",
        "Where the crops are finished: in the data workers; `device`: photometric ops (colour jitter, grayscale, "
        "blur, solarisation, normalisation) batched on the training device, workers decode, crop and flip (about "
        "1.5x less CPU per image); `device_crops`: decoding (nvJPEG where torchvision is installed on CUDA, else in "
        "the workers), crops, resizes and photometric ops on the device, workers only read bytes. Same "
        "distributions, reproducible and resumable.",
    )


@dataclass
class PretrainingArguments:
    output_dir: str | None = option(None, "Where metrics, checkpoints and exports go (required).")
    overwrite_output_dir: bool = option(
        False,
        "Start afresh even if output_dir holds checkpoints of an earlier run (they are deleted; it overrides "
        "--resume_from_checkpoint latest).",
    )
    seed: int = option(0, "Seed of the initialisation, data order and crops.")
    per_device_train_batch_size: int = option(64, "Images per process per micro-batch.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimiser step.")
    epochs: float = option(300, "Training length in epochs of samples_per_epoch images.")
    max_steps: int = option(-1, "Training length in optimiser steps; overrides epochs when > 0.")
    # the schedules (selfpatch_hf.training.schedules.ScheduleRecipe holds their defaults)
    learning_rate: float = option(
        _SCHEDULE_DEFAULTS.learning_rate,
        "Peak learning rate for a global batch of 256; scaled linearly with the global batch.",
    )
    min_learning_rate: float | None = option(
        None, "Learning rate at the end of the cosine." + _by_objective("min_learning_rate")
    )
    warmup_epochs: float | None = option(
        None, "Linear learning-rate warm-up from 0." + _by_objective("warmup_epochs")
    )
    weight_decay: float | None = option(
        None, "Weight decay at the start (cosine schedule)." + _by_objective("weight_decay")
    )
    weight_decay_end: float | None = option(
        None, "Weight decay at the end." + _by_objective("weight_decay_end")
    )
    teacher_momentum: float | None = option(
        None,
        "Teacher (MoBY: target) EMA momentum at the start, cosine to teacher_momentum_end."
        + _by_objective("teacher_momentum"),
    )
    teacher_momentum_end: float = option(
        _SCHEDULE_DEFAULTS.teacher_momentum_end, "Teacher EMA momentum at the end."
    )
    teacher_temperature: float = option(
        _SCHEDULE_DEFAULTS.teacher_temperature, "Teacher temperature after the warm-up."
    )
    warmup_teacher_temperature: float = option(
        _SCHEDULE_DEFAULTS.warmup_teacher_temperature, "Teacher temperature at step 0."
    )
    warmup_teacher_temperature_epochs: float = option(
        _SCHEDULE_DEFAULTS.warmup_teacher_temperature_epochs,
        "Linear teacher-temperature warm-up (DINO ViT-S: 0.04 -> 0.07 over 30).",
    )
    freeze_last_layer_epochs: float | None = option(
        None,
        "Epochs during which the heads' last layers get no update."
        + _by_objective("freeze_last_layer_epochs"),
    )
    clip_grad: float | None = option(
        None, "Gradient clipping threshold, an L2 norm (0 disables)." + _by_objective("clip_grad")
    )
    clip_grad_mode: Literal["per_parameter", "global"] | None = option(
        None,
        "per_parameter: each parameter tensor's gradient clipped to clip_grad (DINO); global: one norm over all "
        "parameters (MoBY, torch.nn.utils.clip_grad_norm_)." + _by_objective("clip_grad_mode"),
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        None, "Autocast precision (default: accelerate launch's setting). fp16 uses loss scaling."
    )
    cpu: bool = option(False, "Train on the CPU even if an accelerator is present.")
    cpu_threads: int | None = option(
        None,
        "Torch threads per process on the CPU (default: the cores left after the data workers, at most "
        "OMP_NUM_THREADS).",
    )
    keep_freed_host_memory: bool = option(
        True,
        "On the CPU, keep freed memory in the process for the next step instead of page-faulting it in again "
        "(glibc only; ViT-S/16 SelfPatch steps 1.16-1.26x faster; the resident size stays at its peak).",
    )
    gradient_checkpointing: bool = option(
        False, "Recompute the student backbone's activations in the backward pass."
    )
    torch_compile: bool = option(
        False,
        "Compile the backbones and heads of student and teacher with torch.compile (inductor; one graph per crop "
        "resolution, compiled in the first step).",
    )
    torch_compile_backend: str = option(
        "inductor",
        "The torch.compile backend for --torch_compile: inductor generates kernels (GPUs); aot_eager traces the same "
        "graphs without generating code (a quick check of a set-up, e.g. on CPUs, where inductor compiles for "
        "minutes).",
    )
    logging_steps: int = option(10, "Log metrics every N optimiser steps.")
    report_to: Literal["none", "tensorboard", "wandb", "all"] = option(
        "none", "Trackers for the metrics (metrics.jsonl is always written)."
    )
    run_name: str = option("selfpatch-pretraining", "Tracker project / run name.")
    checkpointing_steps: int = option(
        1000, "Write a checkpoint every N optimiser steps (0: only at the end)."
    )
    checkpoints_total_limit: int | None = option(2, "Keep at most this many checkpoints (oldest deleted).")
    resume_from_checkpoint: str | None = option(
        None,
        "`latest` (of output_dir; starts afresh when there is none) or a checkpoint-<step> folder to continue from.",
    )
    export_steps: int = option(0, "Export (and push) the teacher backbone every N steps; always at the end.")
    push_to_hub: bool = option(False, "Upload every export to the Hub, in the background.")
    hub_model_id: str | None = option(None, "Hub repository to push to (user/name).")
    hub_private: bool = option(False, "Create the Hub repository private.")
    hub_token: str | None = option(
        None, "Hub token for pushing and gated datasets (default: HF_TOKEN / login)."
    )
    hub_upload_attempts: int = option(3, "Attempts per upload before giving up.")
    hub_retry_delay: float = option(30.0, "Seconds before retrying a failed upload (doubled each time).")
    hub_request_timeout: float = option(
        60.0,
        "Seconds a Hub request (uploads, dataset reads) may go without any data before it fails (and is retried).",
    )
    hub_upload_timeout: float = option(
        900.0,
        "At the end, wait at most this many seconds for the uploads; what is not on the Hub by then is reported and "
        "kept under output_dir/.hub_uploads (exit status 3).",
    )
    divergence_check: bool = option(
        True,
        "Stop before saving when the weights, gradients or loss explode (docs/reliability.md); checkpoints record "
        "whether training was healthy.",
    )

    def apply_objective_defaults(self, config: SelfPatchConfig) -> None:
        """Fills the options left unset with the defaults of `config.image_objective` (`OBJECTIVE_DEFAULTS`), in
        place; MoBY's starting momentum is the config's `moby_momentum`."""
        for name, value in OBJECTIVE_DEFAULTS[config.image_objective].items():
            if getattr(self, name) is None:
                setattr(self, name, config.moby_momentum if value is None else value)

    def checkpoint_to_resume(self) -> str | None:
        """`resume_from_checkpoint`, or None when the run starts afresh: none given, or `latest` together with
        `overwrite_output_dir` (whose earlier checkpoints are deleted), e.g. a recipe that always resumes run with
        --overwrite_output_dir."""
        if self.overwrite_output_dir and self.resume_from_checkpoint == "latest":
            return None
        return self.resume_from_checkpoint or None

    def schedule_recipe(self) -> ScheduleRecipe:
        """The schedule settings of these arguments (in epochs; the schedules check them when built)."""
        return ScheduleRecipe(
            **{item.name: getattr(self, item.name) for item in dataclasses.fields(ScheduleRecipe)}
        )

    def public_dict(self) -> dict[str, Any]:
        """The arguments without secrets (what checkpoints and trackers record)."""
        values = dataclasses.asdict(self)
        if values["hub_token"]:
            values["hub_token"] = "***"
        return values


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PretrainingArguments)


def parse_config_overrides(overrides: list[str] | dict[str, Any] | None, source: str) -> dict[str, Any]:
    """`["key=value", ...]` (values read as YAML) or a mapping -> `{key: value}`. The config checks the keys and
    values when it is built."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    if not isinstance(overrides, (list, tuple)):
        raise UsageError(
            f"{source}: config_overrides is a mapping (key: value) or a list of key=value strings, got "
            f"{overrides!r}."
        )
    parsed = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not isinstance(item, str) or not sep or not key.strip():
            raise UsageError(f"{source}: config_overrides entries are key=value pairs, got {item!r}.")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise UsageError(
                f"{source}: config_overrides {item!r}: the value is not valid YAML ({yaml_problem(error)}). Write "
                "numbers, true/false, words or lists like [224,160]."
            ) from None
    return parsed


def parse_pretraining_arguments(
    argv: list[str], description: str | None = None
) -> tuple[ModelArguments, DataArguments, PretrainingArguments, dict[str, Any]]:
    """Parses `[RECIPE.yaml|json] [--option value ...]`; returns the three argument groups and the merged config
    overrides. `--help` prints the options and exits (SystemExit 0); mistakes raise `UsageError`."""
    parsed = parse_recipe_and_command_line(
        ARGUMENT_CLASSES, argv, script=SCRIPT, description=description, set_aside=("config_overrides",)
    )
    model_args, data_args, training_args = parsed.groups
    overrides = {
        **parse_config_overrides(parsed.set_aside.get("config_overrides"), str(parsed.recipe_path)),
        **parse_config_overrides(model_args.config_overrides, "--config_overrides"),
    }
    return model_args, data_args, training_args, overrides


def validate_arguments(data_args: DataArguments, training_args: PretrainingArguments) -> None:
    """The checks that need nothing but the arguments and that no library object makes: the output folder, the
    training length and logging period, the Hub repository id, the trackers."""
    output_dir = training_args.output_dir
    if not output_dir:
        raise UsageError(
            "--output_dir is required (metrics, checkpoints and the exported backbone go there)."
        )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(
            f"--output_dir {output_dir} is a file, not a folder: pass a folder (new or of this run)."
        )
    if not data_args.dataset_name.strip():
        raise UsageError(f"--dataset_name is empty: name a Hub dataset, a local path or `{OFFLINE_SAMPLE}`.")
    at_least_one = {
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "samples_per_epoch": data_args.samples_per_epoch,
        "logging_steps": training_args.logging_steps,
        "hub_upload_attempts": training_args.hub_upload_attempts,
    }
    for name, value in at_least_one.items():
        if value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}.")
    if training_args.max_steps <= 0 and training_args.epochs <= 0:
        raise UsageError("Give a training length: --epochs > 0 or --max_steps > 0.")
    for name in ("checkpointing_steps", "export_steps"):
        if getattr(training_args, name) < 0:
            raise UsageError(
                f"--{name} must be >= 0 (0: only at the end), got {getattr(training_args, name)}."
            )
    if training_args.cpu_threads is not None and training_args.cpu_threads < 1:
        raise UsageError(
            f"--cpu_threads must be >= 1 (or unset: automatic), got {training_args.cpu_threads}."
        )
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise UsageError("--push_to_hub needs --hub_model_id (e.g. your-name/selfpatch-vit-small-patch16).")
    for name in ("hub_request_timeout", "hub_upload_timeout"):
        if not getattr(training_args, name) > 0:  # also NaN
            raise UsageError(f"--{name} must be > 0 seconds, got {getattr(training_args, name)}.")
    if training_args.hub_model_id is not None:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(training_args.hub_model_id)
        except HFValidationError as error:
            reason = str(error).replace(" Use `repo_type` argument if needed.", "")  # not an option of ours
            raise UsageError(
                f"--hub_model_id {training_args.hub_model_id!r} is not a valid Hub repository id ({reason}). Use "
                "`user-or-org/name`."
            ) from None
    check_trackers_installed(training_args.report_to)
    from selfpatch_hf.training.checkpointing import CHECKPOINTS_DIRNAME  # not needed for --help

    checkpoints_dir = Path(output_dir) / CHECKPOINTS_DIRNAME
    resume = training_args.checkpoint_to_resume()
    if training_args.overwrite_output_dir and resume is not None:
        if Path(resume).resolve().is_relative_to(checkpoints_dir.resolve()):
            raise UsageError(
                f"--overwrite_output_dir deletes the checkpoints in {checkpoints_dir}, including "
                f"--resume_from_checkpoint {resume}: drop one of the two (or copy the checkpoint elsewhere first)."
            )
    check_no_unresumed_run(output_dir, resume, training_args.overwrite_output_dir)


__all__ = [
    "ARGUMENT_CLASSES",
    "OBJECTIVE_DEFAULTS",
    "IMAGENET_TRAIN_SIZE",
    "OFFLINE_SAMPLE",
    "DataArguments",
    "ModelArguments",
    "PretrainingArguments",
    "parse_config_overrides",
    "parse_pretraining_arguments",
    "validate_arguments",
]
