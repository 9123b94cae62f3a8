"""Fine-tuned segmentation vs the frozen linear probe, for the same backbones, on the offline synthetic scenes.

For each backbone: `training/finetune_segmentation.py` with one recipe (default: the offline recipe, UperNet on the
backbone's blocks, all weights trained) and the linear probe of `benchmarks/dense_study.py` (frozen last-layer patch
features), both scored with mIoU / mAcc / aAcc on the same validation images. The question: does fine-tuning
separate backbones that the probe cannot tell apart?

    python benchmarks/finetune_study.py --random-init --pretrain-steps 100 --finetune-steps 200
    python benchmarks/finetune_study.py --backbone dino=outputs/study/dino-seed0/backbone \\
        --backbone selfpatch=outputs/study/selfpatch-seed0/backbone

`--random-init` adds a randomly initialised ViT-Ti/16 (transformers' initialisation, seed 0); `--pretrain-steps N`
pretrains the study's SelfPatch and DINO ViT-Ti/16 (`benchmarks/selfpatch_vs_dino_study.py` settings, seed 0) for
N steps first, reusing them when they exist. The data are synthetic compositions of real photographs (not ADE20K).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
RECIPE = REPO / "training" / "configs" / "segmentation_offline.yaml"


def random_backbone(folder: Path, preset: str, seed: int, image_size: int) -> Path:
    """A randomly initialised ViT saved as a folder (so that probe and fine-tuning see the same weights)."""
    if (folder / "model.safetensors").exists():
        return folder
    from transformers import ViTConfig, ViTModel, set_seed

    from selfpatch_hf.export.backbone import build_image_processor
    from selfpatch_hf.models.selfpatch.configuration import BACKBONE_PRESETS

    set_seed(seed)
    model = ViTModel(
        ViTConfig(**{**BACKBONE_PRESETS[preset], "image_size": image_size}), add_pooling_layer=False
    )
    model.save_pretrained(folder)
    build_image_processor(image_size).save_pretrained(folder)
    return folder


def study_backbones(steps: int, output_dir: Path) -> list[tuple[str, Path]]:
    """The SelfPatch-vs-DINO study's two ViT-Ti/16 (seed 0), pretrained for `steps` steps."""
    import selfpatch_vs_dino_study as study

    args = argparse.Namespace(
        output_dir=output_dir,
        retrain=False,
        preset="vit-tiny-patch16",
        samples_per_epoch=280,
        batch_size=16,
        max_steps=steps,
        warmup_epochs=3,
        learning_rate=5e-3,
    )
    data_dir = study.build_pretraining_data(output_dir / "pretraining_data", 20)
    return [(method, study.pretrain(method, 0, args, data_dir)) for method in study.METHODS]


def finetune(name: str, backbone: Path, args) -> dict:
    output_dir = args.output_dir / f"finetune-{name}"
    command = [
        sys.executable, str(REPO / "training" / "finetune_segmentation.py"), str(args.recipe),
        "--backbone", str(backbone), "--offline_data_dir", str(args.data_dir),
        "--max_steps", str(args.finetune_steps), "--warmup_steps", str(max(1, args.finetune_steps // 10)),
        "--eval_steps", "0", "--checkpointing_steps", "0", "--logging_steps", "10",
        "--output_dir", str(output_dir), "--overwrite_output_dir",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    end = [record for record in records if record.get("event") == "end"][-1]
    losses = [record["loss"] for record in records if "loss" in record]
    return {
        "ft_miou": 100 * end["scores"]["mean_iou"],
        "ft_macc": 100 * end["scores"]["mean_accuracy"],
        "ft_aacc": 100 * end["scores"]["overall_accuracy"],
        "ft_first_loss": losses[0],
        "ft_last_loss": losses[-1],
        "finetune_s": time.perf_counter() - start,
    }


def probe(backbone: Path, args) -> dict:
    import datasets
    import torch
    from dense_study import StudySettings, probe_segmentation

    from selfpatch_hf.evaluation.features import FrozenBackbone

    torch.manual_seed(0)
    start = time.perf_counter()
    segmentation = datasets.load_dataset(str(args.data_dir / "segmentation"))
    scores = probe_segmentation(FrozenBackbone.from_pretrained(str(backbone)), segmentation, StudySettings())
    return {
        "probe_miou": 100 * scores.mean_iou,
        "probe_macc": 100 * scores.mean_accuracy,
        "probe_aacc": 100 * scores.overall_accuracy,
        "probe_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--random-init", action="store_true", help="add a random-init ViT-Ti/16 (seed 0)")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="pretrain the study's DINO / SelfPatch")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--data-dir", type=Path, default=Path("outputs/offline_eval_data"))
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/finetune_study"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the probe")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from selfpatch_hf.data.segmentation.loading import offline_scenes_path

    offline_scenes_path(
        args.data_dir
    )  # the probe's and the fine-tuning's validation images are the same files
    backbones: list[tuple[str, Path]] = []
    if args.random_init:
        backbones.append(
            ("random-init", random_backbone(args.output_dir / "random-init", "vit-tiny-patch16", 0, 224))
        )
    if args.pretrain_steps:
        backbones += study_backbones(args.pretrain_steps, args.output_dir / "study")
    for text in args.backbone:
        name, _, path = text.partition("=")
        backbones.append((name, Path(path)))
    if not backbones:
        parser.error("give --backbone NAME=PATH, --random-init or --pretrain-steps")

    rows = []
    for name, path in backbones:
        print(f"[finetune-study] {name}: {path}", file=sys.stderr)
        row = {"name": name, "path": str(path), **probe(path, args), **finetune(name, path, args)}
        print(f"[finetune-study] {json.dumps(row)}", file=sys.stderr)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))

    print(
        "| backbone | probe mIoU | probe mAcc | probe aAcc | fine-tuned mIoU | fine-tuned mAcc | fine-tuned aAcc |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['name']} | {row['probe_miou']:.1f} | {row['probe_macc']:.1f} | {row['probe_aacc']:.1f} | "
            f"{row['ft_miou']:.1f} | {row['ft_macc']:.1f} | {row['ft_aacc']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
