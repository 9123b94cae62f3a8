"""The GPU training path, tested where a CPU can: bf16 autocast numerics, fp16 loss-scaler skipped steps, compiled
networks (agreement with eager, no recompilation after the first step), and the device check's CPU mode."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_BACKBONE, tiny_config, tiny_dino_config

from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining
from selfpatch_hf.training.compilation import compile_for_training, compiled_modules, is_compiled
from selfpatch_hf.training.mixed_precision import ScalerSkipGuard

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_model(config=None, seed: int = 0) -> SelfPatchForPretraining:
    torch.manual_seed(seed)
    return SelfPatchForPretraining(config or tiny_config(drop_path_rate=0.0)).train()


def crops(seed: int = 1, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 2, 3, 32, 32, generator=generator),
        torch.randn(batch, 4, 3, 16, 16, generator=generator),
    )


# ------------------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("make_config", [tiny_config, tiny_dino_config], ids=["selfpatch", "dino"])
def test_bf16_autocast_loss_and_gradients_match_fp32(make_config):
    """Backbone, aggregation and heads under bf16 autocast; logits, softmaxes, losses and centres in fp32.

    Tolerance: losses within 1% (relative) of fp32 on the same weights and crops (measured: 0.1%), the student's
    gradient direction within cosine 0.99 of fp32's; the centres and the teacher stay fp32."""
    model = tiny_model(make_config(drop_path_rate=0.0))
    global_crops, local_crops = crops()
    reference = model(global_crops, local_crops, update_state=False)
    reference.loss.backward()
    reference_grads = torch.cat([p.grad.flatten() for p in model.student.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(global_crops, local_crops)
    mixed.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.student.parameters() if p.grad is not None])

    assert mixed.loss.dtype == torch.float32
    for name in ("loss", "image_loss", "patch_loss"):
        if getattr(reference, name) is None:
            assert getattr(mixed, name) is None
            continue
        torch.testing.assert_close(getattr(mixed, name), getattr(reference, name), rtol=0.01, atol=0)
    assert torch.nn.functional.cosine_similarity(grads, reference_grads, dim=0) > 0.99
    assert (
        model.objective.image_center.dtype == torch.float32 and model.objective.image_center.abs().sum() > 0
    )  # moved, in fp32
    model.update_teacher(0.9)
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.teacher.parameters())


def test_a_step_skipped_by_the_loss_scaler_moves_neither_weights_nor_teacher_nor_centres():
    """fp16 loss scaling: an overflowing step is skipped by the scaler; the guard restores the centres that the
    forward moved, and tells the loop not to update the teacher or advance the schedules."""
    model = tiny_model()
    optimizer = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-3)
    global_crops, local_crops = crops()
    for init_scale, should_skip in (
        (2.0**127, True),
        (1.0, False),
    ):  # 2^127: the scaled gradients overflow fp32
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        student = [p.detach().clone() for p in model.student.parameters()]
        teacher = [p.detach().clone() for p in model.teacher.parameters()]
        guard = ScalerSkipGuard(model)
        guard.before_forward()
        loss = model(global_crops, local_crops).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = guard.after_step(skipped=scaler.get_scale() < scale)
        if not skipped:
            model.update_teacher(0.9)
        optimizer.zero_grad(set_to_none=True)
        assert skipped == should_skip
        moved = [not torch.equal(a, b) for a, b in zip(student, model.student.parameters())]
        assert any(moved) != should_skip
        assert all(torch.equal(a, b) for a, b in zip(teacher, model.teacher.parameters())) == should_skip
        assert torch.equal(model.objective.image_center, guard.snapshot[0]) == should_skip
    # a disabled guard (no scaler: fp32 / bf16) keeps nothing
    guard = ScalerSkipGuard(model, enabled=False)
    guard.before_forward()
    assert guard.snapshot is None and guard.after_step(skipped=False) is False


