"""The options of `training/pretrain.py`: three argument dataclasses, recipe files, and the checks that need nothing
but the arguments.

`parse_pretraining_arguments(["recipe.yaml", "--learning_rate", "1e-3"])` reads a recipe file (YAML or JSON, a
mapping of option: value) and the command line after it, the command line winning (see `recipe_files`): every value
of the file is typed and checked exactly like the same option on the command line. `config_overrides`
(`key=value` pairs on the command line; a mapping or a list of `key=value` strings in a file) set fields of
`SelfPatchConfig` or of its backbone's `ViTConfig`; both sources merge, the command line winning.

The options whose default depends on the image-level objective (the crop recipe, the schedules, the clipping) are
unset (None) until `apply_objective_defaults` fills them from the objective's recipe
(`selfpatch_hf.models.selfpatch.recipes.OBJECTIVE_RECIPES`, the one table of those defaults).

Mistakes raise `selfpatch_hf.cli.errors.UsageError` (exit status 2, one line naming the option and the fix).
Checks the library makes itself (the model configuration, the schedules, the crop recipe, the data loader) are not
repeated here: the script turns their errors into the same one-line answer.

Importing this module loads no torch, datasets or model code, so `--help` and argument mistakes answer at once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import yaml

from selfpatch_hf.cli.errors import UsageError
from selfpatch_hf.models.selfpatch.recipes import (
    CROP_FIELDS,
    MOVED_TO_TRAINING,
    OBJECTIVE_RECIPES,
    CropRecipe,
    ScheduleRecipe,
    objective_recipe,
)
from selfpatch_hf.training.arguments.common import RuntimeArguments, validate_runtime_arguments
from selfpatch_hf.training.arguments.recipe_files import (
    load_yaml,
    option,
    parse_recipe_and_command_line,
    yaml_problem,
)

if TYPE_CHECKING:
    from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig

logger = logging.getLogger(__name__)

# the photographs bundled with scikit-image (selfpatch_hf.data.samples.photographs)
OFFLINE_SAMPLE = "offline-sample"
IMAGENET_TRAIN_SIZE = 1_281_167
SCRIPT = "training/pretrain.py"
_DEFAULTS = {name: recipe.option_defaults() for name, recipe in OBJECTIVE_RECIPES.items()}
_OBJECTIVE_NAMES = {"dino": "DINO", "moby": "MoBY"}


def _shown(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def _by_objective(name: str) -> str:
    values = ", ".join(
        f"{_OBJECTIVE_NAMES[objective]} {_shown(defaults[name])}" for objective, defaults in _DEFAULTS.items()
    )
    return f" Default: the image objective's recipe ({values})."


def _recipe_default(name: str) -> Any:
    """The default of an option every objective's recipe agrees on (tests check that they do)."""
    return _DEFAULTS["dino"][name]


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
        "image_representation=cls` (plain DINO), `image_objective=moby`, `drop_path_rate=0.1 num_hidden_layers=6`. "
        "Values are read as YAML (numbers, true/false, [224,160]). The crop recipe is set by the crop options "
        "below (older recipes' `global_crop_size=...` overrides are taken as those options).",
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
    # the multi-crop recipe (docs/method.md section 9); unset: the objective's (recipes.OBJECTIVE_RECIPES)
    global_crop_size: list[int] | None = option(
        None,
        "Side of the 2 global crops, or height width; also the backbone's position grid (image_size) and the "
        "exported image processor's size." + _by_objective("global_crop_size"),
    )
    local_crop_size: list[int] | None = option(
        None, "Side (or height width) of the local crops." + _by_objective("local_crop_size")
    )
    num_local_crops: int | None = option(
        None, "Local crops per image (MoBY: none, it trains on two views)." + _by_objective("num_local_crops")
    )
    global_crops_scale: list[float] | None = option(
        None,
        "Area range (min max, image fractions) of the global crops." + _by_objective("global_crops_scale"),
    )
    local_crops_scale: list[float] | None = option(
        None, "Area range (min max) of the local crops." + _by_objective("local_crops_scale")
    )
    crop_interpolation: Literal["bicubic", "bilinear"] | None = option(
        None, "Resampling of the resized crops." + _by_objective("crop_interpolation")
    )

    def crop_recipe(self) -> CropRecipe:
        """The crop recipe of these options (fill the unset ones first: `apply_objective_defaults`); a ValueError
        names a wrong value."""
        values = {name: getattr(self, name) for name in CROP_FIELDS}
        return CropRecipe(**values, interpolation=self.crop_interpolation)


