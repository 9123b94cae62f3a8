"""Multi-process checks of training/pretrain.py and its training step, run by tests/test_training_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 ... tests/distributed_training_checks.py OUT DATA   (2 processes)
    python tests/distributed_training_checks.py OUT                                                  (reference)

With 2 processes (gloo on the CPU) it writes into OUT:
- `fixed_step.pt`: the state (student, teacher, centres) after two optimiser steps of `train_step` on fixed
  batches, A on rank 0 and B on rank 1, plus the largest difference between the ranks' states;
- `data_split.json`: the raw examples each rank's data loader reads;
- `train.json`: after a real `train()` run of the script (gradient accumulation and activation checkpointing on),
  the largest differences between the ranks' student, teacher and centres, and the world size / DDP facts;
- `moby_rank{0,1}.pt`: the same for MoBY + SelfPatch on a tiny Swin (3 steps, resumed from step 2): the whole state
  (both networks, queues and pointer) of each run, and the names of the tensors that differ between the ranks;
- `resume_rank{0,1}.pt`: per rank, the final step and state (student, teacher, centres) of a 5-step run and of a
  second run that resumed from the first one's step-3 checkpoint (each rank's data position and RNG restored).
With 1 process it writes `fixed_step.pt` for ONE step pair over the concatenation A+B (the reference).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import TINY_CROP_RECIPE, tiny_config  # noqa: E402
from training_runs import tiny_arguments  # noqa: E402

spec = importlib.util.spec_from_file_location("pretrain", REPO_ROOT / "training" / "pretrain.py")
pretrain = importlib.util.module_from_spec(spec)
sys.modules["pretrain"] = pretrain
spec.loader.exec_module(pretrain)

from accelerate import Accelerator  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from selfpatch_hf import SelfPatchForPretraining  # noqa: E402
from selfpatch_hf.training.compilation import is_compiled  # noqa: E402
from selfpatch_hf.training.loop import train_step  # noqa: E402
from selfpatch_hf.training.optimization import apply_schedule, build_optimizer  # noqa: E402
from selfpatch_hf.training.schedules import PretrainingSchedule  # noqa: E402

PER_RANK_BATCH = 3
TINY = tiny_arguments()  # the tiny recipe (tests/training_runs.py)


def fixed_batches() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    make = lambda: (  # noqa: E731
        torch.randn(PER_RANK_BATCH, 2, 3, 32, 32, generator=generator),
        torch.randn(PER_RANK_BATCH, TINY_CROP_RECIPE.num_local_crops, 3, 16, 16, generator=generator),
    )
    return make(), make()


def max_difference_between_ranks(state: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for tensor in state.values():
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        worst = max(worst, max((g.float() - gathered[0].float()).abs().max().item() for g in gathered))
    return worst


def fixed_step_check(accelerator: Accelerator, out: Path) -> None:
    """Two optimiser steps (the first with the last layer frozen) on fixed batches, drop-path off."""
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config(drop_path_rate=0.0))
    optimizer = build_optimizer(model.student)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    world = accelerator.num_processes
    if world == 2:
        assert isinstance(model, DistributedDataParallel), type(model)
    batch_a, batch_b = fixed_batches()
    if world == 1:
        batch = tuple(torch.cat([a, b]) for a, b in zip(batch_a, batch_b))
    else:
        batch = batch_a if accelerator.process_index == 0 else batch_b
    schedule = PretrainingSchedule.from_epochs(
        steps_per_epoch=1,
        total_steps=4,
        base_learning_rate=0.05,
        global_batch_size=2 * PER_RANK_BATCH,
        warmup_epochs=0,
        warmup_teacher_temperature=0.04,
        teacher_temperature=0.06,
        warmup_teacher_temperature_epochs=2,
        teacher_momentum=0.9,
    )
    losses = []
    for step in (0, 1):
        values = schedule.at(step)
        assert values.freeze_last_layer == (step == 0)
        apply_schedule(optimizer, values)
        result = train_step(accelerator, model, optimizer, [batch], values, clip_grad=0.5)
        losses.append([result.loss, result.image_loss, result.patch_loss])
    state = {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    difference = max_difference_between_ranks(state) if world > 1 else 0.0
    if accelerator.is_main_process:
        torch.save(
            {"state": state, "losses": losses, "rank_difference": difference, "world": world},
            out / "fixed_step.pt",
        )


def data_split_check(accelerator: Accelerator, data_dir: Path, out: Path) -> None:
    """One pass of each rank's real data loader (built by the script), recording every image it decodes."""
    import selfpatch_hf.data.streaming

    model_args, data_args, training_args, overrides = pretrain.parse_arguments(
        ["--dataset_name", str(data_dir), "--output_dir", str(out / "unused"), "--per_device_train_batch_size", "2",
         "--num_workers", "0", *TINY]
    )  # fmt: skip
    _, crops = pretrain.build_config(model_args, data_args, training_args, overrides)
    dataset, column = pretrain.open_image_stream(data_args, training_args)
    loader = pretrain.build_dataloader(dataset, column, crops, data_args, training_args, accelerator)
    decoded = []
    original_decode = selfpatch_hf.data.streaming.decode_image

    def recording_decode(value, *args, **kwargs):
        decoded.append(hashlib.sha1(value["bytes"]).hexdigest())
        return original_decode(value, *args, **kwargs)

    selfpatch_hf.data.streaming.decode_image = recording_decode
    try:
        shapes = [[list(batch.global_crops.shape), list(batch.local_crops.shape)] for batch in loader]
    finally:
        selfpatch_hf.data.streaming.decode_image = original_decode
    everyone = [None] * accelerator.num_processes
    dist.all_gather_object(everyone, {"decoded": decoded, "shapes": shapes})
    if accelerator.is_main_process:
        (out / "data_split.json").write_text(json.dumps(everyone))