@pytest.mark.parametrize("objective", ["dino", "moby"])
def test_the_training_step_moves_nothing_on_a_scaler_skipped_step(objective):
    """The training loop's `train_step` with accelerate's loss-scaler plumbing (a CPU GradScaler stands in for the
    CUDA one, which accelerate creates only on GPUs): an overflowing step is reported as skipped and moves no weight,
    no teacher parameter and no buffer of any module (centres, queues and their pointer, the BatchNorm running
    statistics and batch counts of MoBY's projectors and predictors); the next step at a sane scale trains."""
    from accelerate import Accelerator

    from selfpatch_hf.training.loop import train_step
    from selfpatch_hf.training.schedules import ScheduleValues

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1)
    if objective == "moby":  # the target's momentum step and the key queues are updated inside the forward
        moby = {"moby_projection_dim": 8, "moby_projector_hidden_dim": 16, "moby_predictor_hidden_dim": 12}
        config = SelfPatchConfig.from_preset(
            "vit-tiny-patch16",
            image_objective="moby",
            moby_queue_size=12,
            **TINY_BACKBONE,
            **moby,
        )
        model = tiny_model(config)
    else:
        model = tiny_model()
    with torch.no_grad():  # a teacher unlike the student: its momentum step moves it even before training
        for p in model.teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    optimizer = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    values = ScheduleValues(0, 0.0, 1e-3, 0.04, 0.9, 0.04, freeze_last_layer=False)

    def state():
        return {
            **{f"parameter {n}": t.detach().clone() for n, t in model.named_parameters()},
            **{f"buffer {n}": t.detach().clone() for n, t in model.named_buffers()},
        }

    batch_norm = [n for n in state() if "running_mean" in n or "num_batches_tracked" in n]
    assert bool(batch_norm) == (objective == "moby")  # MoBY's projectors and predictors have BatchNorm
    before = state()
    result = train_step(accelerator, model, optimizer, [crops()], values, clip_grad=3.0)
    assert result.skipped and math.isfinite(result.loss)
    after = state()
    assert [name for name in before if not torch.equal(before[name], after[name])] == []
    accelerator.scaler.update(1.0)  # what the halvings would reach in time
    result = train_step(accelerator, model, optimizer, [crops()], values, clip_grad=3.0)
    assert not result.skipped
    after = state()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(name.startswith("parameter student.") for name in moved)
    assert any(name.startswith("parameter teacher.") for name in moved)
    own_buffers = {f"buffer {n}" for n, _ in model.named_buffers() if n.startswith("objective.")}
    assert own_buffers & moved  # centres / queues
    assert set(batch_norm) <= moved  # the forward moved the BatchNorm statistics, which a skip restores


def test_cuda_defaults_apply_on_cuda_only():
    from selfpatch_hf.training.cuda_setup import adamw_kwargs, ddp_kwargs, enable_tf32

    assert adamw_kwargs("cpu") == {} and adamw_kwargs("cuda:0") == {"fused": True}
    assert ddp_kwargs("cpu", 1) == {"broadcast_buffers": False}  # what the CPU runs always had
    assert ddp_kwargs("cuda", 1) == {
        "broadcast_buffers": False,
        "gradient_as_bucket_view": True,
        "static_graph": True,
    }
    assert ddp_kwargs("cuda", 4)["static_graph"] is False  # accumulation's no_sync micro-steps
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert enable_tf32("cpu") is False and not torch.backends.cuda.matmul.allow_tf32
        assert enable_tf32("cuda") is True and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------------------------------------------------- compile


def train_steps(model, steps: int, on_step=None) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        global_crops, local_crops = crops(seed=step)
        loss = model(global_crops, local_crops).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher(0.99)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return losses


def test_compiled_networks_match_eager_and_do_not_recompile_after_the_first_step():
    """Student backbone with gradient checkpointing (the teacher's runs without): compiled and eager losses and
    teachers agree over 3 optimiser steps, steps 2 and 3 compile nothing, and a new crop size would.

    `aot_eager` (dynamo + AOTAutograd, eager kernels) instead of inductor: inductor's C++ compilation of these graphs
    takes minutes on the 2-core CI machine; the graph capture, guards and recompilation behaviour tested here are
    the same. (~50 s on that machine: dynamo traces 6 modules at 2 resolutions, forward and backward.)"""
    torch._dynamo.reset()
    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        model.student.backbone.activation_checkpointing_enable()
    modules = compile_for_training(compiled, backend="aot_eager")
    assert len(modules) == 6 and all(is_compiled(m) for m in compiled_modules(compiled))
    assert set(compiled.state_dict()) == set(
        eager.state_dict()
    )  # names unchanged: checkpoints and exports work

    def forbid_recompilation(step: int) -> None:
        if step == 0:  # steps 2 and 3 must reuse the graphs of step 1 (one per resolution and network)
            torch.compiler.set_stance("fail_on_recompile")

    try:
        compiled_losses = train_steps(compiled, 3, on_step=forbid_recompilation)
        # the check can fail: a third resolution recompiles the backbones
        with pytest.raises(Exception, match="(?i)recompil"):
            compiled(torch.randn(2, 2, 3, 40, 40), torch.randn(2, 4, 3, 16, 16))
    finally:
        torch.compiler.set_stance("default")
    eager_losses = train_steps(eager, 3)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled.teacher.parameters(), eager.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 6  # the modules did go through dynamo


