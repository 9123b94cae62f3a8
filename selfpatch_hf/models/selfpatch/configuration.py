"""Configuration of SelfPatch pretraining (DINO + the patch-level objective of Yun et al., CVPR 2022)."""

from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Any, ClassVar, Literal

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig, SwinConfig, ViTConfig
from transformers.configuration_utils import SubConfigSpec

from selfpatch_hf.models.selfpatch.recipes import MOVED_TO_TRAINING, NUM_GLOBAL_CROPS, objective_recipe

logger = logging.getLogger(__name__)

# ViT backbones of the paper (docs/method.md section 2). DINO/timm conventions: exact GELU, LayerNorm eps 1e-6,
# biased qkv. `image_size` is the resolution of the learned position grid (global crops); other crop sizes are
# handled by interpolating the position embeddings.
_VIT_COMMON: dict[str, Any] = {
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "image_size": 224,
}
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "vit-tiny-patch16": {
        "hidden_size": 192,
        "num_hidden_layers": 12,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "patch_size": 16,
    },
    "vit-small-patch16": {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "patch_size": 16,
    },
    "vit-small-patch8": {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "patch_size": 8,
    },
    "vit-base-patch16": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "patch_size": 16,
    },
    "vit-tiny-patch8": {
        "hidden_size": 192,
        "num_hidden_layers": 12,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "patch_size": 8,
    },
}
BACKBONE_PRESETS = {
    name: {"model_type": "vit", **_VIT_COMMON, **values} for name, values in BACKBONE_PRESETS.items()
}
# Swin Transformer backbones (Liu et al. 2021; the paper's Table 5 uses Swin-T). No CLS token and no absolute position
# embeddings, so every input size works; `drop_path_rate` stays 0 here: SelfPatchConfig.drop_path_rate is the
# student's (the teacher has none). LayerNorm eps 1e-5 as in the reference Swin.
BACKBONE_PRESETS["swin-tiny-patch4-window7"] = {
    "model_type": "swin",
    "image_size": 224,
    "patch_size": 4,
    "embed_dim": 96,
    "depths": [2, 2, 6, 2],
    "num_heads": [3, 6, 12, 24],
    "window_size": 7,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.0,
    "use_absolute_embeddings": False,
    "layer_norm_eps": 1e-5,
}
_BACKBONE_CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {"vit": ViTConfig, "swin": SwinConfig}
# `vit-small-patch16` is the paper's main model; it is also what `SelfPatchConfig()` builds.
DEFAULT_PRESET = "vit-small-patch16"

# Settings that only one image-level objective reads. Setting one (to anything but its default) with the other
# objective is refused: it would silently do nothing.
DINO_ONLY_FIELDS = (
    "image_out_dim",
    "patch_out_dim",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "head_num_layers",
    "norm_last_layer",
    "student_temperature",
    "center_momentum",
)
MOBY_ONLY_FIELDS = (
    "moby_projection_dim",
    "moby_projector_hidden_dim",
    "moby_predictor_hidden_dim",
    "moby_temperature",
    "moby_queue_size",
    "patch_negatives",
)


class SelfPatchConfigError(StrictDataclassError, ValueError):
    """An invalid `SelfPatchConfig` value; the message names the field and the fix.

    `@strict` wraps whatever a validator raises in its own `StrictDataclassClassValidationError`, which is no
    `ValueError`; this error is both, so `except ValueError` (and `except StrictDataclassError`) catch it."""


def _errors_as_value_errors(cls: type) -> type:
    """Re-raises the errors of the `@strict` validation (run at construction and by `save_pretrained`) as
    `SelfPatchConfigError` with the validator's own message."""
    strict_validate = cls.validate

    def validate(self) -> None:
        try:
            strict_validate(self)
        except StrictDataclassError as error:
            if isinstance(error, SelfPatchConfigError):
                raise
            cause = error.__cause__ if error.__cause__ is not None else error
            raise SelfPatchConfigError(str(cause)) from cause

    validate.__is_defined_by_strict_decorator__ = (
        True  # lets a @strict subclass replace it, as with strict's own
    )
    cls.validate = validate
    return cls


