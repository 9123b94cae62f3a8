"""Small-scale SelfPatch-vs-DINO study, offline, on a 2-core CPU in under an hour.

For each seed, pretrains the same tiny ViT twice with `training/pretrain.py` -- SelfPatch (aggregation
representation, lambda 0.1) and plain DINO (CLS representation, lambda 0) -- with identical data, steps, seed,
optimiser and everything else, then evaluates both frozen teacher backbones with `benchmarks/dense_study.py`
(label propagation J&F on offline sequences, linear-probe mIoU, k-NN) and prints the tables.

Pretraining data: the 13 offline sample photographs (`selfpatch_hf.data.samples.photographs`, real photographs shipped in the
scikit-image wheel), each listed `--repeats` times per pass so that a pass is long enough for the loader's
workers; the multi-crop augmentation makes every visit different. Evaluation data: synthetic compositions of
real photographs with known masks (`selfpatch_hf.data.samples.synthetic_scenes`). Both come from the same small photo
collection, so this measures how the two objectives shape dense features on identical inputs, not transfer.

    python benchmarks/selfpatch_vs_dino_study.py --seeds 0 1 2 --max_steps 400   # ~54 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# Everything but the objective is shared by both methods.
COMMON_CROPS = ["--global_crop_size", "96", "--local_crop_size", "48", "--num_local_crops", "4"]
COMMON_OVERRIDES = [
    "image_out_dim=4096",
    "patch_out_dim=1024",
    "head_hidden_dim=512",
    "head_bottleneck_dim=128",
]
METHODS = {
    "selfpatch": ["image_representation=aggregation", "patch_loss_weight=0.1"],
    "dino": ["image_representation=cls", "patch_loss_weight=0"],
}


def build_pretraining_data(output_dir: Path, repeats: int) -> Path:
    """The offline sample photographs, each listed `repeats` times, as 2 parquet shards with an Image column."""
    from datasets import concatenate_datasets, load_dataset

    from selfpatch_hf.data.samples.photographs import sample_dataset_path

    marker = output_dir / f".complete-{repeats}"
    if marker.exists():
        return output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    photos = load_dataset("parquet", data_files=str(sample_dataset_path() / "*.parquet"), split="train")
    repeated = concatenate_datasets([photos] * repeats)
    for index in range(2):
        shard = repeated.shard(num_shards=2, index=index, contiguous=True)
        shard.to_parquet(str(output_dir / f"train-{index:05d}-of-00002.parquet"))
    marker.write_text("done\n")
    return output_dir


def pretrain(method: str, seed: int, args, data_dir: Path) -> Path:
    output_dir = args.output_dir / f"{method}-seed{seed}"
    if (output_dir / "backbone" / "model.safetensors").exists() and not args.retrain:
        print(f"[study] reusing {output_dir / 'backbone'}")
        return output_dir / "backbone"
    command = [
        sys.executable, str(REPO / "training" / "pretrain.py"),
        "--preset", args.preset, *COMMON_CROPS,
        "--config_overrides", *COMMON_OVERRIDES, *METHODS[method],
        "--dataset_name", str(data_dir),
        "--samples_per_epoch", str(args.samples_per_epoch),
        "--per_device_train_batch_size", str(args.batch_size),
        "--num_workers", "2",
        "--max_steps", str(args.max_steps),
        "--warmup_epochs", str(args.warmup_epochs),
        "--learning_rate", str(args.learning_rate),
        "--teacher_temperature", "0.04",
        "--warmup_teacher_temperature", "0.04",
        "--seed", str(seed),
        "--logging_steps", "50",
        "--checkpointing_steps", str(args.max_steps),
        "--checkpoints_total_limit", "1",
        "--report_to", "none",
        "--output_dir", str(output_dir),
        "--overwrite_output_dir",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    print(f"[study] {method} seed {seed}: {time.perf_counter() - start:.0f} s")
    return output_dir / "backbone"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="vit-tiny-patch16")
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--learning_rate", type=float, default=5e-3, help="per 256 images (linear scaling rule)"
    )
    parser.add_argument("--warmup_epochs", type=float, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="times each photograph is listed per pass")
    parser.add_argument(
        "--samples_per_epoch",
        type=int,
        default=280,
        help="images per 'epoch' of the schedules (warm-up); streams have no length, so it need not equal a pass",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/study"))
    parser.add_argument("--retrain", action="store_true", help="pretrain again even if a backbone exists")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    data_dir = build_pretraining_data(args.output_dir / "pretraining_data", args.repeats)
    backbones = []
    for seed in args.seeds:
        for method in METHODS:
            backbones += ["--backbone", f"{method}@{seed}={pretrain(method, seed, args, data_dir)}"]

    import dense_study

    extra = ["--json", str(args.json)] if args.json else []
    return dense_study.main([*backbones, "--work-dir", str(args.output_dir / "predictions"), *extra])


if __name__ == "__main__":
    sys.exit(main())
