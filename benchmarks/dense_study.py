"""Dense-feature quality of frozen backbones on offline data: label propagation (J&F) and a linear probe.

Evaluates each backbone folder (anything `AutoModel` loads) on the offline evaluation data of
`selfpatch_hf.data.samples.synthetic_scenes` -- SYNTHETIC COMPOSITIONS OF REAL PHOTOGRAPHS (real object cut-outs
with known masks moving over real background photographs; not DAVIS, not ADE20K) -- and prints markdown
tables: one row per backbone, then mean +- std per name over seeds, then the difference between the first
two names (paired over common seeds when seeds are given).

    python benchmarks/dense_study.py \\
        --backbone selfpatch@0=runs/selfpatch-s0/backbone --backbone dino@0=runs/dino-s0/backbone \\
        --backbone selfpatch@1=runs/selfpatch-s1/backbone --backbone dino@1=runs/dino-s1/backbone

The data are built under --data-dir on first use (about 20 s). Propagation follows the DAVIS protocol of
docs/method.md section 12 with the short side scaled to the 240-pixel frames (--short-side 240).
`evaluate_backbone` is importable for scripts that pretrain first and evaluate afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from selfpatch_hf.data.samples.synthetic_scenes import DATA_NOTE, SEGMENTATION_CLASSES, make_offline_data
from selfpatch_hf.evaluation.davis import evaluate_davis, predict_davis
from selfpatch_hf.evaluation.features import FrozenBackbone
from selfpatch_hf.evaluation.knn import KnnConfig, run_knn
from selfpatch_hf.evaluation.linear_probe import LinearProbeConfig, run_linear_probe
from selfpatch_hf.evaluation.propagation import PropagationConfig
from selfpatch_hf.evaluation.semseg_metrics import SegmentationScores

METRICS = (
    ("jf", "J&F"),
    ("j", "J"),
    ("f", "F"),
    ("miou", "mIoU"),
    ("macc", "mAcc"),
    ("aacc", "aAcc"),
    ("knn", "k-NN top-1"),
)


@dataclass
class StudySettings:
    short_side: int = 240
    size_multiple: int = 64
    n_last_frames: int = 7
    topk: int = 5
    temperature: float = 0.1
    neighborhood: int = 12
    probe_image_size: int = 224
    probe_epochs: int = 20
    probe_lr: float = 1e-3
    probe_seed: int = 0
    knn_k: int = 20
    knn: bool = True


def ensure_offline_data(data_dir: Path, seed: int = 0) -> dict:
    """Build the offline data under `data_dir` unless it is already there; returns its description."""
    info_path = data_dir / "offline_data.json"
    if not info_path.is_file():
        print(f"building offline data in {data_dir} ...", file=sys.stderr)
        make_offline_data(data_dir, seed=seed)
    return json.loads(info_path.read_text())


def probe_segmentation(backbone: FrozenBackbone, segmentation, settings: StudySettings) -> SegmentationScores:
    """The study's linear segmentation probe: trained on the offline scenes' train split, scored on validation."""
    return run_linear_probe(
        backbone,
        segmentation["train"],
        segmentation["validation"],
        LinearProbeConfig(
            image_size=settings.probe_image_size,
            epochs=settings.probe_epochs,
            learning_rate=settings.probe_lr,
            num_labels=len(SEGMENTATION_CLASSES),
            seed=settings.probe_seed,
        ),
        image_column="image",
        mask_column="mask",
    ).scores


def evaluate_backbone(path: str, data_dir: Path, settings: StudySettings, work_dir: Path) -> dict:
    """All dense metrics of one backbone (percentages) plus timings in seconds."""
    import datasets

    torch.manual_seed(0)
    backbone = FrozenBackbone.from_pretrained(path)
    row: dict = {"path": path}

    start = time.perf_counter()
    config = PropagationConfig(
        short_side=settings.short_side,
        size_multiple=settings.size_multiple,
        n_last_frames=settings.n_last_frames,
        topk=settings.topk,
        temperature=settings.temperature,
        neighborhood=settings.neighborhood,
    )
    predict_davis(data_dir / "davis", backbone, work_dir, config)
    davis = evaluate_davis(data_dir / "davis", work_dir)
    row.update(jf=100 * davis.jf_mean, j=100 * davis.j_mean, f=100 * davis.f_mean)
    row["propagation_s"] = time.perf_counter() - start

    start = time.perf_counter()
    segmentation = datasets.load_dataset(str(data_dir / "segmentation"))
    scores = probe_segmentation(backbone, segmentation, settings)
    row.update(
        miou=100 * scores.mean_iou, macc=100 * scores.mean_accuracy, aacc=100 * scores.overall_accuracy
    )
    row["probe_s"] = time.perf_counter() - start

    if settings.knn:
        start = time.perf_counter()
        size = settings.probe_image_size
        knn = run_knn(
            backbone,
            segmentation["train"],
            segmentation["validation"],
            KnnConfig(k=settings.knn_k, resize=size, crop=size),
            label_column="label",
        )
        row["knn"] = knn.top1
        row["knn_s"] = time.perf_counter() - start
    return row


def _parse_backbone(text: str) -> tuple[str, str | None, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME[@SEED]=PATH, got {text!r}")
    label, path = text.split("=", 1)
    name, _, seed = label.partition("@")
    return name, seed or None, path


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown_tables(rows: list[dict]) -> str:
    """Per-run table, per-name mean ± std table, and the first-two-names difference."""
    metrics = [(key, title) for key, title in METRICS if any(key in row for row in rows)]
    header = "| " + " | ".join(title for _, title in metrics) + " |"
    rule = "|---" * (len(metrics) + 2) + "|"
    lines = [f"| backbone | seed {header}", rule]
    for row in rows:
        cells = " | ".join(f"{row[key]:.1f}" if key in row else "-" for key, _ in metrics)
        lines.append(f"| {row['name']} | {row['seed'] or '-'} | {cells} |")

    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["name"]].append(row)
    lines += ["", f"| backbone | runs {header}", rule]
    for name, members in groups.items():
        cells = " | ".join(_fmt([m[key] for m in members if key in m]) for key, _ in metrics)
        lines.append(f"| {name} | {len(members)} | {cells} |")

    if len(groups) >= 2:
        first, second = list(groups)[:2]
        a_by_seed = {m["seed"]: m for m in groups[first] if m["seed"] is not None}
        b_by_seed = {m["seed"]: m for m in groups[second] if m["seed"] is not None}
        common = sorted(set(a_by_seed) & set(b_by_seed))
        cells = []
        for key, _ in metrics:
            if common:  # paired over seeds: same data order, same initialisation, only the method differs
                diffs = [a_by_seed[s][key] - b_by_seed[s][key] for s in common if key in a_by_seed[s]]
                cells.append(_fmt(diffs) if len(diffs) != 1 else f"{diffs[0]:+.1f}")
            else:
                a = [m[key] for m in groups[first] if key in m]
                b = [m[key] for m in groups[second] if key in m]
                if not a or not b:
                    cells.append("-")
                    continue
                diff = statistics.mean(a) - statistics.mean(b)
                if len(a) > 1 and len(b) > 1:
                    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
                    cells.append(f"{diff:+.1f} (se {se:.1f})")
                else:
                    cells.append(f"{diff:+.1f}")
        kind = f"paired over seeds {', '.join(common)}" if common else "difference of means"
        lines += ["", f"| {first} - {second} ({kind}) {header}", "|---" * (len(metrics) + 1) + "|"]
        lines.append("| | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbone",
        action="append",
        required=True,
        type=_parse_backbone,
        metavar="NAME[@SEED]=PATH",
        help="backbone folder; repeat (at least two to compare)",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("outputs/offline_eval_data"))
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/dense_study_predictions"))
    parser.add_argument("--data-seed", type=int, default=0)
    defaults = StudySettings()
    for field, value in asdict(defaults).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = StudySettings(**{field: getattr(args, field) for field in asdict(defaults)})
    info = ensure_offline_data(args.data_dir, args.data_seed)
    rows = []
    for index, (name, seed, path) in enumerate(args.backbone):
        print(f"evaluating {name}{'@' + seed if seed else ''} ({path}) ...", file=sys.stderr)
        row = evaluate_backbone(path, args.data_dir, settings, args.work_dir / f"{index:02d}-{name}")
        rows.append({"name": name, "seed": seed, **row})
        timings = ", ".join(f"{k[:-2]} {row[k]:.0f} s" for k in row if k.endswith("_s"))
        print(f"  {timings}", file=sys.stderr)

    print(f"Data: {DATA_NOTE}")
    print(
        f"{len(info['sequences'])} sequences x {info['arguments']['num_frames']} frames "
        f"({info['arguments']['frame_size'][0]}x{info['arguments']['frame_size'][1]}), "
        f"{info['arguments']['num_train']} / {info['arguments']['num_eval']} segmentation images "
        f"({len(SEGMENTATION_CLASSES)} classes); data seed {info['arguments']['seed']}.\n"
    )
    print(f"Settings: {json.dumps(asdict(settings))}\n")
    print(markdown_tables(rows))
    if args.json:
        args.json.write_text(json.dumps({"settings": asdict(settings), "data": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
