"""Helpers shared by the training tests: THE tiny pretraining recipe (as a recipe file's text and as command-line
arguments), the environment of a `training/pretrain.py` subprocess, and a small model and optimiser prepared by
accelerate with a step of training."""

from __future__ import annotations

import os

import torch

# The tiny recipe: a ViT-Ti/16 preset shrunk to 2 layers of width 32, 8-pixel patches, small heads (config
# overrides), 32 / 16 pixel crops with 2 local crops (training options). A step takes a fraction of a second on one
# CPU thread.
TINY_PRESET = "vit-tiny-patch16"
TINY_MODEL = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "image_out_dim": 64,
    "patch_out_dim": 32,
    "head_hidden_dim": 48,
    "head_bottleneck_dim": 16,
}
TINY_CROPS = {"global_crop_size": 32, "local_crop_size": 16, "num_local_crops": 2}


def _recipe_text() -> str:
    lines = [f"preset: {TINY_PRESET}", "config_overrides:"]
    lines += [f"  {key}: {value}" for key, value in TINY_MODEL.items()]
    lines += [f"{key}: {value}" for key, value in TINY_CROPS.items()]
    return "\n" + "\n".join(lines) + "\n"


TINY_MODEL_RECIPE = _recipe_text()


def tiny_arguments(**model_overrides) -> list[str]:
    """The tiny recipe as command-line arguments (`--config_overrides` last, so that more `key=value` pairs may
    follow); `model_overrides` replace or add config overrides."""
    crops = [token for key, value in TINY_CROPS.items() for token in (f"--{key}", str(value))]
    model = {**TINY_MODEL, **model_overrides}
    return ["--preset", TINY_PRESET, *crops, "--config_overrides", *(f"{k}={v}" for k, v in model.items())]


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a training-script subprocess: one torch thread (the machine is shared), no update checks
    or telemetry, unbuffered output (read while the run goes on); `extra` on top."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def prepared_model(accelerator):
    """A seeded `Linear(4, 3)` and its AdamW, through `accelerator.prepare` (what checkpoints save and load)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return accelerator.prepare(model, optimizer)


def train_a_bit(model, optimizer) -> None:
    """One optimiser step, so that the weights and AdamW's moments differ from the last checkpoint."""
    loss = model(torch.randn(5, 4)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
