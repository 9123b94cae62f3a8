"""Tiny SelfPatch configurations shared by the tests (seconds on a CPU)."""

from __future__ import annotations

from typing import Any

from selfpatch_hf import SelfPatchConfig

TINY_BACKBONE: dict[str, Any] = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "image_size": 32,
}
TINY_METHOD: dict[str, Any] = {
    "global_crop_size": 32,
    "local_crop_size": 16,
    "num_local_crops": 4,
    "image_out_dim": 64,
    "patch_out_dim": 32,
    "head_hidden_dim": 48,
    "head_bottleneck_dim": 16,
}


def tiny_config(**overrides: Any) -> SelfPatchConfig:
    """ViT-Ti/16-style preset shrunk to 2 layers of width 32 with 8-pixel patches and small heads."""
    return SelfPatchConfig.from_preset("vit-tiny-patch16", **{**TINY_BACKBONE, **TINY_METHOD, **overrides})


def tiny_dino_config(**overrides: Any) -> SelfPatchConfig:
    """Plain DINO: CLS image representation, no patch objective."""
    return tiny_config(image_representation="cls", patch_loss_weight=0.0, **overrides)
