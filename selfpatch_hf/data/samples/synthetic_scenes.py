"""Offline dense-evaluation data: synthetic compositions of real photographs (`photo_cutouts`) as DAVIS-layout
video, a semantic segmentation set and an instance set.

`make_sequences` animates 1-3 objects (translation, scaling, rotation, occlusion between objects, a panning
and zooming camera, lighting drift, JPEG compression) and writes the DAVIS 2017 folder layout, so the DAVIS
code path evaluates it. `make_segmentation_dataset` writes a semantic segmentation set (image, mask, label)
as parquet: two background "stuff" textures split by a wavy boundary and one "thing" object; blended edge
pixels are labelled 255 (ignore). Its validation images use disjoint regions of the stuff textures and
disjoint coins; the other objects reappear under new poses, sizes and photometric changes.
`make_instance_dataset` (`instance_scenes`) writes the instance set in the Hub's COCO layout. `make_offline_data`
builds all three with a README.

These scenes are much easier than DAVIS, ADE20K or COCO and say nothing absolute about those benchmarks; they
serve to compare backbones under identical conditions offline. See `photo_cutouts` for the sources and licences.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from selfpatch_hf.data.samples.instance_scenes import make_instance_dataset
from selfpatch_hf.data.samples.photo_cutouts import (
    DATA_NOTE,
    IGNORE_INDEX,
    SEGMENTATION_CLASSES,
    SOURCES,
    STUFF_CLASSES,
    THING_CLASSES,
    Cutout,
    background_images,
    crop_resize,
    object_cutouts,
    png_bytes,
    render_cutout,
    stuff_region,
)

# --------------------------------------------------------------------------------------------------------
# Video sequences in the DAVIS layout
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Track:
    cutout: Cutout
    position: np.ndarray  # (x, y)
    velocity: np.ndarray  # pixels per frame
    size: float
    growth: float  # relative size change per frame
    angle: float
    spin: float  # degrees per frame
    flip: bool
    wobble: tuple[float, float, float]  # amplitude (px), frequency (rad / frame), phase


def _sequence_tracks(rng: np.random.Generator, frame_size: tuple[int, int], num_objects: int) -> list[_Track]:
    height, width = frame_size
    short = min(height, width)
    cutouts = object_cutouts()
    categories = rng.choice(list(cutouts), size=num_objects, replace=False)
    tracks: list[_Track] = []
    for category in categories:
        options = cutouts[category]
        cutout = options[int(rng.integers(len(options)))]
        size = float(rng.uniform(0.3, 0.5) * short)
        # First-frame positions well apart so that every object is visible in the given mask.
        for _ in range(100):
            position = np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.3, 0.7) * height])
            if all(np.linalg.norm(position - t.position) > 0.5 * (size + t.size) for t in tracks):
                break
        speed = rng.uniform(0.006, 0.016) * short
        direction = rng.uniform(0, 2 * math.pi)
        tracks.append(
            _Track(
                cutout=cutout,
                position=position,
                velocity=speed * np.array([math.cos(direction), math.sin(direction)]),
                size=size,
                growth=float(rng.uniform(-0.008, 0.012)),
                angle=float(rng.uniform(-20, 20)),
                spin=float(rng.uniform(-1.5, 1.5)),
                flip=bool(rng.integers(2)),
                wobble=(
                    float(rng.uniform(0, 0.02) * short),
                    float(rng.uniform(0.2, 0.5)),
                    float(rng.uniform(0, 6.3)),
                ),
            )
        )
    return tracks


def _render_sequence(
    rng: np.random.Generator,
    background: np.ndarray,
    frame_size: tuple[int, int],
    num_frames: int,
    num_objects: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    height, width = frame_size
    tracks = _sequence_tracks(rng, frame_size, num_objects)
    # Camera: a window of 55-75% of the background pans along a straight line and zooms in or out slightly.
    bg_h, bg_w = background.shape[:2]
    view = rng.uniform(0.55, 0.75) * min(bg_w / width, bg_h / height)
    zoom = rng.uniform(-0.1, 0.1)
    starts, ends = [], []
    for extent, limit in ((width * view, bg_w), (height * view, bg_h)):
        slack = max(0.0, limit - extent * (1 + abs(zoom)))
        starts.append(rng.uniform(0, slack))
        ends.append(rng.uniform(0, slack))
    light_phase, light_amplitude = rng.uniform(0, 6.3), rng.uniform(0.03, 0.1)

    frames, masks = [], []
    for t in range(num_frames):
        progress = t / max(1, num_frames - 1)
        scale = view * (1 + zoom * progress)
        left = starts[0] + (ends[0] - starts[0]) * progress
        top = starts[1] + (ends[1] - starts[1]) * progress
        frame = crop_resize(background, (left, top, left + width * scale, top + height * scale), frame_size)
        mask = np.zeros(frame_size, np.uint8)
        for object_id, track in enumerate(tracks, start=1):
            amplitude, frequency, phase = track.wobble
            wobble = amplitude * np.array([math.sin(frequency * t + phase), math.cos(frequency * t + phase)])
            rgb, alpha = render_cutout(
                track.cutout, frame_size, tuple(track.position + wobble), track.size, track.angle, track.flip
            )
            frame = frame * (1 - alpha[..., None]) + rgb * alpha[..., None]
            mask[alpha >= 0.5] = object_id  # later objects occlude earlier ones
            # Advance: bounce off the borders so that objects stay mostly inside the frame.
            track.position = track.position + track.velocity
            for axis, extent in ((0, width), (1, height)):
                margin = 0.2 * extent
                if not margin <= track.position[axis] <= extent - margin:
                    track.velocity[axis] *= -1
                    track.position[axis] = np.clip(track.position[axis], margin, extent - margin)
            track.size = float(
                np.clip(track.size * (1 + track.growth), 0.2 * min(frame_size), 0.65 * min(frame_size))
            )
            track.angle += track.spin
        frame = frame * (1 + light_amplitude * math.sin(0.3 * t + light_phase))
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        masks.append(mask)
    return frames, masks


def make_sequences(
    output_dir: str | Path,
    num_sequences: int = 8,
    num_frames: int = 20,
    frame_size: tuple[int, int] = (240, 320),
    max_objects: int = 3,
    seed: int = 0,
    jpeg_quality: int = 90,
) -> list[str]:
    """Write `num_sequences` synthetic sequences in the DAVIS 2017 layout under `output_dir`; returns their names.

    Every frame has a ground-truth mask (0 background, 1..K objects, K <= max_objects); all objects are
    visible in the first frame. frame_size is (height, width).
    """
    from selfpatch_hf.evaluation.davis import write_indexed_mask

    if num_frames < 3:
        raise ValueError("num_frames must be at least 3 (the DAVIS protocol scores frames 1 .. T-2).")
    if not 1 <= max_objects <= len(THING_CLASSES):
        raise ValueError(f"max_objects must be between 1 and {len(THING_CLASSES)}.")
    output_dir = Path(output_dir)
    rng = np.random.default_rng(seed)
    backgrounds = background_images()
    names = []
    for index in range(num_sequences):
        background_name = list(backgrounds)[index % len(backgrounds)]
        num_objects = 1 + index % max_objects
        frames, masks = _render_sequence(
            rng, backgrounds[background_name], frame_size, num_frames, num_objects
        )
        name = f"{background_name}-{index:02d}"
        for t, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
            frame_path = output_dir / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"
            frame_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(frame).save(frame_path, quality=jpeg_quality)
            write_indexed_mask(output_dir / "Annotations" / "480p" / name / f"{t:05d}.png", mask)
        names.append(name)
    image_sets = output_dir / "ImageSets" / "2017"
    image_sets.mkdir(parents=True, exist_ok=True)
    (image_sets / "val.txt").write_text("\n".join(names) + "\n")
    return names


# --------------------------------------------------------------------------------------------------------
# Semantic segmentation set
# --------------------------------------------------------------------------------------------------------


def _texture_crop(rng: np.random.Generator, source: np.ndarray, size: int) -> np.ndarray:
    height, width = source.shape[:2]
    extent = rng.uniform(0.5, 1.0) * min(height, width)
    left, top = rng.uniform(0, width - extent), rng.uniform(0, height - extent)
    crop = crop_resize(source, (left, top, left + extent, top + extent), (size, size))
    return crop[:, ::-1] if rng.integers(2) else crop


def _segmentation_example(
    rng: np.random.Generator, size: int, split: str
) -> tuple[np.ndarray, np.ndarray, int]:
    backgrounds = background_images()
    first, second = rng.choice(len(STUFF_CLASSES), size=2, replace=False)
    textures = [
        _texture_crop(rng, stuff_region(backgrounds[STUFF_CLASSES[c]], split), size) for c in (first, second)
    ]
    # A wavy boundary splits the two stuff regions.
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size - 0.5
    phi = rng.uniform(0, 2 * math.pi)
    along, across = xx * math.cos(phi) + yy * math.sin(phi), -xx * math.sin(phi) + yy * math.cos(phi)
    wave = rng.uniform(0.02, 0.08) * np.sin(rng.uniform(4, 12) * across + rng.uniform(0, 6.3))
    region = along + wave < rng.uniform(-0.2, 0.2)
    image = np.where(region[..., None], textures[0], textures[1])
    label = np.where(region, first, second).astype(np.uint8)

    thing = int(rng.integers(len(THING_CLASSES)))
    options = object_cutouts()[THING_CLASSES[thing]]
    if THING_CLASSES[thing] == "coin":  # disjoint coins for training and validation
        options = options[0::2] if split == "train" else options[1::2]
    cutout = options[int(rng.integers(len(options)))]
    center = tuple(rng.uniform(0.35, 0.65, size=2) * size)
    rgb, alpha = render_cutout(
        cutout,
        (size, size),
        center,
        rng.uniform(0.35, 0.65) * size,
        rng.uniform(-30, 30),
        bool(rng.integers(2)),
    )
    rgb = (rgb - 128) * rng.uniform(0.85, 1.15) + 128 + rng.uniform(-15, 15)  # contrast / brightness jitter
    image = image * (1 - alpha[..., None]) + rgb * alpha[..., None]
    label[alpha >= 0.5] = len(STUFF_CLASSES) + thing
    label[(alpha > 0.1) & (alpha < 0.9)] = IGNORE_INDEX  # blended edge pixels belong to neither class
    return np.clip(image, 0, 255).astype(np.uint8), label, thing


def segmentation_features():
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "label": datasets.ClassLabel(names=list(THING_CLASSES)),
        }
    )


def make_segmentation_dataset(
    output_dir: str | Path,
    num_train: int = 240,
    num_eval: int = 80,
    image_size: int = 224,
    seed: int = 0,
):
    """Write `output_dir/data/{train,validation}-00000-of-00001.parquet` and return the `DatasetDict`.

    Columns: `image` (RGB), `mask` (class ids 0..11 of `SEGMENTATION_CLASSES`, 255 = ignore) and `label`
    (the image's thing class, for k-NN). Load it back with `datasets.load_dataset(output_dir)`.
    """
    import datasets

    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", num_train), ("validation", num_eval)):
        rows = {"image": [], "mask": [], "label": []}
        for _ in range(count):
            image, mask, thing = _segmentation_example(
                rng, image_size, "train" if split == "train" else "eval"
            )
            rows["image"].append(png_bytes(image))
            rows["mask"].append(png_bytes(mask))
            rows["label"].append(thing)
        dataset = datasets.Dataset.from_dict(rows, features=segmentation_features())
        path = Path(output_dir) / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(path))
        splits[split] = dataset
    return datasets.DatasetDict(splits)


def _write_readme(output_dir: Path, info: dict) -> None:
    lines = [
        "# Offline dense-evaluation data (synthetic)",
        "",
        DATA_NOTE,
        "",
        "Built by `python -m selfpatch_hf.evaluation make-offline-data` "
        f"with: `{json.dumps(info['arguments'])}`.",
        "",
        "- `davis/`: video sequences in the DAVIS 2017 layout (JPEGImages/480p, Annotations/480p, "
        "ImageSets/2017/val.txt; the folder name 480p is kept for the layout, the frames are "
        f"{info['arguments']['frame_size'][0]}x{info['arguments']['frame_size'][1]}).",
        "- `segmentation/`: parquet semantic segmentation set with columns image, mask (255 = ignore), label.",
        f"  Classes: {', '.join(f'{i}={n}' for i, n in enumerate(SEGMENTATION_CLASSES))}.",
        "- `instances/`: parquet instance set in the Hub's COCO layout (image_id, image, width, height, objects with "
        "id, area, bbox [x, y, width, height], category, iscrowd, segmentation as RLE), one instance per pasted "
        f"object; categories {', '.join(f'{i}={n}' for i, n in enumerate(THING_CLASSES))}"
        + (
            "; `instances/coco/` holds the same as COCO json (category ids + 1) and PNG folders."
            if info["arguments"]["coco_json"]
            else "."
        ),
        "",
        "Sources:",
        *[f"- {text}" for text in SOURCES.values()],
        "",
    ]
    (output_dir / "README.md").write_text("\n".join(lines))


def default_offline_data_dir() -> Path:
    """Where the standard offline data live: `offline-eval/` in the package's cache folder (`$SELFPATCH_HF_CACHE`,
    else `$XDG_CACHE_HOME/selfpatch_hf`, else `~/.cache/selfpatch_hf`). `selfpatch eval make-offline-data` writes
    there by default, and fine-tuning's `offline-scenes` reads (or builds) its `segmentation/` there."""
    from selfpatch_hf.data.samples.photographs import default_cache_dir

    return default_cache_dir() / "offline-eval"


