"""Tiny SelfPatch configurations shared by the tests (seconds on a CPU): the model of the tiny training recipe
(tests/training_runs.py), built directly."""

from __future__ import annotations

from typing import Any

from training_runs import TINY_CROPS, TINY_MODEL, TINY_PRESET

from selfpatch_hf import SelfPatchConfig
from selfpatch_hf.models.selfpatch.recipes import CropRecipe

_BACKBONE_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "num_hidden_layers",
    "patch_size",
)
TINY_BACKBONE: dict[str, Any] = {
    **{name: TINY_MODEL[name] for name in _BACKBONE_FIELDS},
    "image_size": TINY_CROPS["global_crop_size"],
}
TINY_METHOD: dict[str, Any] = {
    name: value for name, value in TINY_MODEL.items() if name not in _BACKBONE_FIELDS
}
TINY_CROP_RECIPE = CropRecipe(**TINY_CROPS)


def tiny_config(**overrides: Any) -> SelfPatchConfig:
    """ViT-Ti/16-style preset shrunk to 2 layers of width 32 with 8-pixel patches and small heads."""
    return SelfPatchConfig.from_preset(TINY_PRESET, **{**TINY_BACKBONE, **TINY_METHOD, **overrides})


def tiny_dino_config(**overrides: Any) -> SelfPatchConfig:
    """Plain DINO: CLS image representation, no patch objective."""
    return tiny_config(image_representation="cls", patch_loss_weight=0.0, **overrides)
