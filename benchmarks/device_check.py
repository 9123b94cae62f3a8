"""One-command check of a GPU machine for SelfPatch pretraining: correctness, speed, data feeding, a training run.

    python benchmarks/device_check.py                  # a CUDA machine: full sizes, under 6 minutes on one GPU
    python benchmarks/device_check.py --cpu            # CPU mode (automatic without CUDA): tiny sizes, seconds
    python benchmarks/device_check.py --sections correctness model   # a subset

Prints a table, writes JSON (`--output`, default `device_check.json`), exits 1 if a correctness check fails (2 on
bad arguments). Sections:

1. correctness: a tiny SelfPatch model with fixed weights and crops: fp32 loss on the device vs the CPU (TF32 off),
   bf16 and fp16 autocast losses vs fp32, one optimiser step per precision (fp16 with a loss scaler) stays finite;
   the SDPA kernels that accept the backbone's attention;
2. model: ViT-S/16, 2 x 224 + 8 x 96 crops, per-device batch 64 (`--batch`): SelfPatch and plain-DINO step time,
   images/s and peak memory in bf16, fp32 (TF32) and bf16 + torch.compile; the SelfPatch/DINO ratio; achieved
   TFLOP/s from the step's multiply-accumulate count (`benchmarks/bench_model_step.py`) as a fraction of both the
   vendor's dense bf16 peak for the device found (`DENSE_BF16_PEAK_TFLOPS`, a table of known devices) and the matmul
   peak this script measures on it;
3. data: the device share of `augmentation_device="device_crops"` alone on one batch (nvJPEG decode where
   torchvision is there, crops, resizes, photometric ops: images/s, peak device memory, its share of the bf16 step)
   and the bf16 step with it in front; then images/s of `build_pretraining_dataloader` with as many workers as cores
   on synthetic 500x375 JPEG shards for each `augmentation_device` (workers, device, device_crops), against the
   fastest SelfPatch step's images/s: the cores per GPU that feeding it takes;
4. pretrain: `training/pretrain.py` on the demo recipe with `--mixed_precision bf16` for 20 steps with checkpoints,
   a run resumed to 24 steps with `--augmentation_device device_crops`, and the exported backbone loaded with
   `AutoModel` and run on the device.

After the table it prints a verdict for each GPU goal of BENCHMARKS.md (bf16 SelfPatch step >= 40% of the dense
peak; SelfPatch/DINO <= 1.2; loader cores per GPU <= 8; device augmentation < 10% of a step): PASS, FAIL, or "not
measured" with the reason (CPU mode, a missing package, a benchmark skipped for time). Each section stops starting
benchmarks once its share of `--budget` is spent (model: half, data: three quarters), and every benchmark skipped
that way is printed as skipped, so a slow section never silently starves the next ones.

The CPU mode runs the same code with tiny sizes (a 2-layer model, a batch of 2, 2 pretraining steps), skips
compilation (tested in tests/test_gpu_training.py) and fp16/bf16 speed (CPU paths stay fp32); CI runs it
(tests/test_gpu_training.py::test_device_check_cpu_mode).

Only what a section needs is imported when it runs. A section whose packages are missing is reported as skipped,
with the `pip install` line that fixes it (sections 3 and 4 need `datasets` and `albumentations`).

The model-step section and the helpers the sections share are in `benchmarks/device_model.py`; the report and the
verdicts on the GPU goals of BENCHMARKS.md in `benchmarks/device_goals.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, also when loaded by path
from device_goals import (  # noqa: E402
    Report,
    format_value,
    verdicts,
)
from device_model import (  # noqa: E402
    BENCHMARKS,
    PRECISIONS,
    autocast,
    build_model,
    fastest_step,
    make_step,
    model_shapes,
    section_model,
    synchronize,
    tf32,
    timed_steps,
    tiny_config,
)

SECTIONS = ("correctness", "model", "data", "pretrain")
SECTION_PACKAGES = {
    "correctness": ("transformers", "huggingface_hub", "safetensors"),
    "model": ("transformers", "huggingface_hub", "safetensors"),
    "data": ("datasets", "albumentations", "cv2", "skimage"),
    "pretrain": ("datasets", "albumentations", "cv2", "skimage", "accelerate", "yaml", "tqdm"),
}
PIP_NAMES = {"cv2": "opencv-python-headless", "skimage": "scikit-image", "yaml": "pyyaml"}
# Share of --budget after which the data section starts no new benchmark (the model section's: device_model.py).
DATA_BUDGET_SHARE = 0.75
# Tolerances of the correctness checks (relative, on the loss):
DEVICE_VS_CPU_RTOL = 1e-4  # fp32 on both (TF32 off): summation order only
AUTOCAST_RTOL = 0.02  # bf16 / fp16 autocast vs fp32 on the same weights and crops (bf16: 8-bit mantissa)


# ------------------------------------------------------------------------------------------------ environment


def environment(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
    }
    if device.type == "cuda":
        info["device_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    for package in (
        "transformers",
        "accelerate",
        "huggingface_hub",
        "datasets",
        "safetensors",
        "albumentations",
    ):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:
            info[package] = None
    return info


def missing_packages(section: str) -> list[str]:
    return [name for name in SECTION_PACKAGES[section] if importlib.util.find_spec(name) is None]


# ------------------------------------------------------------------------------------------------ 1. correctness


def section_correctness(report: Report, device: torch.device, args) -> None:
    from selfpatch_hf import SelfPatchForPretraining
    from selfpatch_hf.training.cuda_setup import adamw_kwargs, sdpa_backends
    from selfpatch_hf.training.optimization import build_param_groups

    torch.manual_seed(0)
    reference = SelfPatchForPretraining(tiny_config()).train()
    generator = torch.Generator().manual_seed(1)
    global_crops = torch.randn(4, 2, 3, 32, 32, generator=generator)
    local_crops = torch.randn(4, 4, 3, 16, 16, generator=generator)
    with torch.no_grad():
        cpu_loss = reference(global_crops, local_crops, update_state=False).loss.item()

    model = SelfPatchForPretraining(tiny_config()).train()
    model.load_state_dict(reference.state_dict())
    model.to(device)
    crops = (global_crops.to(device), local_crops.to(device))
    losses = {}
    with tf32(False), torch.no_grad():
        for precision in ("fp32", "bf16", "fp16"):
            with autocast(device, precision):
                losses[precision] = model(*crops, update_state=False).loss.item()
    report.check(
        "correctness",
        f"fp32 loss, {device.type} vs cpu",
        abs(losses["fp32"] - cpu_loss) / abs(cpu_loss),
        DEVICE_VS_CPU_RTOL,
        "rel",
        f"{losses['fp32']:.6f} vs {cpu_loss:.6f}",
    )
    for precision in ("bf16", "fp16"):
        report.check(
            "correctness",
            f"{precision} autocast loss vs fp32",
            abs(losses[precision] - losses["fp32"]) / abs(losses["fp32"]),
            AUTOCAST_RTOL,
            "rel",
            f"{losses[precision]:.6f}",
        )
    for precision in ("fp32", "bf16", "fp16"):
        model = SelfPatchForPretraining(tiny_config()).train()
        model.load_state_dict(reference.state_dict())
        model.to(device)
        optimizer = torch.optim.AdamW(build_param_groups(model.student), lr=1e-3, **adamw_kwargs(device))
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        skipped = 0
        for _ in range(10):  # fp16: the scaler may skip the first steps (overflow at its initial scale 2^16)
            with autocast(device, precision):
                loss = model(*crops).loss
            if scaler is None:
                loss.backward()
                optimizer.step()
                break
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scaler.get_scale() >= scale:
                break
            skipped += 1
        model.update_teacher(0.996)
        finite = all(p.isfinite().all() for p in model.parameters()) and math.isfinite(loss.item())
        moved = any(
            not torch.equal(a.cpu(), b)
            for a, b in zip(model.student.parameters(), reference.student.parameters())
        )
        report.add(
            "correctness",
            f"{precision} optimiser step finite and applied",
            "yes" if finite and moved else "no",
            status="ok" if finite and moved else "FAIL",
            note=("fused AdamW" if adamw_kwargs(device) else "AdamW")
            + (f"; {skipped} step(s) skipped by the loss scaler first" if scaler is not None else ""),
        )
    for dtype_name in ("fp32", "bf16") if device.type == "cuda" else ("fp32",):
        backends = sdpa_backends(device, PRECISIONS[dtype_name], num_heads=6, head_dim=64, tokens=197)
        report.add(
            "correctness",
            f"SDPA kernels for ViT-S attention, {dtype_name}",
            ",".join(name for name, ok in backends.items() if ok) or "none",
            note="each tried alone",
        )
        report.add(
            "correctness",
            f"SDPA kernel the backbone runs, {dtype_name}",
            sdpa_kernel_in_use(device, dtype_name),
            note="forward + backward under autocast" if dtype_name != "fp32" else "forward + backward",
        )


def sdpa_kernel_in_use(device: torch.device, precision: str) -> str:
    """The attention operators a ViT-S/16-shaped backbone (2 layers) calls, from the profiler's operator names."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_hidden_layers=2)
    backbone = ViTModel(config, add_pooling_layer=False).to(device)
    pixels = torch.randn(2, 3, 224, 224, device=device)
    with profile(activities=[ProfilerActivity.CPU]) as profiler, autocast(device, precision):
        backbone(pixels).last_hidden_state.float().sum().backward()
    names = {event.key for event in profiler.key_averages()}
    # e.g. aten::_scaled_dot_product_flash_attention (+ _backward) -> "flash_attention"
    kernels = {
        name.removeprefix("aten::_scaled_dot_product_").removesuffix("_backward")
        for name in names
        if name.startswith("aten::_scaled_dot_product_")
    }
    return ",".join(sorted(kernels)) or "none found"


