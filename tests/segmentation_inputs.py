"""Inputs of the fine-tuning tests: a tiny exported backbone, tiny synthetic segmentation scenes, the arguments of a
short `training/finetune_segmentation.py` run on them, and the script loaded as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from tiny_images import write_parquet_images
from tiny_models import tiny_config

from selfpatch_hf import SelfPatchForPretraining, export_backbone
from selfpatch_hf.data.samples.synthetic_scenes import make_segmentation_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "finetune_segmentation.py"


def segmentation_inputs(root: Path) -> dict[str, Path]:
    """A 4-block ViT export (width 32, 8-pixel patches), 12 + 4 synthetic 64 x 64 scenes, and 8 plain images."""
    torch.manual_seed(0)
    backbone = export_backbone(SelfPatchForPretraining(tiny_config(num_hidden_layers=4)), root / "backbone")
    make_segmentation_dataset(root / "scenes", num_train=12, num_eval=4, image_size=64, seed=0)
    return {"backbone": backbone, "data": root / "scenes", "images": write_parquet_images(root / "images", 8)}


def finetune_arguments(inputs: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return [
        "--backbone", str(inputs["backbone"]), "--dataset_name", str(inputs["data"]), "--label_names",
        "offline-scenes", "--crop_size", "32", "32", "--scale", "64", "48", "--per_device_train_batch_size", "4",
        "--decoder_hidden_size", "16", "--learning_rate", "2e-3", "--warmup_steps", "1", "--max_steps", "8",
        "--num_workers", "0", "--logging_steps", "1", "--checkpointing_steps", "4", "--checkpoints_total_limit",
        "3", "--seed", "0", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def load_finetune_script():
    spec = importlib.util.spec_from_file_location("finetune_segmentation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module
