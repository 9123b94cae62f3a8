"""Tiny parquet image datasets written by tests (seconds, no network)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from PIL import Image


def write_parquet_images(directory: Path, num_images: int = 16, num_shards: int = 2, seed: int = 0) -> Path:
    """`num_images` distinct random RGB images (36-60 px sides) in `num_shards` parquet shards with an Image column."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    images = [
        Image.fromarray(
            rng.integers(0, 256, (int(rng.integers(36, 61)), int(rng.integers(36, 61)), 3), dtype=np.uint8)
        )
        for _ in range(num_images)
    ]
    features = datasets.Features({"image": datasets.Image(), "index": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict(
        {"image": images, "index": list(range(num_images))}, features=features
    )
    for shard in range(num_shards):
        part = dataset.shard(num_shards, shard, contiguous=True)
        part.to_parquet(str(directory / f"train-{shard:05d}-of-{num_shards:05d}.parquet"))
    return directory