# Fields the type annotations cannot hold to (transformers configs do not enforce them on assignment).
_COUNT_FIELDS = (
    "image_out_dim",
    "patch_out_dim",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "head_num_layers",
    "num_aggregation_blocks",
    "num_positives",
    "moby_projection_dim",
    "moby_projector_hidden_dim",
    "moby_predictor_hidden_dim",
    "moby_queue_size",
)
_REAL_FIELDS = (
    "aggregation_mlp_ratio",
    "patch_loss_weight",
    "student_temperature",
    "center_momentum",
    "drop_path_rate",
    "initializer_range",
    "moby_temperature",
)


@_errors_as_value_errors
@strict
class SelfPatchConfig(PreTrainedConfig):
    r"""
    Configuration of [`SelfPatchForPretraining`]: a backbone, an image-level objective and the SelfPatch patch-level
    objective, chosen independently:

    - backbone: a `transformers.ViTModel` or `SwinModel`, held as a real `ViTConfig` / `SwinConfig` in
      `backbone_config` (so exported backbones save `model_type: "vit"` / `"swin"`);
    - `image_objective`: `"dino"` (self-distillation with centred softmax heads) or `"moby"` (contrastive, with
      predictor, momentum encoder and two key queues);
    - the patch objective: on with `patch_loss_weight > 0`.

    Defaults follow the reference ViT-S/16 ImageNet run (docs/method.md section 10); `docs/moby_swin.md` gives MoBY
    and Swin. Settings that only one objective reads (`DINO_ONLY_FIELDS`, `MOBY_ONLY_FIELDS`) are refused with the
    other one. The training recipe (crops, schedules, clipping) is not part of the model: see
    `selfpatch_hf.models.selfpatch.recipes` (`MOVED_TO_TRAINING` lists the fields earlier versions kept here).

    backbone_config (`ViTConfig`, `SwinConfig` or `dict`, *optional*):
        The backbone. Defaults to ViT-S/16 with DINO conventions (exact GELU, LayerNorm eps 1e-6).
    image_objective (`"dino"` or `"moby"`, *optional*, defaults to `"dino"`):
        The image-level self-supervised method the patch objective is added to.
    image_out_dim (`int`, *optional*, defaults to 65536):
        Output dimension K of the image-level projection head g.
    patch_out_dim (`int`, *optional*, defaults to 4096):
        Output dimension of the patch-level projection head g'.
    head_hidden_dim (`int`, *optional*, defaults to 2048):
        Width of the hidden layers of both projection heads.
    head_bottleneck_dim (`int`, *optional*, defaults to 256):
        Dimension of the L2-normalised bottleneck in front of the weight-normalised last layer.
    head_num_layers (`int`, *optional*, defaults to 3):
        Number of Linear layers of each head's MLP (GELU between them).
    norm_last_layer (`bool`, *optional*, defaults to `True`):
        Fix the weight-norm magnitude of the heads' last layers to 1 and freeze it (DINO's `norm_last_layer`).
    num_aggregation_blocks (`int`, *optional*, defaults to 2):
        Number of class-attention blocks of the aggregation module h.
    aggregation_mlp_ratio (`float`, *optional*, defaults to 4.0):
        Hidden width of the aggregation blocks' MLP, as a multiple of the hidden size.
    num_positives (`int`, *optional*, defaults to 4):
        k: the number of most similar neighbours each patch keeps as positives.
    neighborhood_size (`int` or `"all"`, *optional*, defaults to 3):
        Side of the odd square window (with wrap-around) in which positives are searched, or `"all"` for every
        other patch of the view (the paper's ablation).
    neighbor_aggregation (`"attention"` or `"mean"`, *optional*, defaults to `"attention"`):
        How the teacher summarises the positives: the aggregation module h, or average pooling (ablation).
    image_representation (`"aggregation"`, `"cls"` or `"average_pool"`, *optional*, defaults to `"aggregation"`):
        The image-level representation fed to the image head: the aggregation module over all patch tokens
        (SelfPatch), the ViT's CLS token after the final norm (plain DINO, plain MoBY on a ViT), or the average of
        the normalised patch tokens (plain MoBY on a Swin, which has no CLS token).
    patch_loss_weight (`float`, *optional*, defaults to 0.1):
        lambda in `loss = image_loss + lambda * patch_loss`. With 0 the whole patch path is skipped.
    student_temperature (`float`, *optional*, defaults to 0.1):
        Temperature of the student's softmax (both losses).
    center_momentum (`float`, *optional*, defaults to 0.9):
        EMA momentum of the image and patch centres.
    drop_path_rate (`float`, *optional*, defaults to the objective's recipe: 0.1 for DINO, 0.2 for MoBY):
        Stochastic depth of the student backbone, linearly increasing with depth up to this rate. The teacher has
        none.
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the truncated-normal initialisation of the heads and the aggregation module.
    moby_projection_dim (`int`, *optional*, defaults to 256):
        MoBY: output size of the projectors and predictors (the contrasted vectors, and the queue's keys).
    moby_projector_hidden_dim (`int`, *optional*, defaults to 4096):
        MoBY: hidden width of the projectors (Linear - BatchNorm - ReLU - Linear).
    moby_predictor_hidden_dim (`int`, *optional*, defaults to 4096):
        MoBY: hidden width of the predictors.
    moby_temperature (`float`, *optional*, defaults to 0.2):
        MoBY: temperature of the InfoNCE losses (image level, and patch level with negatives).
    moby_queue_size (`int`, *optional*, defaults to 4096):
        MoBY: keys per queue (one queue per view), the negatives of the image-level loss.
    patch_negatives (`bool`, *optional*, defaults to `True`):
        MoBY + SelfPatch: the patch loss is an InfoNCE whose negatives are the other images' target image
        representations (the paper's Table 5 "Negative"); `False`: BYOL's `2 - 2 cos` without negatives.

    Example:

    ```python
    >>> from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining

    >>> config = SelfPatchConfig.from_preset("vit-small-patch16")
    >>> dino = SelfPatchConfig.from_preset("vit-small-patch16", image_representation="cls", patch_loss_weight=0.0)
    >>> model = SelfPatchForPretraining(config)
    >>> moby_swin = SelfPatchConfig.from_preset("swin-tiny-patch4-window7", image_objective="moby")
    ```
    """

    # "selfpatch_vit" until Swin backbones were added; folders saved with it still load (LegacySelfPatchViTConfig)
    model_type = "selfpatch"
    sub_configs_defaults: ClassVar[dict] = {
        "backbone_config": SubConfigSpec(config_class=ViTConfig, init_kwargs=BACKBONE_PRESETS[DEFAULT_PRESET])
    }

    backbone_config: dict | ViTConfig | SwinConfig | None = None
    image_objective: Literal["dino", "moby"] = "dino"
    image_out_dim: int = 65536
    patch_out_dim: int = 4096
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_num_layers: int = 3
    norm_last_layer: bool = True
    num_aggregation_blocks: int = 2
    aggregation_mlp_ratio: float | int = 4.0
    num_positives: int = 4
    neighborhood_size: int | str = 3
    neighbor_aggregation: Literal["attention", "mean"] = "attention"
    image_representation: Literal["aggregation", "cls", "average_pool"] = "aggregation"
    patch_loss_weight: float | int = 0.1
    student_temperature: float = 0.1
    center_momentum: float = 0.9
    drop_path_rate: float | int | None = None
    initializer_range: float = 0.02
    moby_projection_dim: int = 256
    moby_projector_hidden_dim: int = 4096
    moby_predictor_hidden_dim: int = 4096
    moby_temperature: float = 0.2
    moby_queue_size: int = 4096
    patch_negatives: bool = True

    # ------------------------------------------------------------------ folders of older versions
    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return current_model_type(config_dict), kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> SelfPatchConfig:
        return super().from_dict(current_model_type(config_dict), **kwargs)

    # ------------------------------------------------------------------ derived properties
    @property
    def backbone_type(self) -> str:
        """`"vit"` or `"swin"`."""
        return self.backbone_config.model_type

    @property
    def patch_size(self) -> int:
        """Pixels per side of one token of f, the tokens the patch objective works on: the ViT's patch size; for a
        Swin, the last stage's stride (patch size x 2 per patch merging, 32 for Swin-T)."""
        patch = self.backbone_config.patch_size
        patch = patch if isinstance(patch, int) else int(patch[0])
        if self.backbone_type == "swin":
            return patch * 2 ** (len(self.backbone_config.depths) - 1)
        return patch

    @property
    def hidden_size(self) -> int:
        """D, the width of f (a Swin's last stage)."""
        return self.backbone_config.hidden_size

    @property
    def num_attention_heads(self) -> int:
        """Heads of the backbone's last layer, used by the aggregation module."""
        if self.backbone_type == "swin":
            return self.backbone_config.num_heads[-1]
        return self.backbone_config.num_attention_heads

    @property
    def layer_norm_eps(self) -> float:
        return self.backbone_config.layer_norm_eps

    @property
    def use_patch_objective(self) -> bool:
        """Whether the patch-level loss (and so the teacher on local crops and the patch head) is computed."""
        return self.patch_loss_weight > 0

    @property
    def use_aggregation_module(self) -> bool:
        """Whether the model has an aggregation module h (image-level use or neighbour summaries)."""
        return self.image_representation == "aggregation" or (
            self.use_patch_objective and self.neighbor_aggregation == "attention"
        )

    # ------------------------------------------------------------------ validation (run by @strict)
    def __post_init__(self, **kwargs: Any) -> None:
        # transformers looks a dict sub-config's class up by its "model_type" and fails with a bare KeyError
        if isinstance(self.backbone_config, dict) and "model_type" not in self.backbone_config:
            raise SelfPatchConfigError(
                'backbone_config given as a dict needs its "model_type" (e.g. {"model_type": "vit", ...}), or pass a '
                f"ViTConfig; got the keys {sorted(self.backbone_config)}."
            )
        if (
            isinstance(self.backbone_config, dict)
            and self.backbone_config["model_type"] not in _BACKBONE_CONFIG_CLASSES
        ):
            raise SelfPatchConfigError(
                f"backbone_config has model_type {self.backbone_config['model_type']!r}; SelfPatch supports "
                f"{', '.join(_BACKBONE_CONFIG_CLASSES)}."
            )
        # the objective's drop-path when unset; an unknown objective is reported by validate_method
        if self.drop_path_rate is None:
            known = self.image_objective if self.image_objective in ("dino", "moby") else "dino"
            self.drop_path_rate = objective_recipe(known).drop_path_rate
        moved = sorted(name for name in MOVED_TO_TRAINING if kwargs.pop(name, None) is not None)
        if moved:  # a config.json of an earlier version: these never changed the model
            logger.info(
                "Ignoring %s of an earlier SelfPatchConfig: training settings now (training/pretrain.py %s).",
                ", ".join(moved),
                " ".join(MOVED_TO_TRAINING[name] for name in moved),
            )
        super().__post_init__(**kwargs)

    def validate_all_field_types(self) -> None:
        # named to run first (validators run in name order), so later checks compare numbers only
        fields = self.__dataclass_fields__
        for name in (name for name in _COUNT_FIELDS if name in fields):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).")
        for name in (name for name in _REAL_FIELDS if name in fields):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if not isinstance(self.norm_last_layer, bool):
            raise ValueError(f"norm_last_layer must be True or False, got {self.norm_last_layer!r}.")
        size = self.neighborhood_size
        if isinstance(size, bool) or not isinstance(size, int | str):
            raise ValueError(f'neighborhood_size is an odd int >= 3 or "all", got {size!r}.')

    def validate_backbone(self) -> None:
        backbone = self.backbone_config
        if self.backbone_type not in _BACKBONE_CONFIG_CLASSES:
            raise ValueError(
                f"backbone_config is a {type(backbone).__name__}; SelfPatch supports ViTConfig and SwinConfig."
            )
        if self.backbone_type == "swin":
            self._validate_swin()
            return
        if backbone.hidden_size % backbone.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({backbone.hidden_size}) must be divisible by num_attention_heads "
                f"({backbone.num_attention_heads}); pick a head count that divides it."
            )
        patch = backbone.patch_size
        if not isinstance(patch, int) and patch[0] != patch[1]:
            raise ValueError(f"Only square patches are supported, got patch_size={patch!r}.")
        image_size = backbone.image_size
        if not isinstance(image_size, int) and image_size[0] != image_size[1]:
            raise ValueError(
                f"backbone_config.image_size must be square (it sizes the learned position grid, which ViTModel "
                f"interpolates for other crop shapes), got {image_size!r}. Non-square crops need no special grid."
            )
        side = image_size if isinstance(image_size, int) else image_size[0]
        if side % self.patch_size != 0:
            raise ValueError(
                f"backbone_config.image_size {side} is not divisible by the patch size {self.patch_size}."
            )
        if self.drop_path_rate > 0 and backbone.hidden_dropout_prob > 0:
            raise ValueError(
                "drop_path_rate > 0 replaces the backbone's hidden dropout by stochastic depth; set "
                "backbone_config.hidden_dropout_prob=0 (as DINO does) or drop_path_rate=0."
            )

    def _validate_swin(self) -> None:
        backbone = self.backbone_config
        if len(backbone.num_heads) != len(backbone.depths):
            raise ValueError(
                f"backbone_config.num_heads {list(backbone.num_heads)} needs one entry per stage of depths "
                f"{list(backbone.depths)}."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"The Swin's last stage is {self.hidden_size} wide, not divisible by its {self.num_attention_heads} "
                "heads (which the aggregation module also uses); pick num_heads that divide the stage widths."
            )
        if backbone.use_absolute_embeddings:
            raise ValueError(
                "use_absolute_embeddings=True fixes a Swin to one input size, but the crops come in several; set "
                "use_absolute_embeddings=False (as Swin-T and MoBY do)."
            )
        if backbone.drop_path_rate > 0:
            raise ValueError(
                "Set backbone_config.drop_path_rate=0: the student's stochastic depth is SelfPatchConfig.drop_path_rate "
                "(the teacher has none, and exported backbones keep the backbone config)."
            )

    def validate_method(self) -> None:
        for name, allowed in (
            ("image_objective", ("dino", "moby")),
            ("image_representation", ("aggregation", "cls", "average_pool")),
            ("neighbor_aggregation", ("attention", "mean")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        size = self.neighborhood_size
        if isinstance(size, str):
            if size != "all":
                raise ValueError(f'neighborhood_size is an odd int >= 3 or "all", got {size!r}.')
        else:
            if size < 3 or size % 2 == 0:
                raise ValueError(
                    f"neighborhood_size must be odd and >= 3 (a window centred on the patch), got {size}."
                )
            if not 1 <= self.num_positives <= size * size - 1:
                raise ValueError(
                    f"num_positives (k={self.num_positives}) must be between 1 and the {size * size - 1} neighbours "
                    f"of a {size}x{size} window."
                )
        if self.num_positives < 1:
            raise ValueError(f"num_positives must be >= 1, got {self.num_positives}.")
        if self.patch_loss_weight < 0:
            raise ValueError(f"patch_loss_weight (lambda) must be >= 0, got {self.patch_loss_weight}.")
        if self.student_temperature <= 0:
            raise ValueError(f"student_temperature must be > 0, got {self.student_temperature}.")
        if not 0 <= self.center_momentum < 1:
            raise ValueError(f"center_momentum must be in [0, 1), got {self.center_momentum}.")
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
        if self.head_num_layers < 1 or self.num_aggregation_blocks < 1:
            raise ValueError("head_num_layers and num_aggregation_blocks must be >= 1.")
        for name in ("image_out_dim", "patch_out_dim", "head_hidden_dim", "head_bottleneck_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.image_representation == "cls" and self.backbone_type == "swin":
            raise ValueError(
                'A Swin has no CLS token: use image_representation="average_pool" (plain MoBY on Swin) or '
                '"aggregation" (SelfPatch).'
            )
        if (
            self.image_representation != "aggregation"
            and self.use_patch_objective
            and self.neighbor_aggregation == "attention"
        ):
            # The student never runs the neighbour path (docs/method.md section 4): h only learns through the image-level
            # path. With a CLS image representation it would stay at its random initialisation forever.
            raise ValueError(
                f'image_representation="{self.image_representation}" with patch_loss_weight > 0 and '
                'neighbor_aggregation="attention" leaves the aggregation module untrained (it only learns through the '
                'image-level path). Use image_representation="aggregation" (SelfPatch) or neighbor_aggregation="mean".'
            )

    def validate_objective(self) -> None:
        """Refuses the other objective's settings (they would do nothing) and checks MoBY's own."""
        other = DINO_ONLY_FIELDS if self.image_objective == "moby" else MOBY_ONLY_FIELDS
        fields = self.__dataclass_fields__
        for name in other:
            default = fields[name].default
            value = getattr(self, name)
            same = list(value) == list(default) if isinstance(default, tuple) else value == default
            if not same:
                owner = "DINO" if self.image_objective == "moby" else "MoBY"
                raise ValueError(
                    f"{name}={value!r} is a {owner} setting, but image_objective={self.image_objective!r} does not use "
                    f'it: remove it, or set image_objective="{owner.lower()}".'
                )
        if self.image_objective != "moby":
            return
        if not 0 < self.moby_temperature:
            raise ValueError(f"moby_temperature must be > 0, got {self.moby_temperature}.")
        for name in (
            "moby_projection_dim",
            "moby_projector_hidden_dim",
            "moby_predictor_hidden_dim",
            "moby_queue_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not isinstance(self.patch_negatives, bool):
            raise ValueError(f"patch_negatives must be True or False, got {self.patch_negatives!r}.")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SelfPatchConfig:
        """Builds the config of a named backbone preset; keyword overrides go to whichever config owns the field.

        Presets: `vit-tiny-patch16`, `vit-tiny-patch8`, `vit-small-patch16`, `vit-small-patch8`, `vit-base-patch16`,
        `swin-tiny-patch4-window7`; each works with either `image_objective`. `SelfPatchConfig` fields (e.g.
        `patch_loss_weight=0`, `image_objective="moby"`) and the backbone config's fields (e.g. `num_hidden_layers=4`
        for a ViT, `depths=[1, 1, 1, 1]` for a Swin) may be mixed; `initializer_range` goes to both.
        """
        if name not in BACKBONE_PRESETS:
            raise ValueError(
                f"Unknown preset {name!r}. Available presets: {', '.join(sorted(BACKBONE_PRESETS))}."
            )
        own_fields = set(cls.__dataclass_fields__)
        backbone_kwargs = dict(BACKBONE_PRESETS[name])
        backbone_class = _BACKBONE_CONFIG_CLASSES[backbone_kwargs.pop("model_type")]
        backbone_fields = set(backbone_class.__dataclass_fields__)
        config_kwargs: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in MOVED_TO_TRAINING:
                raise ValueError(
                    f"{key} is no SelfPatchConfig field any more: it is a training setting (training/pretrain.py "
                    f"{MOVED_TO_TRAINING[key]}, or MultiCropAugmentation(...)); the backbone's position grid is "
                    "image_size."
                )
            if key == "initializer_range":
                backbone_kwargs[key] = value
                config_kwargs[key] = value
            elif key in backbone_fields and key not in own_fields:
                backbone_kwargs[key] = value
            elif key in own_fields:
                config_kwargs[key] = value
            else:
                raise ValueError(
                    f"Unknown config field {key!r}: it is neither a SelfPatchConfig nor a {backbone_class.__name__} "
                    "field."
                )
        if backbone_class is SwinConfig:
            return cls(backbone_config=SwinConfig(**backbone_kwargs), **config_kwargs)
        return cls(backbone_config=ViTConfig(**backbone_kwargs), **config_kwargs)


class LegacySelfPatchViTConfig(PreTrainedConfig):
    """The model type `selfpatch_vit` of folders saved before Swin backbones were supported. Reading one gives a
    `SelfPatchConfig` (model type `selfpatch`), so `AutoConfig`, `AutoModelForPreTraining` and
    `SelfPatchForPretraining.from_pretrained` load such folders, and saving them again writes the current type."""

    model_type = "selfpatch_vit"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> SelfPatchConfig:
        return SelfPatchConfig.from_dict(current_model_type(config_dict), **kwargs)


LEGACY_MODEL_TYPES = (LegacySelfPatchViTConfig.model_type,)


def current_model_type(config_dict: dict[str, Any]) -> dict[str, Any]:
    """`config_dict` with a legacy model type replaced by `SelfPatchConfig.model_type`."""
    if config_dict.get("model_type") in LEGACY_MODEL_TYPES:
        return {**config_dict, "model_type": SelfPatchConfig.model_type}
    return config_dict


AutoConfig.register(SelfPatchConfig.model_type, SelfPatchConfig, exist_ok=True)
AutoConfig.register(LegacySelfPatchViTConfig.model_type, LegacySelfPatchViTConfig, exist_ok=True)

__all__ = [
    "BACKBONE_PRESETS",
    "LEGACY_MODEL_TYPES",
    "MOVED_TO_TRAINING",
    "NUM_GLOBAL_CROPS",
    "LegacySelfPatchViTConfig",
    "SelfPatchConfig",
    "SelfPatchConfigError",
]
