"""Throughput of training/pretrain.py's loop against the bare model step: what data loading and logging cost.

Two measurements, each in a fresh process, interleaved over `--rounds` so that machine noise hits both alike:

- bare: the loop's `train_step` (selfpatch_hf.training.loop: forward, backward, per-tensor clipping, AdamW, teacher
  EMA, the per-step all-reduce of the losses) on fixed random batches already in memory, set up for the CPU as the
  loop is (selfpatch_hf.training.runtime: torch threads with one core left per data worker; freed host memory kept
  for reuse), and, for reference, with every core;
- loop: `training/pretrain.py` itself, streaming real photographs (the offline sample photographs, repeated, as 2
  parquet shards) with `--num_workers` data workers, progress bar, metrics logged to metrics.jsonl every step.

Images/s of both come from wall-clock time over the same number of steps after a warm-up (the loop's from the
timestamps of its per-step metrics records, so its final checkpoint and export are left out). The overhead is
`1 - loop / bare`.

    python benchmarks/bench_training_loop.py                                   # the demo recipe's model, ~3 min
    python benchmarks/bench_training_loop.py --preset vit-small-patch16 --config_overrides "" --crops "" --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_OVERRIDES = "image_out_dim=4096 patch_out_dim=1024 head_hidden_dim=512 head_bottleneck_dim=128"
DEMO_CROPS = "--global_crop_size 96 --local_crop_size 48 --num_local_crops 4"


def build_data(output_dir: Path, repeats: int) -> Path:
    """The offline sample photographs, each listed `repeats` times, as 2 parquet shards."""
    from datasets import concatenate_datasets, load_dataset

    from selfpatch_hf.data.samples.photographs import sample_dataset_path

    photos = load_dataset("parquet", data_files=str(sample_dataset_path() / "*.parquet"), split="train")
    repeated = concatenate_datasets([photos] * repeats)
    for index in range(2):
        shard = repeated.shard(num_shards=2, index=index, contiguous=True)
        shard.to_parquet(str(output_dir / f"train-{index:05d}-of-00002.parquet"))
    return output_dir


def script_arguments(args, data_dir: Path, output_dir: Path) -> list[str]:
    overrides = args.config_overrides.split()
    return [
        "--preset", args.preset,
        *args.crops.split(),
        *(["--config_overrides", *overrides] if overrides else []),
        "--dataset_name", str(data_dir),
        "--samples_per_epoch", "1000000",
        "--per_device_train_batch_size", str(args.batch),
        "--num_workers", str(args.num_workers),
        "--max_steps", str(args.warmup + args.steps),
        "--warmup_epochs", "0",
        "--logging_steps", "1",
        "--checkpointing_steps", "0",
        "--output_dir", str(output_dir),
        "--overwrite_output_dir",
    ]  # fmt: skip


def run_bare(args, data_dir: Path) -> dict:
    """Child process: the loop's train_step on fixed in-memory batches."""
    import torch
    from accelerate import Accelerator

    from selfpatch_hf import SelfPatchForPretraining
    from selfpatch_hf.training.arguments.pretraining import build_config, parse_pretraining_arguments
    from selfpatch_hf.training.loop import train_step
    from selfpatch_hf.training.optimization import apply_schedule, build_optimizer
    from selfpatch_hf.training.runtime import configure_host
    from selfpatch_hf.training.schedules import PretrainingSchedule

    with tempfile.TemporaryDirectory() as scratch:
        model_args, data_args, training_args, overrides = parse_pretraining_arguments(
            script_arguments(args, data_dir, Path(scratch))
        )
    # the model, crops, clipping and schedules as in the loop (the objective's defaults for what is unset)
    config, crops = build_config(model_args, data_args, training_args, overrides)
    accelerator = Accelerator(cpu=True)
    # torch threads and host-memory reuse as the loop has them
    configure_host(accelerator, training_args, data_args.num_workers)
    if args.all_threads:
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = SelfPatchForPretraining(config)
    optimizer = build_optimizer(model.student)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    schedule = PretrainingSchedule.from_epochs(
        steps_per_epoch=1000, total_steps=10_000, base_learning_rate=5e-4, global_batch_size=args.batch
    )
    (height, width), (local_height, local_width) = (  # the loop's crops, as tensors
        (size, size) if isinstance(size, int) else size
        for size in (crops.global_crop_size, crops.local_crop_size)
    )
    batch = (
        torch.randn(args.batch, 2, 3, height, width),
        torch.randn(args.batch, crops.num_local_crops, 3, local_height, local_width),
    )
    times = []
    for step in range(args.warmup + args.steps):
        values = schedule.at(step)
        started = time.perf_counter()
        apply_schedule(optimizer, values)
        train_step(accelerator, model, optimizer, [batch], values, training_args.clip_grad)
        times.append(time.perf_counter() - started)
    measured = sum(times[args.warmup :])
    return {"images_per_second": args.batch * args.steps / measured, "threads": torch.get_num_threads()}


def run_loop(args, data_dir: Path, output_dir: Path) -> dict:
    command = [
        sys.executable,
        str(REPO / "training" / "pretrain.py"),
        *script_arguments(args, data_dir, output_dir),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from selfpatch_hf.training.metrics_log import last_metrics_per_step, read_metrics

    metrics = last_metrics_per_step(read_metrics(output_dir / "metrics.jsonl"))
    start, end = metrics[args.warmup], metrics[args.warmup + args.steps]
    return {"images_per_second": args.batch * args.steps / (end["time"] - start["time"])}


def child(args) -> None:
    result = run_bare(args, Path(args.data_dir))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="vit-tiny-patch16")
    parser.add_argument("--config_overrides", default=DEMO_OVERRIDES, help="space-separated key=value")
    parser.add_argument("--crops", default=DEMO_CROPS, help="the crop options of training/pretrain.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=40, help="times each sample photograph is listed")
    parser.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--all-threads", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data_dir = build_data(scratch / "data", args.repeats)
        bare, loop, bare_all = [], [], []

        def bare_step(*extra: str) -> dict:
            command = [
                sys.executable,
                __file__,
                "--bare-child",
                "--data-dir",
                str(data_dir),
                *extra,
                *sys.argv[1:],
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            return json.loads(output.split("RESULT ", 1)[1])

        for round_index in range(args.rounds):
            limited = bare_step()
            bare.append(limited["images_per_second"])
            loop.append(run_loop(args, data_dir, scratch / f"run{round_index}")["images_per_second"])
            every_core = bare_step("--all-threads")
            bare_all.append(every_core["images_per_second"])
            print(
                f"round {round_index + 1}: bare {bare[-1]:.2f} img/s ({limited['threads']} thread(s)), "
                f"loop {loop[-1]:.2f} img/s, bare with all cores {bare_all[-1]:.2f} img/s "
                f"({every_core['threads']} threads)",
                flush=True,
            )
    bare_median, loop_median = statistics.median(bare), statistics.median(loop)
    print(
        f"\n{args.preset} [{args.config_overrides}] [{args.crops}] batch {args.batch}, {args.num_workers} data workers, "
        f"{args.steps} steps after {args.warmup}, {args.rounds} rounds (median):\n"
        f"  bare train_step : {bare_median:.2f} img/s\n"
        f"  training loop   : {loop_median:.2f} img/s\n"
        f"  loop / bare     : {loop_median / bare_median:.3f}  (overhead {100 * (1 - loop_median / bare_median):.1f}%)\n"
        f"  bare train_step with every core for torch (no data workers to share with): "
        f"{statistics.median(bare_all):.2f} img/s"
    )


if __name__ == "__main__":
    main()
