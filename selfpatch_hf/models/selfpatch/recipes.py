"""The training recipe of each image-level objective, in one table: the student's drop-path, the multi-crop recipe,
the schedules, the optimiser's defaults and the gradient clipping (docs/method.md sections 9-10, docs/moby_swin.md).

`OBJECTIVE_RECIPES["dino"]` is SelfPatch's recipe on DINO (the reference ViT-S/16 ImageNet run);
`OBJECTIVE_RECIPES["moby"]` is MoBY's (its public code, Transformer-SSL: `config.py`, `configs/moby_*.yaml`,
`data/build.py`). Everything that depends on the objective reads it from here: `SelfPatchConfig` its drop-path
default, `training/pretrain.py` the defaults of the options left unset, `MultiCropAugmentation` its constructor
defaults and named crop recipes (`CROP_RECIPES`).

The model configuration holds only what the model reads; the crop recipe (sizes, counts, scales, resampling) is the
data pipeline's, set by the training options of the same names.

This module imports nothing beyond the standard library: the training scripts read it to answer `--help`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

# Every image gives exactly 2 global crops (the teacher's image-level views, each with its own blur and
# solarisation probabilities); only the number of local crops is a setting.
NUM_GLOBAL_CROPS = 2
# The batch size the recipes quote learning rates for (linear scaling rule: x global batch / 256).
REFERENCE_BATCH_SIZE = 256
# DINO's teacher temperature (after its warm-up; the reference ViT-S/16 run keeps it constant from the start).
DINO_TEACHER_TEMPERATURE = 0.04

Interpolation = Literal["bicubic", "bilinear"]
INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear")
CROP_FIELDS = (
    "global_crop_size",
    "local_crop_size",
    "num_local_crops",
    "global_crops_scale",
    "local_crops_scale",
)
# Settings earlier versions kept in the model configuration that the model never reads: the crop recipe is the data
# pipeline's and the target momentum the training loop's. They are options of training/pretrain.py (and arguments
# of `MultiCropAugmentation`) now: {old config field: the option that replaces it}. Old config.json files that carry
# them still load (the values are dropped); `SelfPatchConfig.from_preset` names the replacement.
MOVED_TO_TRAINING: dict[str, str] = {name: f"--{name}" for name in CROP_FIELDS} | {
    "moby_momentum": "--teacher_momentum"
}


def _as_size(value: int | Sequence[int], name: str) -> int | tuple[int, int]:
    """An int, or `(height, width)` (a one-element sequence is its int)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} is a number of pixels or (height, width), got {value!r}.")
    if isinstance(value, int):
        return value
    values = tuple(value)
    if len(values) == 1:
        return _as_size(values[0], name)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} is a number of pixels or (height, width), got {value!r}.")
    return values