# ------------------------------------------------------------------------------------------------ 3. data path


def device_augmentation(
    report: Report, device: torch.device, args, results: dict, jpegs: list[bytes]
) -> None:
    """`augmentation_device="device_crops"`'s device share alone on one batch (decode where nvJPEG is available,
    crops, resizes, photometric ops): images/s, peak device memory, and its share of a bf16 SelfPatch step; then that
    step with the augmentation in front of it."""
    import numpy as np

    from selfpatch_hf.data.augmentation import MultiCropAugmentation
    from selfpatch_hf.data.decoding import device_jpeg_decoder
    from selfpatch_hf.data.device_crops import DeviceCrops, SourceBatch

    shapes = model_shapes(args)
    batch = shapes["batch"]
    augmentation = MultiCropAugmentation(shapes["global"], shapes["local"], shapes["num_local"])
    decoder = device_jpeg_decoder(device)
    sources = SourceBatch(augmentation, jpegs_on_device=decoder is not None)
    for index in range(batch):
        sources.add_image(jpegs[index % len(jpegs)], None, np.random.default_rng(index))
    sources = sources.tensors()
    if device.type == "cuda":
        sources = {name: tensor.pin_memory() for name, tensor in sources.items()}
    crops = DeviceCrops(augmentation, device, decoder)
    for _ in range(2):
        output = crops(sources)
    synchronize(device)
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        output = crops(sources)
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20 if device.type == "cuda" else None
    decoded_by = "nvJPEG on the device" if decoder is not None else "JPEGs decoded in the workers"
    report.add(
        "data",
        "device augmentation alone (device_crops)",
        batch / seconds,
        "images/s",
        note=f"batch {batch}, {decoded_by}; peak device memory "
        + (
            f"{peak:.0f} MiB"
            if peak is not None
            else f"n/a on CPU (working set {crops.last_working_bytes / 2**20:.0f} MiB)"
        ),
    )
    entry = {"images_per_second": batch / seconds, "seconds_per_batch": seconds, "peak_memory_mib": peak}
    entry["nvjpeg"] = decoder is not None
    results["device augmentation"] = entry
    if output.global_crops.shape[0] != batch or output.dropped:
        report.add("data", "device augmentation kept every image", len(output.dropped), "dropped", "FAIL")

    if time.perf_counter() > args.started + args.budget * DATA_BUDGET_SHARE:
        report.add(
            "data", "SelfPatch step with the device augmentation", None, "", "skipped", "time budget spent"
        )
        return
    precision = "fp32" if args.cpu_mode else "bf16"
    model = build_model(shapes, "selfpatch").to(device)

    def augmented_crops():
        output = crops(sources)
        return output.global_crops, output.local_crops

    step = make_step(model, shapes, device, precision, crops=augmented_crops)
    with tf32(True):
        step_seconds, _ = timed_steps(step, device, args.warmup, args.steps)
    label = f"selfpatch {precision}"
    note = f"{batch / step_seconds:.1f} images/s"
    if label in results:
        bare = results[label]["step_seconds"]
        share = seconds / bare
        entry["share_of_step"] = share
        note += (
            f"; the augmentation alone is {share:.1%} of the bare {label} step (BENCHMARKS.md goal: < 10%)"
        )
    report.add("data", f"{label} step with the device augmentation", step_seconds * 1e3, "ms", note=note)
    entry["step_with_augmentation_seconds"] = step_seconds
    del model, step