def train_check(data_dir: Path, out: Path) -> None:
    argv = [
        "--dataset_name", str(data_dir), "--output_dir", str(out / "run"), *TINY,
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--gradient_checkpointing",
        "--samples_per_epoch", "16", "--max_steps", "5",
        "--checkpointing_steps", "2", "--num_workers", "1", "--shuffle_buffer_size", "4", "--logging_steps", "1",
        "--learning_rate", "0.05", "--warmup_epochs", "1",
    ]  # fmt: skip
    result = pretrain.train(*pretrain.parse_arguments(argv))
    accelerator = result.accelerator
    model = result.model
    groups = {
        "student": {k: v for k, v in model.student.state_dict().items()},
        "teacher": {k: v for k, v in model.teacher.state_dict().items()},
        "centers": {"image": model.objective.image_center, "patch": model.objective.patch_center},
    }
    differences = {name: max_difference_between_ranks(state) for name, state in groups.items()}
    # the run really trained: the student moved away from the teacher, the centres away from 0
    moved = {
        "student_vs_teacher": max(
            (model.student.state_dict()[k] - v).abs().max().item()
            for k, v in model.teacher.state_dict().items()
        ),
        "image_center": model.objective.image_center.abs().max().item(),
        "patch_center": model.objective.patch_center.abs().max().item(),
    }
    if accelerator.is_main_process:
        (out / "train.json").write_text(
            json.dumps(
                {
                    "differences": differences,
                    "moved": moved,
                    "global_step": result.global_step,
                    "num_processes": accelerator.num_processes,
                    "distributed_type": str(accelerator.distributed_type),
                }
            )
        )


def compile_check(data_dir: Path, out: Path) -> None:
    """--torch_compile (aot_eager: the graphs without code generation) with activation checkpointing under DDP:
    3 steps end where the same eager run ends, with identical replicas."""

    def run(output_dir: Path, *extra: str):
        argv = [
            "--dataset_name", str(data_dir), "--output_dir", str(output_dir), *TINY,
            "--per_device_train_batch_size", "2", "--gradient_checkpointing", "--samples_per_epoch", "16",
            "--max_steps", "3", "--checkpointing_steps", "0", "--export_steps", "0", "--num_workers", "0",
            "--shuffle_buffer_size", "0", "--logging_steps", "1", "--learning_rate", "0.05", *extra,
        ]  # fmt: skip
        return pretrain.train(*pretrain.parse_arguments(argv))

    eager = run(out / "eager")
    compiled = run(out / "compiled", "--torch_compile", "--torch_compile_backend", "aot_eager")
    eager_state, compiled_state = final_state(eager.model), final_state(compiled.model)
    torch.save(
        {
            "compiled_modules": sum(is_compiled(m) for m in compiled.model.modules()),
            "steps": [eager.global_step, compiled.global_step],
            "rank_difference": max_difference_between_ranks(compiled_state),
            "eager_difference": max(
                (compiled_state[k] - v).abs().max().item() for k, v in eager_state.items()
            ),
        },
        out / f"compile_rank{compiled.accelerator.process_index}.pt",
    )


