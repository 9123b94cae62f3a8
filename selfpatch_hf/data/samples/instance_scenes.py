"""Offline instance set (detection / instance segmentation) in the Hub's COCO layout, from real photographs.

`make_instance_dataset` pastes 0-4 real object cut-outs (`selfpatch_hf.data.samples.photo_cutouts`) over a
background photograph; every pasted photograph is one instance with its own mask (later objects occlude earlier
ones), box, area and category (its `THING_CLASSES` id). Training and validation images take backgrounds from
disjoint regions of the source photographs and disjoint coins, as the semantic segmentation set does. The columns
are the Hub's COCO layout (as `cppe-5` and COCO conversions have it): `image_id`, `image`, `width`, `height` and
`objects` with `id`, `area`, `bbox` ([x, y, width, height]), `category`, `iscrowd` and `segmentation` (compressed
RLE); optionally the same as COCO json + PNG folders, which `pycocotools` reads.

Much easier than COCO; it says nothing absolute about COCO, and serves to run the whole detection path on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from selfpatch_hf.data.samples.photo_cutouts import (
    DATA_NOTE,
    THING_CLASSES,
    background_images,
    crop_resize,
    object_cutouts,
    png_bytes,
    render_cutout,
    stuff_region,
)

NEGATIVE_FRACTION = 0.05  # images without objects, as COCO has them
_MIN_VISIBLE_PIXELS = 16  # an object occluded below this is no instance (nothing of it is left to find)


def _background_view(rng: np.random.Generator, source: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    src_h, src_w = source.shape[:2]
    scale = rng.uniform(0.5, 1.0) * min(src_h / height, src_w / width)
    left, top = rng.uniform(0, src_w - width * scale), rng.uniform(0, src_h - height * scale)
    view = crop_resize(source, (left, top, left + width * scale, top + height * scale), size)
    return view[:, ::-1] if rng.integers(2) else view


def _instance_example(
    rng: np.random.Generator, size: tuple[int, int], split: str, max_objects: int
) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """-> image (H, W, 3) uint8, one (H, W) bool mask per instance (visible pixels), their THING_CLASSES ids."""
    height, width = size
    backgrounds = background_images()
    image = _background_view(
        rng, stuff_region(list(backgrounds.values())[rng.integers(len(backgrounds))], split), size
    )
    count = 0 if rng.random() < NEGATIVE_FRACTION else int(rng.integers(1, max_objects + 1))
    masks: list[np.ndarray] = []
    categories: list[int] = []
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(count):
        thing = int(rng.integers(len(THING_CLASSES)))
        options = object_cutouts()[THING_CLASSES[thing]]
        if THING_CLASSES[thing] == "coin":  # disjoint coins for training and validation
            options = options[0::2] if split == "train" else options[1::2]
        cutout = options[int(rng.integers(len(options)))]
        extent = float(rng.uniform(0.2, 0.5) * min(size))
        # Overlap is allowed (occlusion is part of the task) but no object may hide most of another.
        for _ in range(50):
            center = rng.uniform(0.15, 0.85, size=2) * np.array([width, height])
            if all(
                np.linalg.norm(center - other) > 0.4 * (extent + other_extent)
                for other, other_extent in placed
            ):
                break
        placed.append((center, extent))
        rgb, alpha = render_cutout(
            cutout, size, tuple(center), extent, rng.uniform(-30, 30), bool(rng.integers(2))
        )
        rgb = (
            (rgb - 128) * rng.uniform(0.85, 1.15) + 128 + rng.uniform(-15, 15)
        )  # contrast / brightness jitter
        image = image * (1 - alpha[..., None]) + rgb * alpha[..., None]
        mask = alpha >= 0.5
        masks = [earlier & ~mask for earlier in masks]  # the new object occludes the earlier ones
        masks.append(mask)
        categories.append(thing)
    kept = [(m, c) for m, c in zip(masks, categories, strict=True) if m.sum() >= _MIN_VISIBLE_PIXELS]
    return np.clip(image, 0, 255).astype(np.uint8), [m for m, _ in kept], [c for _, c in kept]


def mask_to_coco(mask: np.ndarray) -> tuple[list[float], float, dict[str, Any]]:
    """(H, W) bool mask -> its COCO `bbox` [x, y, width, height] (pixel i covers [i, i + 1)), `area` (pixels) and
    compressed RLE `{"size": [H, W], "counts": str}`."""
    from pycocotools import mask as mask_utils

    rows, cols = np.nonzero(mask)
    box = [
        float(cols.min()),
        float(rows.min()),
        float(cols.max() - cols.min() + 1),
        float(rows.max() - rows.min() + 1),
    ]
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return (
        box,
        float(mask.sum()),
        {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
    )


def instance_features():
    """The Hub COCO layout of the instance set (as `cppe-5` and COCO conversions lay it out, with RLE masks)."""
    import datasets

    return datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": datasets.Sequence(
                {
                    "id": datasets.Value("int64"),
                    "area": datasets.Value("float32"),
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=list(THING_CLASSES)),
                    "iscrowd": datasets.Value("int8"),
                    "segmentation": {
                        "size": datasets.Sequence(datasets.Value("int32"), length=2),
                        "counts": datasets.Value("string"),
                    },
                }
            ),
        }
    )


def _write_coco_json(output_dir: Path, split: str, rows: dict[str, list]) -> None:
    """COCO's own layout beside the parquet: `annotations/instances_<split>.json` and `<split>/<id>.png`; category
    ids 1..K (COCO numbers categories from 1)."""
    image_dir = output_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, image, width, height, objects in zip(
        rows["image_id"], rows["image"], rows["width"], rows["height"], rows["objects"], strict=True
    ):
        file_name = f"{image_id:06d}.png"
        (image_dir / file_name).write_bytes(image["bytes"])
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for index in range(len(objects["id"])):
            annotations.append(
                {
                    "id": objects["id"][index],
                    "image_id": image_id,
                    "category_id": objects["category"][index] + 1,
                    "bbox": objects["bbox"][index],
                    "area": objects["area"][index],
                    "iscrowd": objects["iscrowd"][index],
                    "segmentation": objects["segmentation"][index],
                }
            )
    categories = [
        {"id": index + 1, "name": name, "supercategory": "thing"} for index, name in enumerate(THING_CLASSES)
    ]
    (output_dir / "annotations").mkdir(parents=True, exist_ok=True)
    payload = {
        "images": images,
        "annotations": annotations,
        "categories": categories,
        "info": {"description": DATA_NOTE},
    }
    (output_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))


def make_instance_dataset(
    output_dir: str | Path,
    num_train: int = 240,
    num_eval: int = 80,
    image_size: int | Sequence[int] = (192, 256),
    max_objects: int = 4,
    seed: int = 0,
    coco_json: bool = False,
):
    """Write `output_dir/data/{train,validation}-00000-of-00001.parquet` (the Hub COCO layout of
    `instance_features`) and return the `DatasetDict`; with `coco_json`, also `output_dir/coco/` (COCO json + PNG
    folder per split, the same images and annotations).

    Every pasted photograph is one instance: `bbox` [x, y, width, height] and `area` from its visible mask,
    `category` its THING_CLASSES id, `segmentation` the mask as compressed RLE, `iscrowd` 0. About
    `NEGATIVE_FRACTION` of the images hold no object. `image_size` is (height, width) or one side.
    """
    import datasets

    from selfpatch_hf.image_conventions import as_height_width

    size = as_height_width(image_size, "image_size")
    if not 1 <= max_objects <= 20:
        raise ValueError(f"max_objects must be between 1 and 20, got {max_objects}.")
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train and num_eval must be >= 0, got {num_train} and {num_eval}.")
    rng = np.random.default_rng([seed, 7])  # its own stream: the other sets stay as they were for a seed
    output_dir = Path(output_dir)
    splits, next_image, next_object = {}, 1, 1
    for split, count in (("train", num_train), ("validation", num_eval)):
        rows: dict[str, list] = {"image_id": [], "image": [], "width": [], "height": [], "objects": []}
        for _ in range(count):
            image, masks, categories = _instance_example(
                rng, size, "train" if split == "train" else "eval", max_objects
            )
            objects: dict[str, list] = {
                k: [] for k in ("id", "area", "bbox", "category", "iscrowd", "segmentation")
            }
            for mask, category in zip(masks, categories, strict=True):
                box, area, rle = mask_to_coco(mask)
                for key, value in (("id", next_object), ("area", area), ("bbox", box), ("category", category),
                                   ("iscrowd", 0), ("segmentation", rle)):  # fmt: skip
                    objects[key].append(value)
                next_object += 1
            for key, value in (("image_id", next_image), ("image", png_bytes(image)), ("width", size[1]),
                               ("height", size[0]), ("objects", objects)):  # fmt: skip
                rows[key].append(value)
            next_image += 1
        dataset = datasets.Dataset.from_dict(rows, features=instance_features())
        path = output_dir / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(path))
        if coco_json:
            _write_coco_json(output_dir / "coco", split, rows)
        splits[split] = dataset
    return datasets.DatasetDict(splits)


__all__ = ["NEGATIVE_FRACTION", "instance_features", "make_instance_dataset", "mask_to_coco"]