def _height_width(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


@dataclass(frozen=True)
class CropRecipe:
    """The multi-crop recipe of `MultiCropAugmentation`: 2 global crops and `num_local_crops` local crops per image,
    random resized crops of the given area fractions (`*_scale`), resampled with `interpolation`."""

    global_crop_size: int | tuple[int, int] = 224
    local_crop_size: int | tuple[int, int] = 96
    num_local_crops: int = 8
    global_crops_scale: tuple[float, float] = (0.25, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.25)
    interpolation: Interpolation = "bicubic"

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__ (lists from YAML -> tuples, [224] -> 224)
        for name in ("global_crop_size", "local_crop_size"):
            object.__setattr__(self, name, _as_size(getattr(self, name), name))
        for name in ("global_crops_scale", "local_crops_scale"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(value) if isinstance(value, Sequence) else value)
        self.validate()

    def validate(self) -> None:
        """Raises a ValueError naming the setting and the fix."""
        for name in ("global_crop_size", "local_crop_size"):
            height, width = _height_width(getattr(self, name))
            if height < 1 or width < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        count = self.num_local_crops
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"num_local_crops must be a whole number >= 0, got {count!r}.")
        for name in ("global_crops_scale", "local_crops_scale"):
            scale = getattr(self, name)
            numbers = isinstance(scale, tuple) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale
            )
            if not numbers or len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(
                    f"{name} must be a pair (min, max) of image-area fractions with 0 < min <= max <= 1, got "
                    f"{scale!r}."
                )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}.")

    def replace(self, **changes: Any) -> CropRecipe:
        """This recipe with `changes` (None values are ignored: "keep the recipe's")."""
        return dataclasses.replace(
            self, **{key: value for key, value in changes.items() if value is not None}
        )

    def check_patch_grid(self, patch_size: int) -> None:
        """Every crop side must be a multiple of the backbone's token stride, or the patch grid drops pixels."""
        names = ("global_crop_size", "local_crop_size") if self.num_local_crops else ("global_crop_size",)
        for name in names:
            height, width = _height_width(getattr(self, name))
            if height % patch_size or width % patch_size:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not a positive multiple of the patch size {patch_size}: "
                    f"the patch grid would drop pixels. Use e.g. {max(1, round(height / patch_size)) * patch_size}."
                )

    @property
    def square_global_side(self) -> int | None:
        """The global crops' side when they are square (the backbone's `image_size`, its position grid), else None."""
        height, width = _height_width(self.global_crop_size)
        return height if height == width else None

    def card_fields(self) -> dict[str, Any]:
        """The crop recipe as `BackboneCardInfo` fields."""
        return {
            "global_crop_size": self.global_crop_size,
            "local_crop_size": self.local_crop_size if self.num_local_crops else None,
            "num_global_crops": NUM_GLOBAL_CROPS,
            "num_local_crops": self.num_local_crops,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


@dataclass(frozen=True)
class ScheduleRecipe:
    """The schedule settings of a recipe, in epochs, with learning rates per `REFERENCE_BATCH_SIZE` images. The
    defaults are DINO's reference ViT-S/16 ImageNet run. `PretrainingSchedule.from_recipe` turns them into steps
    for one run; the training script's options of the same names take their defaults from the objective's recipe.

    `learning_rate_scaling` says which learning rates follow the linear scaling rule (x global batch / 256):
    `"peak"` (DINO's code: the peak only; `min_learning_rate` is absolute and the warm-up starts at
    `warmup_learning_rate` as given) or `"all"` (MoBY's code: the peak, the warm-up start and the minimum)."""

    learning_rate: float = 5e-4  # peak, for a global batch of 256 (linear scaling rule)
    min_learning_rate: float = 1e-6
    warmup_learning_rate: float = 0.0  # where the linear warm-up starts
    learning_rate_scaling: Literal["peak", "all"] = "peak"
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    teacher_momentum: float = 0.996
    teacher_momentum_end: float = 1.0
    teacher_temperature: float = DINO_TEACHER_TEMPERATURE
    warmup_teacher_temperature: float = DINO_TEACHER_TEMPERATURE
    warmup_teacher_temperature_epochs: float = 0
    freeze_last_layer_epochs: float = 1


@dataclass(frozen=True)
class ObjectiveRecipe:
    """What training with one image-level objective uses unless told otherwise."""

    drop_path_rate: float  # the student backbone's stochastic depth (the teacher has none)
    crops: CropRecipe
    schedule: ScheduleRecipe
    clip_grad: float  # an L2 norm; 0 disables
    clip_grad_mode: Literal["per_parameter", "global"]

    def option_defaults(self) -> dict[str, Any]:
        """`{option: default}` of the training options that depend on the objective."""
        values = {**dataclasses.asdict(self.schedule), "clip_grad": self.clip_grad}
        values |= {"clip_grad_mode": self.clip_grad_mode}
        values |= {name: getattr(self.crops, name) for name in CROP_FIELDS}
        values["crop_interpolation"] = self.crops.interpolation
        return values


OBJECTIVE_RECIPES: dict[str, ObjectiveRecipe] = {
    # SelfPatch on DINO (docs/method.md sections 9-10): 2 x 224 px global crops (scale 0.25-1, DINO: 0.4-1) and
    # 8 x 96 px local crops (scale 0.05-0.25, DINO: 0.05-0.4), bicubic; DINO's schedules and per-tensor clipping
    "dino": ObjectiveRecipe(
        drop_path_rate=0.1,
        crops=CropRecipe(),
        schedule=ScheduleRecipe(),
        clip_grad=3.0,
        clip_grad_mode="per_parameter",
    ),
    # MoBY (Transformer-SSL): two 224 px views of BYOL's augmentation (scale 0.08-1, torchvision's default bilinear
    # resampling), no local crops; online drop-path 0.2; AdamW lr 1e-3, warm-up lr 5e-7, min lr 5e-6 per 512 images
    # (= 5e-4, 2.5e-7, 2.5e-6 per 256), all three scaled with the batch; 5 warm-up epochs; constant weight decay
    # 0.05; momentum 0.99 -> 1 (cosine); the gradient clipped to a global norm of 5; no last layer to freeze
    "moby": ObjectiveRecipe(
        drop_path_rate=0.2,
        crops=CropRecipe(num_local_crops=0, global_crops_scale=(0.08, 1.0), interpolation="bilinear"),
        schedule=ScheduleRecipe(
            learning_rate=5e-4,
            min_learning_rate=2.5e-6,
            warmup_learning_rate=2.5e-7,
            learning_rate_scaling="all",
            warmup_epochs=5,
            weight_decay=0.05,
            weight_decay_end=0.05,
            teacher_momentum=0.99,
            freeze_last_layer_epochs=0,
        ),
        clip_grad=5.0,
        clip_grad_mode="global",
    ),
}

# Named crop recipes of `MultiCropAugmentation.from_recipe`: the objectives' and DINO's own published one.
CROP_RECIPES: dict[str, CropRecipe] = {
    "selfpatch": OBJECTIVE_RECIPES["dino"].crops,
    "dino": CropRecipe(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4)),
    "moby": OBJECTIVE_RECIPES["moby"].crops,
}


def objective_recipe(image_objective: str) -> ObjectiveRecipe:
    """The recipe of `image_objective` ("dino" or "moby"); a ValueError lists the known ones."""
    if image_objective not in OBJECTIVE_RECIPES:
        raise ValueError(
            f"image_objective must be one of {tuple(OBJECTIVE_RECIPES)}, got {image_objective!r}."
        )
    return OBJECTIVE_RECIPES[image_objective]


__all__ = [
    "CROP_FIELDS",
    "CROP_RECIPES",
    "DINO_TEACHER_TEMPERATURE",
    "INTERPOLATIONS",
    "MOVED_TO_TRAINING",
    "NUM_GLOBAL_CROPS",
    "OBJECTIVE_RECIPES",
    "REFERENCE_BATCH_SIZE",
    "CropRecipe",
    "ObjectiveRecipe",
    "ScheduleRecipe",
    "objective_recipe",
]
