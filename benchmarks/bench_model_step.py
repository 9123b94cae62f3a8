"""Training-step cost of SelfPatch vs plain DINO, and where the time goes.

Measures, in one run and interleaved so that machine noise hits every variant alike:
- a full optimiser step (forward, backward, AdamW, teacher EMA) of SelfPatch and of plain DINO
  (CLS representation, lambda 0: no teacher on local crops, no aggregation, no patch head), SDPA and eager;
- the backbone passes a DINO step contains (student forward+backward on every view, teacher forward on the
  globals), to show how much the DINO step adds on top of them;
- the pieces SelfPatch adds: teacher on the local crops, aggregation (image-level and neighbour path), patch heads;
- peak resident memory of each step variant (each in its own process);
- the same two steps with glibc's default allocator settings (in a separate process), with the minor page faults
  per step: the training script keeps freed host memory for reuse on the CPU (`selfpatch_hf.training.host_memory`), and so
  does this benchmark unless `--glibc_default_allocator` is given.

    python benchmarks/bench_model_step.py                       # ViT-S/16, batch 8, 2x224 + 8x96, fp32 CPU
    python benchmarks/bench_model_step.py --preset vit-tiny-patch16 --batch 4 --steps 3
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining
from selfpatch_hf.training.host_memory import keep_freed_host_memory


def build(args, variant: str, attn: str) -> SelfPatchForPretraining:
    overrides = {"image_representation": "cls", "patch_loss_weight": 0.0} if variant == "dino" else {}
    config = SelfPatchConfig.from_preset(args.preset, **overrides)
    config._attn_implementation = attn
    config.backbone_config._attn_implementation = attn
    torch.manual_seed(0)
    return SelfPatchForPretraining(config).train()


def inputs(args):
    torch.manual_seed(1)
    return (
        torch.randn(args.batch, 2, 3, args.global_size, args.global_size),
        torch.randn(args.batch, args.num_local, 3, args.local_size, args.local_size),
    )


def step_fn(model):
    optimizer = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-5)

    def step(global_crops, local_crops):
        loss = model(global_crops, local_crops, teacher_temperature=0.04).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_teacher(0.996)

    return step


def timed(fn, *fn_args) -> float:
    start = time.perf_counter()
    fn(*fn_args)
    return time.perf_counter() - start


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def component_fns(args, model: SelfPatchForPretraining):
    """Closures that run one piece of a SelfPatch step with the shapes of a real step."""
    global_crops, local_crops = inputs(args)
    globals_flat = global_crops.transpose(0, 1).flatten(0, 1)
    locals_flat = local_crops.transpose(0, 1).flatten(0, 1)
    student, teacher = model.student, model.teacher
    with torch.no_grad():
        f_global, n_global = teacher.encode(globals_flat)
        f_local, n_local = teacher.encode(locals_flat)
    grid_g = (args.global_size // 16, args.global_size // 16)
    grid_l = (args.local_size // 16, args.local_size // 16)

    def dino_backbones():  # what a plain DINO step must do in the backbone
        f1, _ = student.encode(globals_flat)
        f2, _ = student.encode(locals_flat)
        (f1.sum() + f2.sum()).backward()
        with torch.no_grad():
            teacher.encode(globals_flat)

    def teacher_locals():
        with torch.no_grad():
            teacher.encode(locals_flat)

    def aggregation():
        from selfpatch_hf import select_positive_neighbors

        a = student.aggregation(f_global.detach().requires_grad_())
        b = student.aggregation(f_local.detach().requires_grad_())
        (a.sum() + b.sum()).backward()
        with torch.no_grad():
            teacher.aggregation(f_global)
            teacher.aggregation(f_local)
            for feats, grid in ((f_global, grid_g), (f_local, grid_l)):
                idx = select_positive_neighbors(feats, grid, model.config.num_positives, 3)
                teacher.aggregation.aggregate_neighbors(feats, idx)

    def patch_heads():
        s1 = student.patch_head(n_global[:, 1:].detach().requires_grad_())
        s2 = student.patch_head(n_local[:, 1:].detach().requires_grad_())
        (s1.sum() + s2.sum()).backward()
        with torch.no_grad():
            teacher.patch_head(n_global[:, 1:])
            teacher.patch_head(n_local[:, 1:])

    return {
        "backbone passes of a DINO step": dino_backbones,
        "teacher on local crops": teacher_locals,
        "aggregation module (all uses)": aggregation,
        "patch heads (student fwd+bwd, teacher fwd)": patch_heads,
    }


def time_rounds(fns: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Calls every function once per round, in order (machine noise hits all alike): seconds and minor page faults."""
    times: dict[str, list[float]] = {}
    faults: dict[str, list[int]] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            before = minor_faults()
            times.setdefault(name, []).append(timed(fn))
            faults.setdefault(name, []).append(minor_faults() - before)
    return times, faults