def make_offline_data(
    output_dir: str | Path,
    *,
    num_sequences: int = 8,
    num_frames: int = 20,
    frame_size: Sequence[int] = (240, 320),
    max_objects: int = 3,
    num_train: int = 240,
    num_eval: int = 80,
    image_size: int = 224,
    num_instance_train: int = 240,
    num_instance_eval: int = 80,
    instance_size: Sequence[int] = (192, 256),
    max_instances: int = 4,
    coco_json: bool = False,
    seed: int = 0,
) -> dict:
    """Build the data sets under `output_dir` (davis/, segmentation/ and instances/) with a README; returns a
    summary."""
    output_dir = Path(output_dir)
    arguments = {
        "num_sequences": num_sequences,
        "num_frames": num_frames,
        "frame_size": list(frame_size),
        "max_objects": max_objects,
        "num_train": num_train,
        "num_eval": num_eval,
        "image_size": image_size,
        "num_instance_train": num_instance_train,
        "num_instance_eval": num_instance_eval,
        "instance_size": list(instance_size),
        "max_instances": max_instances,
        "coco_json": coco_json,
        "seed": seed,
    }
    names = make_sequences(
        output_dir / "davis",
        num_sequences,
        num_frames,
        (int(frame_size[0]), int(frame_size[1])),
        max_objects,
        seed,
    )
    make_segmentation_dataset(output_dir / "segmentation", num_train, num_eval, image_size, seed)
    make_instance_dataset(
        output_dir / "instances",
        num_instance_train,
        num_instance_eval,
        tuple(instance_size),
        max_instances,
        seed,
        coco_json=coco_json,
    )
    info = {
        "note": DATA_NOTE,
        "arguments": arguments,
        "sequences": names,
        "segmentation_classes": list(SEGMENTATION_CLASSES),
        "thing_classes": list(THING_CLASSES),
        "ignore_index": IGNORE_INDEX,
        "sources": SOURCES,
    }
    (output_dir / "offline_data.json").write_text(json.dumps(info, indent=2))
    _write_readme(output_dir, info)
    return info


__all__ = [
    "DATA_NOTE",
    "IGNORE_INDEX",
    "SEGMENTATION_CLASSES",
    "SOURCES",
    "STUFF_CLASSES",
    "THING_CLASSES",
    "Cutout",
    "make_instance_dataset",
    "make_offline_data",
    "make_segmentation_dataset",
    "make_sequences",
    "object_cutouts",
    "render_cutout",
    "segmentation_features",
]