def final_state(model: SelfPatchForPretraining) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


MOBY_SWIN_OVERRIDES = [
    "image_objective=moby", "embed_dim=8", "depths=[1,1,2]", "num_heads=[1,2,4]", "patch_size=2", "window_size=2",
    "moby_projection_dim=8", "moby_projector_hidden_dim=16", "moby_predictor_hidden_dim=12", "moby_queue_size=24",
]  # fmt: skip


def moby_check(data_dir: Path, out: Path) -> None:
    """MoBY + SelfPatch (Swin) through the script on 2 processes: 3 steps, and a run resumed from step 2."""

    def run(output_dir: Path, *extra: str):
        argv = [
            "--preset", "swin-tiny-patch4-window7", "--dataset_name", str(data_dir), "--output_dir", str(output_dir),
            "--global_crop_size", "32", "--config_overrides", *MOBY_SWIN_OVERRIDES, "--per_device_train_batch_size", "2",
            "--samples_per_epoch", "16", "--max_steps", "3", "--checkpointing_steps", "2", "--num_workers", "1",
            "--shuffle_buffer_size", "0", "--logging_steps", "1", "--learning_rate", "0.05", *extra,
        ]  # fmt: skip
        return pretrain.train(*pretrain.parse_arguments(argv))

    reference = run(out / "moby_reference")
    reference_state = final_state(reference.model)
    # per tensor: which ones differ between the ranks
    differing = [
        name
        for name, value in reference.model.state_dict().items()
        if max_difference_between_ranks({name: value.float()}) > 0
    ]
    resumed = run(
        out / "moby_resumed", "--resume_from_checkpoint", str(out / "moby_reference/checkpoints/checkpoint-2")
    )
    torch.save(
        {
            "world": reference.accelerator.num_processes,
            "differing_between_ranks": differing,
            "steps": [reference.global_step, resumed.global_step],
            "reference": reference_state,
            "resumed": final_state(resumed.model),
        },
        out / f"moby_rank{reference.accelerator.process_index}.pt",
    )


def resume_check(data_dir: Path, out: Path) -> None:
    """An uninterrupted 2-process run vs one resumed from its step-3 checkpoint (no shuffle buffer: exact)."""

    def run(output_dir: Path, *extra: str):
        argv = [
            "--dataset_name", str(data_dir), "--output_dir", str(output_dir), *TINY,
            "--per_device_train_batch_size", "2", "--samples_per_epoch", "16", "--max_steps", "5",
            "--checkpointing_steps", "3", "--checkpoints_total_limit", "2", "--num_workers", "1",
            "--shuffle_buffer_size", "0", "--logging_steps", "1", "--learning_rate", "0.05", "--warmup_epochs", "1",
            *extra,
        ]  # fmt: skip
        return pretrain.train(*pretrain.parse_arguments(argv))

    uninterrupted = run(out / "resume_reference")
    reference_state = final_state(uninterrupted.model)
    checkpoint = out / "resume_reference" / "checkpoints" / "checkpoint-3"
    resumed = run(out / "resumed", "--resume_from_checkpoint", str(checkpoint))
    rank = resumed.accelerator.process_index
    torch.save(
        {
            "reference_step": uninterrupted.global_step,
            "resumed_step": resumed.global_step,
            "reference": reference_state,
            "resumed": final_state(resumed.model),
        },
        out / f"resume_rank{rank}.pt",
    )
    resumed.accelerator.end_training()  # the last check: ends the process group


def main() -> None:
    out = Path(sys.argv[1])
    accelerator = Accelerator()
    if accelerator.num_processes == 1:
        fixed_step_check(accelerator, out)
        return
    assert accelerator.num_processes == 2 and dist.is_initialized() and dist.get_world_size() == 2
    data_dir = Path(sys.argv[2])
    fixed_step_check(accelerator, out)
    data_split_check(accelerator, data_dir, out)
    train_check(data_dir, out)
    moby_check(data_dir, out)
    compile_check(data_dir, out)
    resume_check(data_dir, out)


if __name__ == "__main__":
    main()
