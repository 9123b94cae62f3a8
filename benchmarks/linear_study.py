"""Linear classification (DINO's protocol, `selfpatch eval linear`) beside k-NN top-1 on the offline scenes' labels.

Backbones: randomly initialised ViT-Ti/16 (192 wide, 12 layers, transformers' initialisation under each
`--random-init-seeds` seed) and any backbone folders (`--backbone NAME@SEED=PATH`, e.g. the teachers that
`benchmarks/selfpatch_vs_dino_study.py` pretrains). Data: the standard offline segmentation scenes (synthetic
compositions of real photographs, 240 training / 80 validation images of 224 x 224), classified by their object's
class (`label`). k-NN as `benchmarks/dense_study.py` runs it (k 20, 224-pixel views); the linear protocol with
the settings given here, by default DINO's (100 epochs, batch 128, SGD + cosine) with a learning-rate sweep, since
DINO's 0.001 per 256 images is set for ImageNet's 10k steps per epoch, not 2.

    python benchmarks/linear_study.py --random-init-seeds 0 1 --no-augmentation --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def random_vit_tiny(seed: int):
    from transformers import ViTConfig, ViTModel

    from selfpatch_hf.evaluation.features import FrozenBackbone

    config = ViTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, patch_size=16
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    return FrozenBackbone(model)


def evaluate(backbone, train, evaluation, config) -> dict:
    from selfpatch_hf.evaluation.knn import KnnConfig, run_knn
    from selfpatch_hf.evaluation.linear_classification import run_linear_classification

    start = time.perf_counter()
    knn = run_knn(backbone, train, evaluation, KnnConfig(k=20, resize=224, crop=224), label_column="label")
    knn_s = time.perf_counter() - start
    start = time.perf_counter()
    linear = run_linear_classification(backbone, train, evaluation, config, label_column="label").result
    return {
        "knn_top1": knn.top1,
        "linear": linear.to_dict(),
        "knn_s": knn_s,
        "linear_s": time.perf_counter() - start,
    }


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    from selfpatch_hf.evaluation.cli.config_options import add_config_options, config_from_args
    from selfpatch_hf.evaluation.configs import LinearClassificationConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", action="append", default=[], metavar="NAME@SEED=PATH")
    parser.add_argument("--random-init-seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument(
        "--data-dir", type=Path, help="offline scenes (default: the standard ones, built once)"
    )
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    add_config_options(parser, LinearClassificationConfig)
    parser.set_defaults(lr_sweep="0.001,0.01,0.1,1,10")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(LinearClassificationConfig, args)

    import datasets

    from selfpatch_hf.data.samples.synthetic_scenes import default_offline_data_dir, make_offline_data
    from selfpatch_hf.evaluation.features import FrozenBackbone

    data_dir = args.data_dir or default_offline_data_dir()
    if not (data_dir / "segmentation").is_dir():
        make_offline_data(data_dir)
    scenes = datasets.load_dataset(str(data_dir / "segmentation"))
    train, evaluation = scenes["train"], scenes["validation"]

    runs = [
        ("random-init", str(seed), lambda seed=seed: random_vit_tiny(seed)) for seed in args.random_init_seeds
    ]
    for text in args.backbone:
        label, path = text.split("=", 1)
        name, _, seed = label.partition("@")
        runs.append((name, seed, lambda path=path: FrozenBackbone.from_pretrained(path)))
    rows = []
    for name, seed, load in runs:
        print(f"evaluating {name}@{seed} ...", file=sys.stderr)
        row = {"name": name, "seed": seed, **evaluate(load(), train, evaluation, config)}
        print(f"  k-NN {row['knn_s']:.0f} s, linear {row['linear_s']:.0f} s", file=sys.stderr)
        rows.append(row)

    print(f"Settings: {json.dumps(vars(config))}\n")
    print("| backbone | seed | k-NN top-1 | linear top-1 | linear top-5 | rate | exportable top-1 | rate |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        linear, exportable = row["linear"], row["linear"]["exportable"] or {}
        print(
            f"| {row['name']} | {row['seed']} | {row['knn_top1']:.1f} | {linear['top1']:.1f} | {linear['top5']:.1f} "
            f"| {linear['learning_rate']:g} | {exportable.get('top1', float('nan')):.1f} | "
            f"{exportable.get('learning_rate', float('nan')):g} |"
        )
    names = list(dict.fromkeys(row["name"] for row in rows))
    print("\n| backbone | runs | k-NN top-1 | linear top-1 | exportable top-1 |\n|---|---|---|---|---|")
    for name in names:
        group = [row for row in rows if row["name"] == name]
        exportable = [row["linear"]["exportable"]["top1"] for row in group if row["linear"]["exportable"]]
        print(
            f"| {name} | {len(group)} | {_spread([row['knn_top1'] for row in group])} | "
            f"{_spread([row['linear']['top1'] for row in group])} | {_spread(exportable) if exportable else '-'} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(config), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