def multiply_accumulates(step) -> float:
    """Multiply-accumulates of one full step (forward and backward; every matrix product and convolution).

    Give it an eager-attention step: its products are plain matmuls that `FlopCounterMode` sees."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 2


def peak_matmul_rate(size: int = 4096, repeats: int = 5) -> float:
    """Multiply-accumulates per second of a large square fp32 matrix product: what this machine can do at best."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    seconds = min(timed(torch.mm, a, b) for _ in range(repeats))
    return size**3 / seconds


def run_child(args, *child_args: str, glibc_defaults: bool = False) -> dict:
    """Runs this script in a fresh process with the same shapes (and glibc's default allocator settings if asked or
    if this run has them); returns the JSON of its last output line."""
    cmd = [sys.executable, __file__, *child_args, "--preset", args.preset, "--batch", str(args.batch)]
    cmd += ["--global_size", str(args.global_size), "--local_size", str(args.local_size)]
    cmd += ["--num_local", str(args.num_local), "--warmup", str(args.warmup)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if glibc_defaults or args.glibc_default_allocator:
        cmd.append("--glibc_default_allocator")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_memory(args, variant: str, glibc_defaults: bool = False) -> float:
    """Peak RSS (GiB) of a process that builds the model and runs two steps."""
    return run_child(args, "--_memory_child", variant, "--steps", "2", glibc_defaults=glibc_defaults)[
        "peak_gib"
    ]


def default_allocator_steps(args) -> dict[str, dict[str, float]]:
    """Both steps, interleaved, in a process with glibc's default allocator settings: median s and faults/step."""
    return run_child(args, "--_allocator_child", "--steps", str(args.steps), glibc_defaults=True)["steps"]


def interleaved_steps(args, variants: list[str]) -> dict[str, dict[str, float]]:
    batch = inputs(args)
    steps = {v: functools.partial(step_fn(build(args, v, "sdpa")), *batch) for v in variants}
    time_rounds(steps, args.warmup)
    times, faults = time_rounds(steps, args.steps)
    return {
        v: {"median_s": statistics.median(times[v]), "faults": statistics.median(faults[v])} for v in variants
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="vit-small-patch16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--num_local", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions of each variant")
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed rounds first: a process's heap takes a few steps to settle (page faults until then)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--glibc_default_allocator",
        action="store_true",
        help="do not keep freed host memory for reuse (what the training script does on the CPU)",
    )
    parser.add_argument("--_memory_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_allocator_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reusing = not args.glibc_default_allocator and keep_freed_host_memory()

    if args._allocator_child:
        print(json.dumps({"steps": interleaved_steps(args, ["selfpatch", "dino"])}))
        return

    if args._memory_child:
        model = build(args, args._memory_child, "sdpa")
        step = step_fn(model)
        for _ in range(args.steps):
            step(*inputs(args))
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
        status = dict(
            line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line
        )
        print(json.dumps({"peak_gib": int(status["VmHWM"].split()[0]) / 2**20}))
        return

    print(f"# {args.preset}, batch {args.batch}, 2x{args.global_size} + {args.num_local}x{args.local_size} crops, "
          f"fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"freed host memory {'kept for reuse' if reusing else 'returned (glibc defaults)'}")  # fmt: skip
    variants = {(v, a): build(args, v, a) for v in ("selfpatch", "dino") for a in ("sdpa", "eager")}
    batch = inputs(args)
    steps = {f"step {v} {a}": functools.partial(step_fn(model), *batch) for (v, a), model in variants.items()}
    components = component_fns(args, variants[("selfpatch", "sdpa")])
    time_rounds(steps, args.warmup)  # kernels, and the heap grows to the steps' pattern of blocks
    time_rounds(components, 1)
    times, faults = time_rounds(steps | components, args.steps)  # interleaved repetitions
    med = {name: statistics.median(values) for name, values in times.items()}

    print("\n| measurement | median s | min s |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {med[name]:.3f} | {min(values):.3f} |")
    selfpatch, dino = med["step selfpatch sdpa"], med["step dino sdpa"]
    backbone = med["backbone passes of a DINO step"]
    print("\n| ratio | value |\n|---|---|")
    print(f"| SelfPatch step / DINO step (sdpa) | {selfpatch / dino:.3f} |")
    print(
        f"| SelfPatch step / DINO step (eager) | {med['step selfpatch eager'] / med['step dino eager']:.3f} |"
    )
    print(f"| DINO step / its backbone passes | {dino / backbone:.3f} |")
    print(f"| eager / sdpa (SelfPatch step) | {med['step selfpatch eager'] / selfpatch:.3f} |")
    print(f"| eager / sdpa (DINO step) | {med['step dino eager'] / dino:.3f} |")
    macs = {
        variant: multiply_accumulates(steps[f"step {variant} eager"]) for variant in ("selfpatch", "dino")
    }
    print("\n| work per step (forward + backward) | GMAC |\n|---|---|")
    for variant, count in macs.items():
        print(f"| {variant} | {count / 1e9:.1f} |")
    work_ratio = macs["selfpatch"] / macs["dino"]
    print(f"| ratio SelfPatch / DINO | {work_ratio:.3f} |")
    print(f"| time ratio / work ratio (sdpa) | {selfpatch / dino / work_ratio:.3f} |")
    peak = peak_matmul_rate()
    print(
        f"\nPeak fp32 matrix product here: {peak / 1e9:.1f} GMAC/s; the steps ran at "
        f"{macs['selfpatch'] / selfpatch / 1e9:.1f} (SelfPatch) and {macs['dino'] / dino / 1e9:.1f} (DINO) GMAC/s."
    )
    print(f"Lower bound on the ratio: SelfPatch's work at peak rate / measured DINO step = "
          f"{macs['selfpatch'] / peak / dino:.3f}")  # fmt: skip
    extra = selfpatch - dino
    print("\nWhere SelfPatch's extra time goes (share of the SelfPatch - DINO difference):")
    for name in (
        "teacher on local crops",
        "aggregation module (all uses)",
        "patch heads (student fwd+bwd, teacher fwd)",
    ):
        print(f"- {name}: {med[name]:.3f} s ({100 * med[name] / extra:.0f}%)")
    print("\nMinor page faults per step (median):", {name: statistics.median(faults[name]) for name in steps})
    if os.environ.get("BENCH_SKIP_MEMORY") != "1":
        print(
            "\n| peak RSS, GiB (own process, sdpa) | this run's allocator | glibc defaults |\n|---|---|---|"
        )
        for variant in ("selfpatch", "dino"):
            print(
                f"| {variant} step | {peak_memory(args, variant):.2f} | {peak_memory(args, variant, glibc_defaults=True):.2f} |"
            )
    if reusing:
        glibc = default_allocator_steps(args)
        print("\nWith glibc's default allocator settings (own process, sdpa, interleaved):")
        print("\n| step | median s | minor faults / step | vs memory kept for reuse |\n|---|---|---|---|")
        for variant, reused in (("selfpatch", selfpatch), ("dino", dino)):
            row = glibc[variant]
            print(
                f"| {variant} | {row['median_s']:.3f} | {row['faults']:.0f} | {row['median_s'] / reused:.2f}x |"
            )
        print(
            f"| ratio SelfPatch / DINO | {glibc['selfpatch']['median_s'] / glibc['dino']['median_s']:.3f} | | |"
        )


if __name__ == "__main__":
    main()
