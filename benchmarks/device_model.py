"""The model-step section of `benchmarks/device_check.py` (its second) and the helpers every section shares: the
tiny SelfPatch configuration of the correctness checks, autocast per precision, device synchronisation and TF32.

ViT-S/16 SelfPatch and plain-DINO optimiser steps timed in bf16, fp32 (TF32) and bf16 + torch.compile: images/s,
peak memory, the SelfPatch/DINO ratio and the achieved TFLOP/s against the vendor's dense bf16 peak and the matmul
peak measured here.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from device_goals import Report, vendor_peak_tflops

BENCHMARKS = Path(__file__).resolve().parent
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Share of --budget after which the model section starts no new benchmark (each skipped one is reported, with why),
# so that it cannot silently starve the data and pretraining sections.
MODEL_BUDGET_SHARE = 0.5


# ------------------------------------------------------------------------------------------------ models


def tiny_config(**overrides):
    from selfpatch_hf import SelfPatchConfig

    settings = {
        "hidden_size": 64,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "patch_size": 8,
        "image_size": 32,  # the model's position grid; the tensors below are 2 x 32 px + 4 x 16 px crops
        "image_out_dim": 256,
        "patch_out_dim": 64,
        "head_hidden_dim": 64,
        "head_bottleneck_dim": 32,
        "drop_path_rate": 0.0,
    }
    return SelfPatchConfig.from_preset("vit-tiny-patch16", **{**settings, **overrides})


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tf32(enabled: bool):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------------------------------------------------ 2. model step


def model_shapes(args) -> dict:
    if args.cpu_mode:
        return {"preset": None, "batch": args.batch or 2, "global": 32, "local": 16, "num_local": 4}
    return {
        "preset": "vit-small-patch16",
        "batch": args.batch or 64,
        "global": 224,
        "local": 96,
        "num_local": 8,
    }


def build_model(shapes: dict, variant: str, attn: str = "sdpa"):
    from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining

    overrides = {"image_representation": "cls", "patch_loss_weight": 0.0} if variant == "dino" else {}
    if shapes["preset"] is None:
        config = tiny_config(**overrides)
    else:
        config = SelfPatchConfig.from_preset(shapes["preset"], drop_path_rate=0.1, **overrides)
    config._attn_implementation = attn
    config.backbone_config._attn_implementation = attn
    torch.manual_seed(0)
    return SelfPatchForPretraining(config).train()


def make_step(model, shapes: dict, device: torch.device, precision: str, crops=None):
    """One optimiser step on fixed random crops, or on `crops()` (a callable returning `(global, local)`) each step."""
    from selfpatch_hf.training.cuda_setup import adamw_kwargs
    from selfpatch_hf.training.optimization import build_param_groups

    optimizer = torch.optim.AdamW(build_param_groups(model.student), lr=1e-5, **adamw_kwargs(device))
    generator = torch.Generator(device=device).manual_seed(0)
    batch = shapes["batch"]
    global_crops = torch.randn(
        batch, 2, 3, shapes["global"], shapes["global"], device=device, generator=generator
    )
    local_crops = torch.randn(
        batch, shapes["num_local"], 3, shapes["local"], shapes["local"], device=device, generator=generator
    )

    def step():
        views = crops() if crops is not None else (global_crops, local_crops)
        with autocast(device, precision):
            loss = model(*views).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher(0.996)

    return step


def timed_steps(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float | None]:
    """(median seconds per step, peak memory in GiB or None on the CPU)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def peak_matmul_macs(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Multiply-accumulates per second of a large square matrix product in `dtype` on `device` (best of 5)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return size**3 / best


def synchronizing_calls(step) -> list[str]:
    """The warnings of `torch.cuda.set_sync_debug_mode("warn")` during one step: each is a call that makes the host
    wait for the GPU (a device-to-host copy, `.item()`, `nonzero`, a pageable host-to-device copy...)."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(warning.message) for warning in caught if "synchroniz" in str(warning.message).lower()]


def step_macs(shapes: dict, variant: str, device: torch.device) -> float:
    """Multiply-accumulates of one step, counted on an eager-attention copy (benchmarks/bench_model_step.py)."""
    sys.path.insert(0, str(BENCHMARKS))
    from bench_model_step import multiply_accumulates

    model = build_model(shapes, variant, attn="eager").to(device)
    with tf32(True):
        return multiply_accumulates(make_step(model, shapes, device, "fp32"))


def section_model(report: Report, device: torch.device, args, results: dict) -> None:
    from selfpatch_hf.training.compilation import compile_for_training

    shapes = model_shapes(args)
    images = shapes["batch"]
    # bf16 first (BENCHMARKS.md's goals are judged in bf16), compilation last (it takes the longest)
    precisions = ["fp32"] if args.cpu_mode else ["bf16", "fp32", "bf16+compile"]
    matmul_size = 512 if args.cpu_mode else 8192
    peaks = {"fp32": peak_matmul_macs(device, torch.float32, matmul_size)}
    with tf32(True):
        peaks["tf32"] = (
            peaks["fp32"] if device.type != "cuda" else peak_matmul_macs(device, torch.float32, matmul_size)
        )
    if "bf16" in precisions:
        peaks["bf16"] = peak_matmul_macs(device, torch.bfloat16, matmul_size)
    for name, macs in peaks.items():
        report.add(
            "model", f"matmul peak {name} ({matmul_size}^3)", 2 * macs / 1e12, "TFLOP/s", note="measured"
        )
    vendor_tflops, vendor_entry = vendor_peak_tflops(results["environment"]["device_name"])
    if device.type == "cuda":
        report.add(
            "model",
            "vendor dense bf16 peak",
            vendor_tflops,
            "TFLOP/s",
            note=f"table entry {vendor_entry!r}" if vendor_tflops else vendor_entry,
        )
    results["vendor_bf16_peak_tflops"] = vendor_tflops if device.type == "cuda" else None
    results["measured_bf16_matmul_tflops"] = 2 * peaks["bf16"] / 1e12 if "bf16" in peaks else None
    macs = {}
    for variant in ("selfpatch", "dino"):
        macs[variant] = step_macs(shapes, variant, device)
        report.add(
            "model",
            f"{variant} step multiply-accumulates",
            macs[variant] / 1e9,
            "GMAC",
            note=f"batch {images}",
        )
    deadline = args.started + args.budget * MODEL_BUDGET_SHARE
    step_seconds = {}
    for precision in precisions:
        for variant in ("selfpatch", "dino"):
            label = f"{variant} {precision}"
            if time.perf_counter() > deadline:
                report.add(
                    "model", f"{label} step", None, "", "skipped",
                    f"the model section's share of --budget ({MODEL_BUDGET_SHARE:.0%} of {args.budget:.0f} s) is spent",
                )  # fmt: skip
                continue
            model = build_model(shapes, variant).to(device)
            compiled = precision.endswith("+compile")
            if compiled:
                torch._dynamo.reset()  # each variant starts with dynamo's per-function graph cache empty
                compile_for_training(model, backend=args.compile_backend)
            step = make_step(model, shapes, device, precision.split("+")[0])
            start = time.perf_counter()
            with tf32(True):
                seconds, peak_memory = timed_steps(
                    step, device, args.warmup + (2 if compiled else 0), args.steps
                )
            step_seconds[label] = seconds
            peak = peaks["tf32" if precision == "fp32" else "bf16"]
            flops = 2 * macs[variant] / seconds
            of_vendor = (
                f" = {flops / 1e12 / vendor_tflops:.1%} of the vendor's dense bf16 peak"
                if vendor_tflops and precision != "fp32"
                else ""
            )
            report.add(
                "model",
                f"{label} step",
                seconds * 1e3,
                "ms",
                note=f"{images / seconds:.1f} images/s; {flops / 1e12:.3g} TFLOP/s = "
                f"{macs[variant] / seconds / peak:.1%} of the measured matmul{of_vendor}; peak memory "
                + (f"{peak_memory:.2f} GiB" if peak_memory is not None else "n/a on CPU")
                + f"; {time.perf_counter() - start:.0f} s with warm-up",
            )
            if device.type == "cuda" and precision == "bf16":
                syncs = synchronizing_calls(step)
                report.add(
                    "model",
                    f"{label} step: calls that wait for the GPU",
                    len(syncs),
                    note=(syncs[0][:150] if syncs else "none: the host queues the whole step ahead"),
                )
            results[label] = {
                "step_seconds": seconds,
                "images_per_second": images / seconds,
                "tflops": flops / 1e12,
                "fraction_of_peak": macs[variant] / seconds / peak,
                "fraction_of_vendor_peak": flops / 1e12 / vendor_tflops if vendor_tflops else None,
                "peak_memory_gib": peak_memory,
            }
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for precision in precisions:
        if f"selfpatch {precision}" not in step_seconds or f"dino {precision}" not in step_seconds:
            continue
        ratio = step_seconds[f"selfpatch {precision}"] / step_seconds[f"dino {precision}"]
        report.add(
            "model",
            f"SelfPatch / DINO step time, {precision}",
            ratio,
            "x",
            note="BENCHMARKS.md goal: <= 1.2 (bf16, GPU)",
        )
        results[f"ratio {precision}"] = ratio


def fastest_step(results: dict) -> str | None:
    """The label of the fastest measured SelfPatch step: the rate the data path has to feed."""
    labels = [
        label for label in ("selfpatch bf16+compile", "selfpatch bf16", "selfpatch fp32") if label in results
    ]
    return max(labels, key=lambda label: results[label]["images_per_second"]) if labels else None