@pytest.mark.slow
def test_the_default_backend_inductor_compiles_and_matches_eager():
    """`--torch_compile` with its default backend: inductor generates and compiles C++ kernels on the CPU (Triton
    ones on a GPU). Sized to stay cheap: plain DINO with one block (student and teacher backbone and image head: 4
    modules), global crops only (one resolution), 2 steps; the first step compiles (about a minute here)."""
    torch._dynamo.reset()
    eager = tiny_model(tiny_dino_config(num_hidden_layers=1, drop_path_rate=0.0))
    compiled = copy.deepcopy(eager)
    assert len(compile_for_training(compiled)) == 4  # backend="inductor", the script's default

    def steps(model) -> list[float]:
        optimizer = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for step in range(2):
            global_crops, _ = crops(seed=step)
            loss = model(global_crops, global_crops.new_empty(4, 0, 3, 16, 16)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_teacher(0.99)
            losses.append(loss.item())
        return losses

    compiled_losses = steps(compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 4  # went through dynamo, not eager
    torch.testing.assert_close(compiled_losses, steps(eager), rtol=1e-4, atol=1e-4)
    for a, b in zip(compiled.teacher.parameters(), eager.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- device check


def test_device_check_cpu_mode(tmp_path):
    """benchmarks/device_check.py in its CPU mode (what runs without CUDA): every section runs and passes, the JSON
    report holds the table. (~1-2 min on the 2-core CI machine, most of it the two pretraining runs.)"""
    import json
    import os
    import subprocess
    import sys

    output = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "device_check.py"), "--cpu", "--output", str(output)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["passed"] and report["mode"] == "cpu"
    rows = report["rows"]
    assert {row["section"] for row in rows} == {"correctness", "model", "data", "pretrain"}
    assert not [row for row in rows if row["status"] in ("FAIL", "skipped")]
    checks = {row["check"] for row in rows}
    assert "fp32 loss, cpu vs cpu" in checks and "exported backbone loads (AutoModel) and runs" in checks
    assert report["results"]["selfpatch fp32"]["images_per_second"] > 0
    assert report["results"]["data device"]["images_per_second"] > 0
    assert "SelfPatch / DINO step time, fp32" in run.stdout  # the printed table


def test_device_check_exits_non_zero_on_a_failed_correctness_check(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys

    spec = importlib.util.spec_from_file_location(
        "device_check", REPO_ROOT / "benchmarks" / "device_check.py"
    )
    device_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "device_check", device_check)  # dataclasses look their module up there
    spec.loader.exec_module(device_check)
    monkeypatch.setattr(device_check, "AUTOCAST_RTOL", 0.0)  # bf16 can never match fp32 exactly
    output = tmp_path / "report.json"
    assert device_check.main(["--cpu", "--sections", "correctness", "--output", str(output)]) == 1
    report = json.loads(output.read_text())
    failed = [row["check"] for row in report["rows"] if row["status"] == "FAIL"]
    assert "bf16 autocast loss vs fp32" in failed and not report["passed"]


def test_a_compiled_model_exports_and_saves_like_an_eager_one(tmp_path):
    """Compilation is in place and lazy: the exported backbone, `save_pretrained` and the state dict are the
    eager model's (nothing is traced here: compiled modules compile at their first call)."""
    from transformers import AutoModel

    from selfpatch_hf.export.backbone import export_backbone

    model = tiny_model()
    compile_for_training(model, backend="aot_eager")
    path = export_backbone(model, tmp_path / "backbone", source="teacher")
    backbone = AutoModel.from_pretrained(path)
    assert not is_compiled(backbone)
    for name, tensor in model.teacher.backbone.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[name], tensor, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "model")
    reloaded = SelfPatchForPretraining.from_pretrained(tmp_path / "model")
    assert set(reloaded.state_dict()) == set(model.state_dict())


def test_device_check_runs_without_datasets_and_says_what_is_missing(tmp_path):
    """GPU images may lack `datasets` and `albumentations`: the model-side sections still run, the others are
    reported as skipped with the install line, and the exit status stays 0."""
    import json
    import os
    import subprocess
    import sys

    output = tmp_path / "report.json"
    script = (
        "import runpy, sys\n"
        "for name in ('datasets', 'albumentations'):\n"
        "    sys.modules[name] = None  # importing them fails, as where they are not installed\n"
        f"sys.argv = ['device_check.py', '--cpu', '--sections', 'correctness', 'data', '--output', {str(output)!r}]\n"
        f"runpy.run_path({str(REPO_ROOT / 'benchmarks' / 'device_check.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    assert {row["status"] for row in rows if row["section"] == "correctness"} <= {"ok", "info"}
    (data_row,) = [row for row in rows if row["section"] == "data"]
    assert data_row["status"] == "skipped" and "pip install datasets albumentations" in data_row["note"]
    assert "skipped: data (missing datasets, albumentations" in run.stdout
