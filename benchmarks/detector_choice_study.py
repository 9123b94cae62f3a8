"""Which DETR-family detector learns fastest from fresh heads on the strides 4-32 backbone, within a CPU budget.

Every candidate takes the same `BeitBackbone(add_fpn=True)` (one randomly initialised ViT, copied into each), the
same offline instance data (synthetic compositions of real photographs, `make_instance_dataset`), the same joint
augmentation, optimiser and batch, and trains for the same wall-clock budget on one CPU thread; then its saved
folder is scored with COCO box AP on the validation images through its own image processor
(`selfpatch_hf.evaluation.detection.evaluate_coco`). Candidates: Deformable DETR (all four maps), DETR, Conditional
DETR and DAB-DETR (the stride-32 map only; transformers feeds them the last feature map).

    python benchmarks/detector_choice_study.py --seconds 180

Not COCO, and tiny models from a random backbone: the figures rank how fast the heads start to localise objects,
nothing absolute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = ("deformable_detr", "detr", "conditional_detr", "dab_detr")


def backbone(seed: int):
    from transformers import ViTConfig, ViTModel

    from selfpatch_hf.models.dense.multiscale import vit_to_beit_backbone

    torch.manual_seed(seed)
    vit = ViTModel(
        ViTConfig(hidden_size=96, num_hidden_layers=6, num_attention_heads=3, intermediate_size=384, patch_size=16,
                  image_size=128, layer_norm_eps=1e-6),
        add_pooling_layer=False,
    )  # fmt: skip
    return vit_to_beit_backbone(vit, out_indices=[2, 3, 5, 6])


def build(kind: str, pretrained, names: list[str], width: int, queries: int):
    import transformers

    from selfpatch_hf.models.dense.detection import build_deformable_detr, load_backbone_weights

    heads = dict(
        encoder_layers=2, decoder_layers=2, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width,
        encoder_attention_heads=4, decoder_attention_heads=4, num_queries=queries,
    )  # fmt: skip
    if kind == "deformable_detr":
        return build_deformable_detr(
            pretrained, names, d_model=width, **heads
        ), "DeformableDetrImageProcessorPil"
    config_class, model_class, processor = {
        "detr": ("DetrConfig", "DetrForObjectDetection", "DetrImageProcessorPil"),
        "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection",
                             "ConditionalDetrImageProcessorPil"),
        "dab_detr": ("DabDetrConfig", "DabDetrForObjectDetection", "ConditionalDetrImageProcessorPil"),
    }[kind]  # fmt: skip
    width_field = "hidden_size" if kind == "dab_detr" else "d_model"
    config = getattr(transformers, config_class)(
        backbone_config=pretrained.config.to_dict(), use_timm_backbone=False, use_pretrained_backbone=False,
        auxiliary_loss=True, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, **{width_field: width}, **heads,
    )  # fmt: skip
    model = getattr(transformers, model_class)(config)
    load_backbone_weights(model, pretrained)
    return model, processor


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) [x0, y0, x1, y1] -> (N, M) IoU."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=-1)
    area = lambda boxes: np.prod(boxes[:, 2:] - boxes[:, :2], axis=-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def best_of_k_iou(predictions, source, k: int = 10) -> float:
    """Mean over ground-truth boxes of their IoU with the best of the image's k highest-scoring predicted boxes."""
    values = []
    for prediction in predictions:
        truth = source[prediction["image_id"]].instances.boxes
        if not len(truth):
            continue
        top = np.argsort(-prediction["scores"])[:k]
        boxes = prediction["boxes"][top]
        values.extend(_box_iou(truth, boxes).max(axis=1) if len(boxes) else np.zeros(len(truth)))
    return float(np.mean(values)) if values else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=180.0, help="training wall-clock budget per candidate"
    )
    parser.add_argument(
        "--steps", type=int, help="train this many steps instead (a budget in steps, not seconds)"
    )
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "detector_choice")
    parser.add_argument("--short-side", type=int, default=96, help="training and evaluation scale")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--width", type=int, default=64, help="d_model of the heads")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--num-eval", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import transformers

    from selfpatch_hf.data.detection.augmentation import DetectionAugmentation, DetectionTrainTransform
    from selfpatch_hf.data.detection.batching import collate_detection
    from selfpatch_hf.data.detection.sources import load_detection_source
    from selfpatch_hf.data.samples.instance_scenes import make_instance_dataset
    from selfpatch_hf.data.samples.photo_cutouts import DATA_NOTE
    from selfpatch_hf.evaluation.detection import CocoEvalConfig, evaluate_coco

    torch.set_num_threads(1)
    data_dir = args.output_dir / "instances"
    if not (data_dir / "data").is_dir():
        make_instance_dataset(data_dir, num_train=240, num_eval=80, seed=args.seed)
    train = load_detection_source(data_dir, "train")
    validation = load_detection_source(data_dir, "validation")
    transform = DetectionTrainTransform(DetectionAugmentation.for_short_side(args.short_side))
    pretrained = backbone(args.seed)
    rows = []
    for kind in args.candidates.split(","):
        torch.manual_seed(args.seed)
        model, processor_name = build(kind, pretrained, train.label_names, args.width, args.queries)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
        model.train()
        step, losses, start = 0, [], time.perf_counter()
        while (step < args.steps) if args.steps else (time.perf_counter() - start < args.seconds):
            order = np.random.default_rng([args.seed, step]).choice(
                len(train), args.batch_size, replace=False
            )
            samples = [
                transform(train[int(i)], np.random.default_rng([args.seed, step, int(i)])) for i in order
            ]
            loss = model(**collate_detection(samples, "detr")).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # DETR's clipping
            optimizer.step()
            losses.append(loss.item())
            step += 1
        elapsed = time.perf_counter() - start
        folder = args.output_dir / kind
        model.save_pretrained(folder)
        processor = getattr(transformers, processor_name)(
            size={"shortest_edge": args.short_side, "longest_edge": round(args.short_side * 1333 / 800)}
        )
        processor.save_pretrained(folder)
        result = evaluate_coco(
            folder, validation, CocoEvalConfig(max_samples=args.num_eval), keep_predictions=True
        )
        box = result.scores["bbox"]
        rows.append(
            {
                "detector": kind,
                "steps": step,
                "s_per_step": elapsed / step,
                "first_loss": float(np.mean(losses[:10])),
                "last_loss": float(np.mean(losses[-10:])),
                "AP": box["AP"],
                "AP50": box["AP50"],
                "AR100": box["AR100"],
                "best_of_10_iou": best_of_k_iou(result.predictions, validation),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"Data: {DATA_NOTE}\n")
    budget = f"{args.steps} steps" if args.steps else f"{args.seconds:.0f} s"
    print(f"Budget {budget} per detector on 1 thread, batch {args.batch_size}, short side {args.short_side}; "
          f"scored on {args.num_eval} validation images.\n")  # fmt: skip
    print(
        "| detector | steps | s / step | loss (first 10 -> last 10 steps) | best-of-10 IoU | AP50 | AR100 |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['detector']} | {row['steps']} | {row['s_per_step']:.2f} | {row['first_loss']:.2f} -> "
            f"{row['last_loss']:.2f} | {row['best_of_10_iou']:.3f} | {100 * row['AP50']:.1f} | "
            f"{100 * row['AR100']:.1f} |"
        )
    (args.output_dir / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
