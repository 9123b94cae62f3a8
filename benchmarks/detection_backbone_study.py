"""Box and mask AP of the same detection fine-tuning on different backbones, on the offline instance scenes.

For each backbone and head: `training/finetune_detection.py` with the offline recipe of the head
(`training/configs/detection_offline.yaml` for Deformable DETR boxes, `instance_segmentation_offline.yaml` for
Mask2Former instance masks), shortened to `--steps`, then the COCO AP its model card reports (measured through the
saved folder's own image processor and post-processing, as the pipelines run it). The question of the paper's COCO
table at toy scale: does the pretraining of the backbone show in the detector?

    python benchmarks/detection_backbone_study.py --steps 150 \\
        --backbone random=random:vit-tiny-patch16 \\
        --backbone dino=outputs/study/dino-seed0/backbone --backbone selfpatch=outputs/study/selfpatch-seed0/backbone

`random:PRESET` is a randomly initialised ViT (the recipe's seed). The scenes are synthetic compositions of real
photographs (not COCO). `--jobs 2` runs two fine-tunings side by side (one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "deformable-detr": REPO / "training" / "configs" / "detection_offline.yaml",
    "mask2former": REPO / "training" / "configs" / "instance_segmentation_offline.yaml",
}
STATISTICS = ("AP", "AP50", "AP75")


def finetune(name: str, backbone: str, head: str, args: argparse.Namespace) -> dict:
    output_dir = args.output_dir / f"{head}-{name}"
    steps = args.steps
    command = [
        sys.executable, str(REPO / "training" / "finetune_detection.py"), str(RECIPES[head]),
        "--backbone", backbone, "--max_steps", str(steps), "--warmup_steps", str(max(1, steps // 10)),
        "--lr_decay_steps", str(round(steps * 8 / 12)), str(round(steps * 11 / 12)),
        "--checkpointing_steps", "0", "--eval_steps", "0", "--logging_steps", "10", "--num_workers", "1",
        "--cpu_threads", "1", "--output_dir", str(output_dir), "--overwrite_output_dir",
    ]  # fmt: skip
    if args.max_eval:
        command += ["--max_eval_samples", str(args.max_eval)]
    if args.data_dir:
        command += ["--offline_data_dir", str(args.data_dir)]
    started = time.perf_counter()
    log = output_dir.parent / f"{head}-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        subprocess.run(
            command, check=True, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"}
        )
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    end = [record for record in records if record.get("event") == "end"][-1]
    losses = [record["loss"] for record in records if "loss" in record]
    row = {"backbone": name, "head": head, "steps": steps, "seconds": time.perf_counter() - started}
    row["first_loss"], row["last_loss"] = losses[0], losses[-1]
    for iou_type, values in (end["scores"] or {}).items():
        kind = "box" if iou_type == "bbox" else "mask"
        row.update({f"{kind} {statistic}": 100 * values[statistic] for statistic in STATISTICS})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", action="append", required=True, metavar="NAME=PATH_OR_random:PRESET")
    parser.add_argument("--heads", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per run (the recipes: 300)")
    parser.add_argument(
        "--max-eval", type=int, default=0, help="score the first N validation images (0: all 80)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="fine-tunings run side by side")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="offline data folder (default: the cache)"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/detection_backbone_study"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 12 or args.jobs < 1 or args.max_eval < 0:
        parser.error("--steps must be >= 12 (the schedule's drops), --jobs >= 1, --max-eval >= 0")
    backbones = []
    for entry in args.backbone:
        name, _, path = entry.partition("=")
        if not path:
            parser.error(f"--backbone takes NAME=PATH, got {entry!r}")
        backbones.append((name, path))
    runs = [(name, path, head) for head in args.heads for name, path in backbones]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda run: finetune(*run, args), runs))
    columns = ["head", "backbone", "steps", "seconds", "first_loss", "last_loss"]
    columns += [
        f"{kind} {s}" for kind in ("box", "mask") for s in STATISTICS if any(f"{kind} {s}" in r for r in rows)
    ]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