def section_data(report: Report, device: torch.device, args, results: dict) -> None:
    import datasets

    sys.path.insert(0, str(BENCHMARKS))
    from bench_data import make_jpegs, write_parquet

    from selfpatch_hf.data.streaming import build_pretraining_dataloader

    datasets.disable_progress_bars()
    cores = results["environment"]["cores"]
    workers = args.data_workers or cores
    unique = 32 if args.cpu_mode else 512
    repeats = 2 if args.cpu_mode else 8
    batch = 8 if args.cpu_mode else 64
    deadline = args.started + args.budget * DATA_BUDGET_SHARE
    jpegs = make_jpegs(unique)
    device_augmentation(report, device, args, results, jpegs)
    with tempfile.TemporaryDirectory() as directory:
        shards = write_parquet(jpegs * repeats, Path(directory) / "shards", num_shards=max(4, 2 * workers))
        for mode in ("workers", "device", "device_crops"):
            label = f"loader, augmentation_device={mode}"
            if time.perf_counter() > deadline:
                report.add(
                    "data", label, None, "", "skipped",
                    f"the data section's share of --budget ({DATA_BUDGET_SHARE:.0%} of {args.budget:.0f} s) is spent",
                )  # fmt: skip
                continue
            loader = build_pretraining_dataloader(
                str(shards / "*.parquet"),
                batch_size=batch,
                num_workers=workers,
                shuffle_buffer_size=0,
                device=device,
                augmentation_device=mode,
            )
            first = None
            count = 0
            for crops in loader:
                synchronize(device)
                if first is None:  # worker start-up and the first batch are not the steady rate
                    first = time.perf_counter()
                else:
                    count += crops.global_crops.shape[0]
                if count and time.perf_counter() - first > args.data_seconds:
                    break
            seconds = time.perf_counter() - first
            rate = count / seconds
            per_core = rate / workers
            results[f"data {mode}"] = {"images_per_second": rate, "workers": workers, "per_worker": per_core}
            note = f"{workers} workers, {per_core:.1f} images/s per worker"
            step_label = fastest_step(results)
            if step_label is not None:
                needed = results[step_label]["images_per_second"] / per_core
                results[f"data {mode}"]["cores_per_device"] = needed
                note += f"; the {step_label} step ({results[step_label]['images_per_second']:.0f} images/s) needs "
                note += f"{needed:.1f} cores"
            report.add("data", label, rate, "images/s", note=note)


