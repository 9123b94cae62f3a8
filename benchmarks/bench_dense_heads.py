"""Seconds per image of each dense head on a ViT-S/16 at its recipe's sizes, on this machine's CPU.

The models are the ones the recipes build (random weights: speed does not depend on them):

- `upernet-single`: UperNet (width 512, auxiliary head) on blocks 3, 6, 9, 12 at stride 16 (`Dinov2Backbone`);
- `upernet-multiscale`: the same UperNet on strides 4-32 (`BeitBackbone(add_fpn=True)`), the ADE20K default;
- `deformable-detr`: `training/configs/coco_vit_small_deformable_detr.yaml` (d_model 256, 6 + 6 layers, 300
  queries) on strides 4-32;
- `mask2former`: `training/configs/coco_vit_small_mask2former.yaml` (width 256, 6 pixel-decoder and 10 decoder
  layers, 100 queries) on strides 4-32.

Per head: the median over `--repeats` of an inference forward (no gradient) on one image, and of a training step
(forward, backward, AdamW step) divided by its images. UperNet runs at 512 x 512 (the ADE20K crop) both ways and
trains on two images (its pooling branch's BatchNorm needs two). The detectors infer at `--detection-size`
(default 800 x 1088: a 640 x 480 COCO image at the evaluation scale, rounded to a multiple of 32) and train on one
image of `--detection-train-size` (default 512 x 672, the smallest multi-scale training resize of such an image)
with five random objects. Deformable DETR's training steps grew past what a shared 23 GB machine can spare: about
18 GB for two images at 800 x 1088, over 10 GB for two and over 9 GB for one at 512 x 672 (stopped there); pass
`--detection-train-size 384 512` on such a machine.

    python benchmarks/bench_dense_heads.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

HEADS = ("upernet-single", "upernet-multiscale", "deformable-detr", "mask2former")


def vit_small():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16,
        image_size=224, layer_norm_eps=1e-6,
    )  # fmt: skip
    return ViTModel(config, add_pooling_layer=False)


def build(head: str, names: list[str]):
    from selfpatch_hf.models.dense.detection import build_deformable_detr, build_mask2former
    from selfpatch_hf.models.dense.heads import build_upernet

    vit = vit_small()
    if head.startswith("upernet"):
        return build_upernet(vit, names, out_indices=[3, 6, 9, 12], multi_scale=head.endswith("multiscale"))
    if head == "deformable-detr":
        return build_deformable_detr(
            vit, names, out_indices=[4, 6, 8, 12], encoder_ffn_dim=1024, decoder_ffn_dim=1024, num_queries=300
        )
    return build_mask2former(vit, names, out_indices=[4, 6, 8, 12], num_queries=100)


def train_batch(head: str) -> int:
    return 2 if head.startswith("upernet") else 1


def labels(head: str, size: tuple[int, int], num_labels: int, generator: torch.Generator) -> dict:
    """The targets of one image (UperNet: its label map)."""
    height, width = size
    if head.startswith("upernet"):
        return {"labels": torch.randint(0, num_labels, (height, width), generator=generator)}
    classes = torch.randint(0, num_labels, (5,), generator=generator)
    centres = 0.25 + 0.5 * torch.rand(5, 2, generator=generator)
    extents = 0.1 + 0.3 * torch.rand(5, 2, generator=generator)
    if head == "deformable-detr":
        return {"class_labels": classes, "boxes": torch.cat([centres, extents], dim=1)}
    masks = torch.zeros(5, height, width)
    for index, ((cx, cy), (w, h)) in enumerate(zip(centres.tolist(), extents.tolist(), strict=True)):
        masks[index, int((cy - h / 2) * height) : int((cy + h / 2) * height),
              int((cx - w / 2) * width) : int((cx + w / 2) * width)] = 1  # fmt: skip
    return {"mask_labels": masks, "class_labels": classes}


def batch_labels(head: str, per_image: list[dict]) -> dict:
    if head.startswith("upernet"):
        return {"labels": torch.stack([item["labels"] for item in per_image])}
    if head == "deformable-detr":
        return {"labels": per_image}
    return {key: [item[key] for item in per_image] for key in ("mask_labels", "class_labels")}


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: allocator, lazily built buffers
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(head: str, size: tuple[int, int], train_size: tuple[int, int], repeats: int) -> dict:
    names = [f"class-{index}" for index in range(150 if head.startswith("upernet") else 80)]
    torch.manual_seed(0)
    model = build(head, names)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, *size, generator=generator)
    batch = train_batch(head)
    train_pixels = torch.randn(batch, 3, *train_size, generator=generator)
    targets = batch_labels(head, [labels(head, train_size, len(names), generator) for _ in range(batch)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(pixel_values=pixels)

    def train_step() -> None:
        model.train()
        loss = model(pixel_values=train_pixels, **targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {
        "head": head,
        "inference_size": list(size),
        "training_size": list(train_size),
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "inference_seconds_per_image": round(median_seconds(infer, repeats), 2),
        "training_batch": batch,
        "training_seconds_per_image": round(median_seconds(train_step, repeats) / batch, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--detection-size", type=int, nargs=2, default=[800, 1088], metavar=("HEIGHT", "WIDTH")
    )
    parser.add_argument(
        "--detection-train-size", type=int, nargs=2, default=[512, 672], metavar=("HEIGHT", "WIDTH")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for head in args.heads:
        if head.startswith("upernet"):
            sizes = ((512, 512), (512, 512))
        else:
            sizes = (tuple(args.detection_size), tuple(args.detection_train_size))
        print(json.dumps({**measure(head, *sizes, args.repeats), "threads": args.threads}), flush=True)


if __name__ == "__main__":
    main()
