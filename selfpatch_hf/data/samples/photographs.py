"""An offline default image dataset: real photographs shipped inside the scikit-image wheel.

The README quickstart, demos and tests need real images on a fresh machine without network. scikit-image (an
install requirement) bundles a few photographs in its wheel; `build_sample_dataset` re-encodes them as JPEG and writes
them into local parquet shards with the `datasets.Image` feature, so the pretraining data path reads them exactly
like any other parquet dataset (`load_image_stream(path)`).

Public API
----------
- `SAMPLE_IMAGES`: the images used, each with its source and licence (also stored per row in the `license` column).
- `build_sample_dataset(output_dir, num_shards=2, jpeg_quality=95) -> Path`: writes
  `output_dir/train-0000i-of-0000n.parquet` (columns `image`, `name`, `license`, `source`) and a dataset card.
- `sample_dataset_path(cache_dir=None, num_shards=2) -> Path`: the cached copy, built once (atomically, safe with
  several processes) under `$SELFPATCH_HF_CACHE`, else `$XDG_CACHE_HOME/selfpatch_hf`, else
  `~/.cache/selfpatch_hf`.
- `python -m selfpatch_hf.data.samples.photographs [--output-dir DIR] [--num-shards N]` prints the dataset folder.

Only images whose licence scikit-image documents as public domain, CC0 or "no known copyright restrictions" are used
(scikit-image's stereo `motorcycle` pair and `moon` are left out: scikit-image states no licence for them).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_DATASET_VERSION = 1
# How model cards name this dataset (it is built locally, so it is no Hub dataset id for their metadata).
SAMPLE_DATASET_DESCRIPTION = (
    "the offline sample: 13 photographs bundled with scikit-image (public domain, CC0 or no known copyright "
    "restrictions), built locally by `selfpatch_hf.data.samples.photographs`"
)


@dataclass(frozen=True)
class SampleImage:
    name: str  # the `skimage.data` function that returns it
    license: str
    source: str


SAMPLE_IMAGES: tuple[SampleImage, ...] = (
    SampleImage("astronaut", "Public domain", "NASA Great Images: astronaut Eileen Collins"),
    SampleImage("chelsea", "CC0 1.0", "Chelsea the cat, photograph by Stefan van der Walt"),
    SampleImage("coffee", "CC0 1.0", "Cup of coffee, photograph by Rachel Michetti"),
    SampleImage("rocket", "Public domain", "SpaceX: launch of DSCOVR on Falcon 9"),
    SampleImage("hubble_deep_field", "Public domain", "NASA/HubbleSite: Hubble eXtreme Deep Field"),
    SampleImage("retina", "CC0 1.0", "Wikimedia Commons: fundus photograph by Mikael Haggstrom"),
    SampleImage(
        "immunohistochemistry",
        "No known copyright restrictions",
        "Center for Microscopy And Molecular Imaging (CMMI): IHC-stained colonic glands",
    ),
    SampleImage("camera", "CC0 1.0", "Photographer with a camera, photograph by Lav Varshney (grayscale)"),
    SampleImage(
        "coins", "No known copyright restrictions", "Brooklyn Museum: Greek coins from Pompeii (grayscale)"
    ),
    SampleImage(
        "clock", "Public domain", "Motion-blurred wall clock, photograph by Stefan van der Walt (grayscale)"
    ),
    SampleImage("brick", "CC0 1.0", "CC0Textures Bricks25 (grayscale)"),
    SampleImage("grass", "CC0 1.0", "DeviantArt linolafett Grass-01 (grayscale)"),
    SampleImage("gravel", "CC0 1.0", "CC0Textures Gravel04 (grayscale)"),
)

_COMPLETE_MARKER = ".complete"


def _load_sample_image(name: str) -> np.ndarray:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if pixels.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is {pixels.dtype}, expected uint8.")
    return pixels


def _encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    # Grayscale photos stay single-channel JPEGs, so the loader's grayscale -> RGB path is exercised too.
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _dataset_card(num_rows: int) -> str:
    lines = [
        "---",
        "pretty_name: selfpatch-hf offline sample images",
        "license: other",
        "license_name: public-domain-and-cc0",
        "---",
        "",
        "# selfpatch-hf offline sample images",
        "",
        f"{num_rows} photographs bundled in the scikit-image wheel (`skimage.data`), re-encoded as JPEG and written",
        "by `selfpatch_hf.data.samples.photographs.build_sample_dataset`. Columns: `image`, `name`, `license`, `source`.",
        "",
        "| name | licence | source |",
        "|---|---|---|",
    ]
    lines += [f"| {image.name} | {image.license} | {image.source} |" for image in SAMPLE_IMAGES]
    return "\n".join(lines) + "\n"


def build_sample_dataset(output_dir: str | os.PathLike, num_shards: int = 2, jpeg_quality: int = 95) -> Path:
    """Write the sample photographs into `num_shards` parquet shards with the `Image` feature.

    Returns `output_dir`. Existing shards with the same names are overwritten.
    """
    from datasets import Dataset, Features, Value, disable_progress_bars, enable_progress_bars
    from datasets import Image as ImageFeature
    from datasets.utils.logging import is_progress_bar_enabled as datasets_progress_bars_enabled

    if not 1 <= num_shards <= len(SAMPLE_IMAGES):
        raise ValueError(
            f"num_shards must be between 1 and {len(SAMPLE_IMAGES)} (one image per shard at least)."
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"image": [], "name": [], "license": [], "source": []}
    for image in SAMPLE_IMAGES:
        rows["image"].append(
            {"bytes": _encode_jpeg(_load_sample_image(image.name), jpeg_quality), "path": None}
        )
        rows["name"].append(image.name)
        rows["license"].append(image.license)
        rows["source"].append(f"scikit-image `skimage.data.{image.name}`: {image.source}")
    features = Features(
        {
            "image": ImageFeature(),
            "name": Value("string"),
            "license": Value("string"),
            "source": Value("string"),
        }
    )
    dataset = Dataset.from_dict(rows, features=features)
    bars_were_enabled = datasets_progress_bars_enabled()
    disable_progress_bars()
    try:
        for index in range(num_shards):
            shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True)
            shard.to_parquet(str(output_dir / f"train-{index:05d}-of-{num_shards:05d}.parquet"))
    finally:
        if bars_were_enabled:
            enable_progress_bars()
    (output_dir / "README.md").write_text(_dataset_card(len(dataset)))
    return output_dir


def default_cache_dir() -> Path:
    """`$SELFPATCH_HF_CACHE`, else `$XDG_CACHE_HOME/selfpatch_hf`, else `~/.cache/selfpatch_hf`."""
    if os.environ.get("SELFPATCH_HF_CACHE"):
        return Path(os.environ["SELFPATCH_HF_CACHE"]).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg_cache) / "selfpatch_hf"


def sample_dataset_path(cache_dir: str | os.PathLike | None = None, num_shards: int = 2) -> Path:
    """Folder of the cached sample dataset, built on first use; pass it to `load_image_stream`."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"sample_images-v{SAMPLE_DATASET_VERSION}-{num_shards}shards"
    if (target / _COMPLETE_MARKER).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build in a private folder and rename it into place: concurrent builders (several ranks) never see a half
    # written dataset, and the loser of the race discards its copy.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-{uuid.uuid4().hex[:8]}-", dir=cache_dir))
    try:
        build_sample_dataset(staging, num_shards=num_shards)
        (staging / _COMPLETE_MARKER).write_text(f"{SAMPLE_DATASET_VERSION}\n")
        if target.exists() and not (target / _COMPLETE_MARKER).exists():
            shutil.rmtree(target, ignore_errors=True)  # left over from an interrupted older build
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build the offline sample image dataset and print its folder."
    )
    parser.add_argument("--output-dir", help="write here instead of the cache folder")
    parser.add_argument("--num-shards", type=int, default=2)
    args = parser.parse_args(argv)
    if args.output_dir:
        path = build_sample_dataset(args.output_dir, num_shards=args.num_shards)
    else:
        path = sample_dataset_path(num_shards=args.num_shards)
    print(path)


if __name__ == "__main__":
    main()


__all__ = [
    "SAMPLE_IMAGES",
    "SampleImage",
    "build_sample_dataset",
    "default_cache_dir",
    "main",
    "sample_dataset_path",
]
