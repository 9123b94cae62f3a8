"""Tiny checkpoints written by an older version of the model, and how they were made (tests/fixtures/legacy/).

Until the model was split by concern (commit 022679a and before), the objective's state lived at the top of the
model (`image_center`, `patch_center`, `queue1`, `queue2`, `queue_ptr`; now under `objective.`) and the config's
model type was `selfpatch_vit` (now `selfpatch`). The folders under `tests/fixtures/legacy/` were written by that
code and must keep loading with identical tensors:

- `<case>/`: `save_pretrained` folders (DINO ViT, MoBY ViT and MoBY Swin, each with and without the patch
  objective);
- `accelerate/<case>/`: `Accelerator.save_state` folders of two of them (what a training run's
  `checkpoints/checkpoint-N` holds for the model; the RNG-state pickle is left out);
- `expected.safetensors`: what the old code computed on the loaded folders with the inputs below: the losses of an
  eval-mode call, the losses of a training-mode call and the objective's state after it.

Regenerate (only with the old code, whose outputs they record) from a checkout of commit 022679a:

    git archive 022679a | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/legacy_checkpoints.py tests/fixtures/legacy
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy"
# the objective's buffers as the old code named them (top level)
LEGACY_STATE_NAMES = ("image_center", "patch_center", "queue1", "queue2", "queue_ptr")

_VIT = {
    "hidden_size": 8,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "patch_size": 4,
    "image_size": 16,
}
_SWIN = {"embed_dim": 4, "depths": [1, 1], "num_heads": [1, 2], "patch_size": 2, "window_size": 2}
_DINO = {
    "image_out_dim": 8,
    "patch_out_dim": 8,
    "head_hidden_dim": 8,
    "head_bottleneck_dim": 4,
    "local_crop_size": 8,
    "num_local_crops": 2,
}
_MOBY = {
    "moby_projection_dim": 4,
    "moby_projector_hidden_dim": 8,
    "moby_predictor_hidden_dim": 8,
    "moby_queue_size": 6,
}
# case -> (backbone, objective, patch objective)
CASES: dict[str, tuple[str, str, bool]] = {
    "dino_vit_selfpatch": ("vit", "dino", True),
    "dino_vit_plain": ("vit", "dino", False),
    "moby_vit_selfpatch": ("vit", "moby", True),
    "moby_vit_plain": ("vit", "moby", False),
    "moby_swin_selfpatch": ("swin", "moby", True),
    "moby_swin_plain": ("swin", "moby", False),
}
ACCELERATE_CASES = ("dino_vit_selfpatch", "moby_swin_selfpatch")


def config_kwargs(case: str) -> tuple[str, dict[str, Any]]:
    """The preset and the overrides of a case (no drop-path: the calls below are deterministic)."""
    backbone, objective, patch = CASES[case]
    kwargs: dict[str, Any] = dict(_SWIN if backbone == "swin" else _VIT)
    kwargs.update(_MOBY if objective == "moby" else _DINO)
    kwargs.update(
        image_objective=objective,
        global_crop_size=16,
        num_aggregation_blocks=1,
        aggregation_mlp_ratio=1.0,
        num_positives=3,
        drop_path_rate=0.0,
    )
    if not patch:
        kwargs.update(
            patch_loss_weight=0.0, image_representation="average_pool" if backbone == "swin" else "cls"
        )
    return ("swin-tiny-patch4-window7" if backbone == "swin" else "vit-tiny-patch16"), kwargs


def current_config_kwargs(case: str) -> tuple[str, dict[str, Any]]:
    """The same model as the current code builds it: the crop recipe is a training setting now, not a config field."""
    from selfpatch_hf.models.selfpatch.recipes import MOVED_TO_TRAINING

    preset, kwargs = config_kwargs(case)
    return preset, {key: value for key, value in kwargs.items() if key not in MOVED_TO_TRAINING}


def inputs(case: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The crops of the recorded calls: 2 images of 2 global 16 px crops, and 2 local 8 px crops (DINO)."""
    generator = torch.Generator().manual_seed(7)
    global_crops = torch.randn(2, 2, 3, 16, 16, generator=generator)
    if CASES[case][1] == "moby":
        return global_crops, None
    return global_crops, torch.randn(2, 2, 3, 8, 8, generator=generator)


def step_inputs(case: str, training: bool) -> dict[str, float]:
    """DINO's teacher temperature; MoBY's momentum step in training only."""
    if CASES[case][1] == "moby":
        return {"teacher_momentum": 0.9} if training else {}
    return {"teacher_temperature": 0.05}


def objective_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The objective's buffers by their old (top-level) names, from either version of the model."""
    state = model.state_dict()
    return {
        name: tensor.clone()
        for key, tensor in state.items()
        if (name := key.removeprefix("objective.")) in LEGACY_STATE_NAMES
    }


def record(model: torch.nn.Module, case: str) -> dict[str, torch.Tensor]:
    """An eval-mode call (nothing moves), then a training-mode call (the state moves): losses and state."""
    global_crops, local_crops = inputs(case)
    result = {}
    model.eval()
    with torch.no_grad():
        out = model(global_crops, local_crops, **step_inputs(case, training=False))
    result["eval_loss"] = out.loss
    model.train()
    out = model(global_crops, local_crops, **step_inputs(case, training=True))
    result["train_loss"] = out.loss.detach()
    result["train_image_loss"] = out.image_loss.detach()
    if out.patch_loss is not None:
        result["train_patch_loss"] = out.patch_loss.detach()
    result.update({f"state.{name}": tensor for name, tensor in objective_state(model).items()})
    return {f"{case}.{key}": value.clone() for key, value in result.items()}


def main(output: Path) -> None:
    """Writes the fixtures with the model code on the path (the old one: see the module docstring)."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining

    shutil.rmtree(output, ignore_errors=True)
    expected = {}
    for seed, case in enumerate(CASES):
        preset, kwargs = config_kwargs(case)
        torch.manual_seed(seed)
        model = SelfPatchForPretraining(SelfPatchConfig.from_preset(preset, **kwargs))
        with torch.no_grad():  # a teacher unlike the student, and centres away from 0
            for tensor in (*model.teacher.parameters(), *model.buffers()):
                if tensor.is_floating_point():
                    tensor.add_(0.05 * torch.randn_like(tensor))
        model.save_pretrained(output / case)
        if case in ACCELERATE_CASES:
            accelerator = Accelerator(cpu=True)
            prepared = accelerator.prepare(model)
            accelerator.save_state(output / "accelerate" / case, safe_serialization=True)
            for pickle in (output / "accelerate" / case).glob("*.pkl"):
                pickle.unlink()
            del prepared
        expected.update(record(SelfPatchForPretraining.from_pretrained(output / case), case))
    save_file(expected, output / "expected.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