# ------------------------------------------------------------------------------------------------ 4. pretraining run


def section_pretrain(report: Report, device: torch.device, args, results: dict) -> bool:
    recipe = REPO_ROOT / "training" / "configs" / "demo_offline.yaml"
    output_dir = Path(args.work_dir) / "pretrain"
    common = [
        sys.executable,
        str(REPO_ROOT / "training" / "pretrain.py"),
        str(recipe),
        "--output_dir",
        str(output_dir),
    ]
    if args.cpu_mode:
        # 2 layers, 2 steps: the pipeline, not the model, is under test
        common += ["--cpu", "--mixed_precision", "no", "--num_workers", "0"]
        common += ["--config_overrides", "num_hidden_layers=2"]
        first, second, every = 2, 3, 1
    else:
        # the recipe's 2 workers: its 13 photographs give no full batch of 6 to each of more workers
        common += ["--mixed_precision", "bf16"]
        first, second, every = 20, 24, 10
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    ok = True
    for label, extra in (
        (
            f"train {first} steps, checkpoint every {every}",
            ["--max_steps", str(first), "--checkpointing_steps", str(every), "--overwrite_output_dir"],
        ),
        (
            f"resume to {second}, decode + crops + photometric ops on the device, export",
            [
                "--max_steps",
                str(second),
                "--resume_from_checkpoint",
                "latest",
                "--augmentation_device",
                "device_crops",
            ],
        ),
    ):
        start = time.perf_counter()
        run = subprocess.run(
            common + extra, env=env, capture_output=True, text=True, timeout=args.pretrain_timeout
        )
        seconds = time.perf_counter() - start
        passed = run.returncode == 0
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] if not passed else []
        report.add("pretrain", label, seconds, "s", "ok" if passed else "FAIL", "; ".join(tail)[:200])
        ok &= passed
        if not passed:
            results["pretrain_log"] = (run.stdout + run.stderr)[-4000:]
            return False
    events = [
        json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    resumed = [e for e in events if e.get("event") == "resumed"]
    last_step = max((e.get("step", 0) for e in events), default=0)
    resumed_ok = bool(resumed) and last_step == second
    report.add(
        "pretrain",
        "resumed from the checkpoint, reached the last step",
        last_step,
        "step",
        "ok" if resumed_ok else "FAIL",
    )
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(output_dir / "backbone").to(device).eval()
    size = backbone.config.image_size
    with torch.no_grad():
        hidden = backbone(torch.randn(1, 3, size, size, device=device)).last_hidden_state
    loaded_ok = bool(hidden.isfinite().all())
    report.add(
        "pretrain",
        "exported backbone loads (AutoModel) and runs",
        type(backbone).__name__,
        status="ok" if loaded_ok else "FAIL",
        note=f"last_hidden_state {tuple(hidden.shape)} on {device.type}",
    )
    return ok and resumed_ok and loaded_ok


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cpu", action="store_true", help="CPU mode (tiny sizes) even when CUDA is available"
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--output", default="device_check.json", help="where the JSON report goes")
    parser.add_argument(
        "--batch", type=int, default=None, help="per-device batch of the model section (64; CPU 2)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (10; CPU 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; CPU 1)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--data-workers", type=int, default=None, help="loader workers (default: all cores)")
    parser.add_argument("--pretrain-timeout", type=float, default=240.0, help="seconds per pretraining run")
    parser.add_argument(
        "--data-seconds",
        type=float,
        default=None,
        help="steady-state seconds timed per loader mode (8; CPU 2)",
    )
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds after which the remaining benchmarks are skipped (reported as such), to stay under 6 min",
    )
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "data_workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("warmup", "data_seconds"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < math.inf:  # also NaN
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    for name in ("budget", "pretrain_timeout"):  # 0 s would skip or fail every timed section
        value = getattr(args, name)
        if not 0 < value < math.inf:
            parser.error(f"--{name.replace('_', '-')} must be a finite number of seconds > 0, got {value}")
    import torch._dynamo

    if args.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        parser.error(
            f"--compile-backend {args.compile_backend!r} is not a torch.compile backend "
            "(torch._dynamo.list_backends() lists them)"
        )
    # the report is written at the end: a folder that cannot take it must fail now, not after the whole run
    output = Path(args.output)
    if output.is_dir():
        parser.error(f"--output {output} is a folder; give a file name, e.g. {output / 'device_check.json'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(
            f"--output {output}: cannot create its folder {output.parent} ({error.strerror or error})"
        )
    if not os.access(output.parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        parser.error(f"--output {output}: {output.parent} is not writable; give another --output")
    args.cpu_mode = args.cpu or not torch.cuda.is_available()
    args.steps = args.steps or (2 if args.cpu_mode else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu_mode else 3)
    args.data_seconds = (
        args.data_seconds if args.data_seconds is not None else (2.0 if args.cpu_mode else 8.0)
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.cpu_mode else "cuda")
    started = args.started = time.perf_counter()
    report = Report(
        mode="cpu" if args.cpu_mode else "gpu", device=str(device), environment=environment(device)
    )
    results: dict = {"environment": report.environment}
    print(f"device_check: {report.mode} mode on {report.environment['device_name']}", flush=True)
    print(
        "  " + ", ".join(f"{k} {v}" for k, v in report.environment.items() if k != "device_name"), flush=True
    )
    failed = False
    with tempfile.TemporaryDirectory() as scratch:
        args.work_dir = args.work_dir or scratch
        for section in args.sections:
            missing = missing_packages(section)
            if section != "correctness" and time.perf_counter() - started > args.budget:
                report.add(
                    section, "not run", None, "", "skipped", f"time budget of {args.budget:.0f} s spent"
                )
                continue
            if missing:
                pip = " ".join(PIP_NAMES.get(name, name) for name in missing)
                report.add(
                    section,
                    "not run",
                    None,
                    "",
                    "skipped",
                    f"missing {', '.join(missing)}: pip install {pip}",
                )
                continue
            try:
                if section == "correctness":
                    section_correctness(report, device, args)
                elif section == "model":
                    section_model(report, device, args, results)
                elif section == "data":
                    section_data(report, device, args, results)
                else:
                    section_pretrain(report, device, args, results)
            except Exception as error:  # one broken section must not hide the others' results
                report.add(
                    section, "raised", type(error).__name__, "", "FAIL", str(error).splitlines()[0][:200]
                )
                results.setdefault("tracebacks", {})[section] = traceback.format_exc()
    failed = any(row.status == "FAIL" for row in report.rows)
    skipped = {f"{row.section} ({row.note})" for row in report.rows if row.status == "skipped"}
    goals = verdicts(report, results, args)
    print("\ngoals (BENCHMARKS.md, GPU path):", flush=True)
    for goal in goals:
        value = "" if goal["value"] is None else f" {format_value(goal['value'])}"
        print(f"  [{goal['status']:>12}] {goal['goal']}:{value} {goal['detail']}", flush=True)
    elapsed = time.perf_counter() - started
    payload = {
        **asdict(report),
        "results": results,
        "verdicts": goals,
        "seconds": elapsed,
        "passed": not failed,
    }
    text = json.dumps(payload, indent=2, default=str)
    try:
        Path(args.output).write_text(text)
        where = args.output
    except OSError as error:  # e.g. the disk filled during the run: keep the results somewhere
        with tempfile.NamedTemporaryFile("w", prefix="device_check-", suffix=".json", delete=False) as file:
            file.write(text)
        where = file.name
        print(f"cannot write --output {args.output} ({error.strerror or error}); the report went to {where}")
    print(f"\n{'FAILED' if failed else 'passed'} in {elapsed:.0f} s; report in {where}", flush=True)
    if skipped:
        print(f"skipped: {'; '.join(sorted(skipped))}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
