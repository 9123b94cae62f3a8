"""Step time of MoBY and MoBY + SelfPatch on ViT-S/16 and Swin-T, and the cost of the patch objective.

One full optimiser step per variant (online forward + backward on both views, target momentum update, target
forward, loss, queue update, AdamW), interleaved across variants so that machine noise hits every variant alike;
fp32 on the CPU.

    python benchmarks/bench_moby_swin.py                     # batch 4, two 224 px views, 3 timed rounds
    python benchmarks/bench_moby_swin.py --batch 8 --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining

PRESETS = {"ViT-S/16": "vit-small-patch16", "Swin-T": "swin-tiny-patch4-window7"}


def build(preset: str, selfpatch: bool) -> tuple[SelfPatchForPretraining, torch.optim.Optimizer]:
    overrides = {"image_objective": "moby"}
    if not selfpatch:
        overrides |= {
            "patch_loss_weight": 0.0,
            "image_representation": "cls" if "vit" in preset else "average_pool",
        }
    torch.manual_seed(0)
    model = SelfPatchForPretraining(SelfPatchConfig.from_preset(preset, **overrides)).train()
    optimizer = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer


def step(model: SelfPatchForPretraining, optimizer: torch.optim.Optimizer, views: torch.Tensor) -> None:
    loss = model(views, None, teacher_momentum=0.99).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {
        (name, selfpatch): build(preset, selfpatch)
        for name, preset in PRESETS.items()
        for selfpatch in (False, True)
    }
    torch.manual_seed(1)
    views = torch.randn(args.batch, 2, 3, args.size, args.size)
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in variants}
    for round_index in range(args.warmup + args.steps):
        for key, (model, optimizer) in variants.items():
            start = time.perf_counter()
            step(model, optimizer, views)
            seconds = time.perf_counter() - start
            if round_index >= args.warmup:
                times[key].append(seconds)
            print(
                f"round {round_index}: {key[0]} {'MoBY + SelfPatch' if key[1] else 'MoBY'} {seconds:.2f} s",
                file=sys.stderr,
            )
    print(
        f"# MoBY steps, batch {args.batch} x 2 views of {args.size} px, fp32, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}\n"
    )
    print("| backbone | MoBY s/step (median) | MoBY + SelfPatch s/step | ratio |\n|---|---|---|---|")
    for name in PRESETS:
        plain, selfpatch = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
        print(f"| {name} | {plain:.2f} | {selfpatch:.2f} | {selfpatch / plain:.2f} |")


if __name__ == "__main__":
    main()