@dataclass
class PretrainingArguments(RuntimeArguments):
    output_dir: str | None = option(None, "Where metrics, checkpoints and exports go (required).")
    per_device_train_batch_size: int = option(64, "Images per process per micro-batch.")
    epochs: float = option(300, "Training length in epochs of samples_per_epoch images.")
    max_steps: int = option(-1, "Training length in optimiser steps; overrides epochs when > 0.")
    # the schedules (selfpatch_hf.training.schedules; defaults: the objective's recipe)
    learning_rate: float = option(
        _recipe_default("learning_rate"),
        "Peak learning rate for a global batch of 256; scaled linearly with the global batch.",
    )
    min_learning_rate: float | None = option(
        None, "Learning rate at the end of the cosine." + _by_objective("min_learning_rate")
    )
    warmup_learning_rate: float | None = option(
        None, "Learning rate where the linear warm-up starts." + _by_objective("warmup_learning_rate")
    )
    learning_rate_scaling: Literal["peak", "all"] | None = option(
        None,
        "Which learning rates scale with the global batch (x batch / 256): the peak only (min and warm-up start "
        "as given, DINO's code), or all three (MoBY's code)." + _by_objective("learning_rate_scaling"),
    )
    warmup_epochs: float | None = option(
        None, "Linear learning-rate warm-up." + _by_objective("warmup_epochs")
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
        _recipe_default("teacher_momentum_end"), "Teacher EMA momentum at the end."
    )
    teacher_temperature: float = option(
        _recipe_default("teacher_temperature"), "DINO's teacher temperature after the warm-up."
    )
    warmup_teacher_temperature: float = option(
        _recipe_default("warmup_teacher_temperature"), "DINO's teacher temperature at step 0."
    )
    warmup_teacher_temperature_epochs: float = option(
        _recipe_default("warmup_teacher_temperature_epochs"),
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
    run_name: str = option("selfpatch-pretraining", "Tracker project / run name.")
    export_steps: int = option(0, "Export (and push) the teacher backbone every N steps; always at the end.")
    push_to_hub: bool = option(False, "Upload every export to the Hub, in the background.")
    divergence_check: bool = option(
        True,
        "Stop before saving when the weights, gradients or loss explode (docs/reliability.md); checkpoints record "
        "whether training was healthy.",
    )

    def schedule_recipe(self) -> ScheduleRecipe:
        """The schedule settings of these arguments (in epochs; the schedules check them when built)."""
        return ScheduleRecipe(
            **{item.name: getattr(self, item.name) for item in dataclasses.fields(ScheduleRecipe)}
        )


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
            parsed[key.strip()] = load_yaml(value)
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


def take_moved_overrides(
    overrides: dict[str, Any], data_args: DataArguments, training_args: PretrainingArguments
) -> None:
    """Moves the config overrides of settings that are training options now (the crop recipe, `moby_momentum`:
    `MOVED_TO_TRAINING`) to those options, saying so once; the same setting given both ways with two values is
    refused."""
    for key in [key for key in overrides if key in MOVED_TO_TRAINING]:
        if key == "moby_momentum" and overrides.get("image_objective") != "moby":
            raise UsageError(
                f"config_overrides moby_momentum={_shown(overrides[key])} is a MoBY setting, but the image objective "
                "is DINO: remove it, or set image_objective=moby (its momentum is --teacher_momentum now)."
            )
        value = overrides.pop(key)
        name = MOVED_TO_TRAINING[key].removeprefix("--")
        group = data_args if hasattr(data_args, name) else training_args
        wanted = list(value) if isinstance(value, (list, tuple)) else value
        if name in ("global_crop_size", "local_crop_size") and not isinstance(wanted, list):
            wanted = [wanted]  # the option's form: one side, or height width
        given = getattr(group, name)
        if given is not None and given != wanted:
            raise UsageError(
                f"config_overrides {key}={_shown(value)} and --{name} {_shown(given)} set the same thing: keep "
                f"--{name} only."
            )
        setattr(group, name, wanted)
        logger.warning(
            "config_overrides %s=%s is the training option --%s now (the model configuration no longer holds it); "
            "using it.",
            key,
            _shown(value),
            name,
        )


def apply_objective_defaults(
    image_objective: str, data_args: DataArguments, training_args: PretrainingArguments
) -> None:
    """Fills the options left unset (None) with the recipe of `image_objective` (`OBJECTIVE_RECIPES`), in place.
    MoBY trains on its two views: local-crop options given with it are refused (they would do nothing)."""
    try:
        defaults = objective_recipe(image_objective).option_defaults()
    except ValueError as error:
        raise UsageError(str(error)) from None
    if image_objective == "moby":
        given = [
            name for name in ("local_crop_size", "local_crops_scale") if getattr(data_args, name) is not None
        ]
        if data_args.num_local_crops:
            given.insert(0, "num_local_crops")
        if given:
            raise UsageError(
                f"--{' --'.join(given)}: MoBY trains on two views (the 2 global crops) without local crops; drop "
                "the local-crop options, or use image_objective=dino."
            )
    for group in (data_args, training_args):
        for name, value in defaults.items():
            if hasattr(group, name) and getattr(group, name) is None:
                setattr(group, name, list(value) if isinstance(value, tuple) else value)


def one_line_message(error: Exception) -> str:
    """One line for a library's argument error (a strict dataclass wraps the validator's own error)."""
    from huggingface_hub.errors import StrictDataclassError

    while isinstance(error, StrictDataclassError) and error.__cause__ is not None:
        error = error.__cause__
    return " ".join(str(error).split())


def build_config(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PretrainingArguments,
    overrides: dict[str, Any],
) -> tuple[SelfPatchConfig, CropRecipe]:
    """The model configuration and the crop recipe of these options. Config overrides of settings that are training
    options now are taken as those options (`take_moved_overrides`); the options left unset take the image
    objective's recipe (`apply_objective_defaults`; both in place); the backbone's position grid (`image_size`) is
    the global crop size when the crops are square, unless `config_overrides` sets it. Wrong values raise
    `UsageError` (one line: the library's own message)."""
    from huggingface_hub.errors import StrictDataclassError

    from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig

    def from_preset(**extra: Any) -> SelfPatchConfig:
        try:
            return SelfPatchConfig.from_preset(model_args.preset, **overrides, **extra)
        except (ValueError, TypeError, StrictDataclassError) as error:
            raise UsageError(f"Invalid model configuration: {one_line_message(error)}") from None

    overrides = dict(overrides)
    take_moved_overrides(overrides, data_args, training_args)
    config = from_preset()
    apply_objective_defaults(config.image_objective, data_args, training_args)
    try:
        crops = data_args.crop_recipe()
        crops.check_patch_grid(config.patch_size)
    except ValueError as error:
        raise UsageError(one_line_message(error)) from None
    check_positives_fit(config, crops)
    side = crops.square_global_side
    if side is not None and "image_size" not in overrides and side != config.backbone_config.image_size:
        config = from_preset(image_size=side)
    return config, crops


def check_positives_fit(config: SelfPatchConfig, crops: CropRecipe) -> None:
    """With `neighborhood_size="all"` the neighbours are the other patches of a crop: k positives need a crop of
    more than k patches, also the local crops (their teacher features pick positives too). A window's k is checked
    by the config itself."""
    if not config.use_patch_objective or config.neighborhood_size != "all":
        return
    names = ("global_crop_size", "local_crop_size") if crops.num_local_crops else ("global_crop_size",)
    for name in names:
        size = getattr(crops, name)
        height, width = (size, size) if isinstance(size, int) else size
        neighbours = (height // config.patch_size) * (width // config.patch_size) - 1
        if config.num_positives > neighbours:
            raise UsageError(
                f"num_positives={config.num_positives} exceeds the {neighbours} other patches of a {name} {size} "
                f"crop (patch stride {config.patch_size}): lower num_positives or enlarge the crop."
            )


def card_training_data(dataset_name: str) -> dict[str, Any]:
    """How the model card names `--dataset_name`: a Hub dataset id goes into its `datasets` metadata; the offline
    sample and local files are described in its body (they are no Hub datasets)."""
    from selfpatch_hf.data.samples.photographs import SAMPLE_DATASET_DESCRIPTION
    from selfpatch_hf.data.streaming import hub_dataset_id

    if dataset_name == OFFLINE_SAMPLE:
        return {"training_data": SAMPLE_DATASET_DESCRIPTION}
    hub_id = hub_dataset_id(dataset_name)
    return {"datasets": [hub_id]} if hub_id else {"training_data": f"local files (`{dataset_name}`)"}


def validate_arguments(data_args: DataArguments, training_args: PretrainingArguments) -> None:
    """The checks that need nothing but the arguments and that no library object makes: the output folder, the
    training length and logging period, the Hub repository id, the trackers (`validate_runtime_arguments`), and
    pretraining's own."""
    validate_runtime_arguments(training_args, hub_model_example="your-name/selfpatch-vit-small-patch16")
    if not data_args.dataset_name.strip():
        raise UsageError(f"--dataset_name is empty: name a Hub dataset, a local path or `{OFFLINE_SAMPLE}`.")
    if data_args.samples_per_epoch < 1:
        raise UsageError(f"--samples_per_epoch must be >= 1, got {data_args.samples_per_epoch}.")
    if training_args.max_steps <= 0 and training_args.epochs <= 0:
        raise UsageError("Give a training length: --epochs > 0 or --max_steps > 0.")
    if training_args.export_steps < 0:
        raise UsageError(
            f"--export_steps must be >= 0 (0: only at the end), got {training_args.export_steps}."
        )
    if data_args.min_image_size < 1:
        raise UsageError(f"--min_image_size must be >= 1 pixel, got {data_args.min_image_size}.")
    if training_args.clip_grad is not None and training_args.clip_grad < 0:
        raise UsageError(f"--clip_grad must be >= 0 (0: no clipping), got {training_args.clip_grad}.")
    if training_args.torch_compile:
        check_compile_backend(training_args.torch_compile_backend)


def check_compile_backend(backend: str) -> None:
    """`--torch_compile_backend` names a backend torch.compile knows (else torch fails only in the first step, with
    a traceback)."""
    import torch._dynamo  # only with --torch_compile: the rest of the checks stay free of torch

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UsageError(
            f"--torch_compile_backend {backend!r} is not a torch.compile backend (torch._dynamo.list_backends() "
            "lists them): use inductor, or aot_eager for a quick check on a CPU."
        )


__all__ = [
    "ARGUMENT_CLASSES",
    "IMAGENET_TRAIN_SIZE",
    "OFFLINE_SAMPLE",
    "DataArguments",
    "ModelArguments",
    "PretrainingArguments",
    "apply_objective_defaults",
    "build_config",
    "card_training_data",
    "one_line_message",
    "parse_config_overrides",
    "parse_pretraining_arguments",
    "take_moved_overrides",
    "validate_arguments",
]
