"""Image data for pretraining: sources -> decoded RGB images -> multi-crop batches, per rank, resumable.

Public API (in data-flow order; the multi-crop recipe itself is `selfpatch_hf.data.augmentation`, the offline sample
dataset `selfpatch_hf.data.samples.photographs`):

- `load_image_stream(source, split="train", image_column=None, token=None, streaming=True, num_shards=None,
  **load_dataset_kwargs) -> (IterableDataset, image_column)` and `as_raw_image_stream(dataset, image_column=None)`;
- `decode_image(value, min_size=16) -> PIL RGB image`, raising `ImageDecodeError` (with a `reason` among
  `SKIP_REASONS`) for images to skip;
- `MultiCropDataLoader(dataset, image_column, augmentation, batch_size, *, num_workers=2, rank=0, world_size=1,
  seed=0, shuffle_buffer_size=1000, drop_last=True, min_image_size=16, pin_memory=None, prefetch_factor=2,
  token=None, device=None, augmentation_device="workers")`, iterating `MultiCropBatch(global_crops (B, 2, 3, H, W), local_crops (B, L, 3, h, w))`, with
  `set_epoch`, `state_dict` / `load_state_dict`, `skipped_images`;
- `build_pretraining_dataloader(source, augmentation=None, batch_size=64, *, split="train", image_column=None,
  token=None, streaming=True, **loader_kwargs) -> MultiCropDataLoader`.

Sources
-------
`load_image_stream(source, split="train", image_column=None, token=None, streaming=True, ...)` returns
`(dataset, image_column)`, where `dataset` holds only the image column, typed `datasets.Image(decode=False)`: each
example is `{image_column: {"bytes": ..., "path": ...}}`, decoded later by `decode_image` (in DataLoader workers),
so that one corrupt file is skipped instead of raising inside `datasets`.

`source` may be:

- a local directory: parquet shards, an imagefolder tree or webdataset `.tar` shards (the builder is inferred by
  `datasets` from the files, as `load_dataset(directory)` does);
- a local file or a glob (`"/data/shards/*.parquet"`, `"/data/**/*.jpg"`): `.parquet` -> parquet,
  `.tar` -> webdataset, image files -> imagefolder;
- otherwise a Hub dataset name (`"ILSVRC/imagenet-1k"`). Gated and private datasets use `token`, else the token
  from the usual places (`HF_TOKEN`, `hf auth login`).

The image column is the dataset's single `Image` feature unless `image_column` names one (an `Image`, binary or
path-string column). Labels and every other column are dropped.

Decoding
--------
Raw image values from a stream -> RGB PIL images, or a counted reason to skip them.

`decode_image(value, min_size=16)` accepts what a `datasets.Image(decode=False)` column yields (`{"bytes", "path"}`),
raw bytes, a local path, or a PIL image, and returns an RGB `PIL.Image`. An entry that is only a path is followed
only inside the source the user named (`ImagePaths`: the local folder or image files, or the Hub dataset's own
files), never to a URL: a crafted dataset cannot make training read other files or send requests.

- EXIF orientation is applied (`ImageOps.exif_transpose`), so rotated phone photos come out upright;
- grayscale, palette (with or without transparency), RGBA/LA (alpha dropped, like the reference `convert("RGB")`),
  CMYK and YCbCr go through PIL's conversions;
- 16-bit grayscale (`I;16*`) is scaled to 8 bits by 255/65535; 32-bit integer (`I`) images are read as 16-bit
  data when their maximum exceeds 255 and as 8-bit data otherwise; float (`F`) images as [0, 1] data when their
  maximum is at most 1, else clipped to [0, 255].

Anything else raises `ImageDecodeError` with a `reason` among `SKIP_REASONS` ("unreadable": corrupt, truncated or
not an image; "too_small": shorter side below `min_size`; "unsupported_mode": a pixel format with no RGB meaning),
which the data loader counts and logs instead of crashing.

Loading
-------
`MultiCropDataLoader(dataset, image_column, augmentation, batch_size, *, num_workers=2, rank=0, world_size=1, seed=0,
shuffle_buffer_size=1000, drop_last=True, min_image_size=16, pin_memory=None, prefetch_factor=2, token=None,
device=None, augmentation_device="workers")` iterates `MultiCropBatch(global_crops (B, 2, 3, H, W), local_crops (B, L, 3, h, w))` named tuples (float32,
normalised), one epoch per `for` loop, and has:

- `set_epoch(epoch)`: new shard order, shuffle buffer order and crops per epoch. A completed pass moves `epoch` on by
  one by itself, so a loop without `set_epoch` still sees a new order each epoch.
- `state_dict()` / `load_state_dict(state)`: this rank's stream position (JSON-serialisable). A run restored from
  it continues with the next unseen examples and, for the same settings, produces the same batches as the
  uninterrupted run, except that examples that sat in a shuffle buffer are lost (`datasets` does not save buffer
  contents); with `shuffle_buffer_size=0` the continuation is exact. A `for` loop that stops early and starts
  again also continues where it stopped.
- `skipped_images` / `skipped_images_by_reason`: unusable images (corrupt, truncated, too small, unsupported
  pixel format) skipped on this rank since the start of training, summed over workers; every batch that brings
  new skips is reported with `logging.warning`.

Each rank reads its own part of the data, and inside a rank each DataLoader worker decodes and augments its own
examples. The split uses `datasets.distributed.split_dataset_by_node`, on the shuffled stream (same seed on every
rank, so the parts are disjoint and together cover the data once per epoch):

- when there are at least as many shards as readers (`world_size * num_workers`), each (rank, worker) pair is a
  reader of whole shards (`split_dataset_by_node(dataset, rank * num_workers + worker, world_size * num_workers,
  strategy="shards")`): no shard is read twice;
- otherwise (few shards, e.g. one imagefolder archive) the ranks split with `split_dataset_by_node(dataset, rank,
  world_size)` (whole shards when `num_shards % world_size == 0`, else every rank reads all shards and keeps every
  `world_size`-th example), and every worker of a rank reads the rank's stream and keeps every `num_workers`-th
  example: the raw bytes are read once per worker, but all workers stay busy.

Do not pass this loader to `accelerator.prepare` (each rank reads its own part: nothing to dispatch). Ranks may
yield different numbers of batches; a DDP loop must stop all ranks together (e.g. a fixed number of steps per
epoch, or `accelerator.join_uneven_inputs`). Batches are returned in a fixed round-robin order over workers (not
arrival order), so the sequence of batches depends only on the data, the seed, the epoch and the settings, and a
resumed run can continue it.

The crops of an example are drawn from `numpy.random.default_rng([seed, epoch, rank, worker, index])`, `index`
counting the examples the worker has read this epoch, so a resumed run reproduces the same crops. Resuming needs the
same `rank`, `world_size`, `num_workers`, `batch_size`, `seed` and `shuffle_buffer_size`.

`build_pretraining_dataloader(source, augmentation=None, batch_size=64, *, split="train", image_column=None, token=None,
streaming=True, **loader_kwargs)` opens `source` (anything `load_image_stream` accepts, or an opened
`IterableDataset`) and returns the loader.
"""

from __future__ import annotations

import copy
import glob
import inspect
import io
import logging
import os
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from PIL import Image, ImageOps

from selfpatch_hf.data.augmentation import MultiCropAugmentation
from selfpatch_hf.data.batched_photometric import NUM_PARAMETERS, apply_photometric, crops_with_parameters

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- sources

_GLOB_CHARS = ("*", "?", "[")
_IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".jfif",
    ".pjpeg",
    ".pjp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".avif",
)
_BUILDER_BY_EXTENSION = {".parquet": "parquet", ".tar": "webdataset", ".arrow": "arrow"}


def _builder_for_files(files: list[str]) -> str:
    """The packaged `datasets` builder that reads all of `files`."""
    builders = set()
    for file in files:
        extension = os.path.splitext(file)[1].lower()
        if extension in _BUILDER_BY_EXTENSION:
            builders.add(_BUILDER_BY_EXTENSION[extension])
        elif extension in _IMAGE_EXTENSIONS:
            builders.add("imagefolder")
        else:
            builders.add(f"unsupported ({extension or 'no extension'})")
    if len(builders) != 1 or next(iter(builders)).startswith("unsupported"):
        raise ValueError(
            f"Cannot tell how to read {len(files)} file(s) with formats {sorted(builders)}: give parquet shards "
            f"(.parquet), webdataset shards (.tar) or image files ({', '.join(_IMAGE_EXTENSIONS[:5])}, ...), "
            "one format per source."
        )
    return builders.pop()


def _looks_like_local_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~", "file://")) or os.path.splitext(source)[1].lower() in (
        *_BUILDER_BY_EXTENSION,
        *_IMAGE_EXTENSIONS,
    )


def hub_dataset_id(source: str) -> str | None:
    """`source` when `load_image_stream` reads it from the Hugging Face Hub, `None` when it is local data (an
    existing path, a glob, or something written as a path). Model cards list only Hub ids as datasets."""
    expanded = os.path.expanduser(source[len("file://") :] if source.startswith("file://") else source)
    if (
        os.path.exists(expanded)
        or any(char in expanded for char in _GLOB_CHARS)
        or _looks_like_local_path(source)
    ):
        return None
    return source


def _load(source: str, split: str, token: str | bool | None, streaming: bool, **kwargs: Any):
    """`datasets.load_dataset` with the source kind resolved and errors explained."""
    expanded = os.path.expanduser(source[len("file://") :] if source.startswith("file://") else source)
    common = {"split": split, "streaming": streaming, **kwargs}
    if any(char in expanded for char in _GLOB_CHARS) and not os.path.exists(expanded):
        files = sorted(path for path in glob.glob(expanded, recursive=True) if os.path.isfile(path))
        if not files:
            raise FileNotFoundError(f"No file matches the pattern {source!r}.")
        return datasets.load_dataset(_builder_for_files(files), data_files={split: files}, **common)
    if os.path.isfile(expanded):
        return datasets.load_dataset(_builder_for_files([expanded]), data_files={split: [expanded]}, **common)
    if os.path.isdir(expanded):
        try:
            return datasets.load_dataset(expanded, **common)
        except (datasets.exceptions.DataFilesNotFoundError, FileNotFoundError) as error:
            raise FileNotFoundError(
                f"No readable data files in the directory {source!r} ({error}). Expected parquet shards, an "
                "imagefolder tree (class folders of images) or webdataset .tar shards."
            ) from error
    if _looks_like_local_path(source):
        raise FileNotFoundError(f"The local path {source!r} does not exist.")
    try:
        return datasets.load_dataset(source, token=token, **common)
    except datasets.exceptions.DatasetNotFoundError as error:
        raise FileNotFoundError(
            f"Dataset {source!r} is neither a local path nor a dataset on the Hugging Face Hub that this token can "
            "read. Check the name; for a gated dataset (e.g. ILSVRC/imagenet-1k) accept its terms on the Hub page "
            "and log in with `hf auth login` or set HF_TOKEN (or pass token=...). "
            f"Original error: {error}"
        ) from error
    except ConnectionError as error:
        raise ConnectionError(
            f"Could not reach the Hugging Face Hub to open {source!r} ({error}). Without network, use a local "
            "directory or glob of parquet / imagefolder / webdataset files (the offline sample dataset: "
            "selfpatch_hf.data.samples.photographs.sample_dataset_path())."
        ) from error


def _find_image_column(features: datasets.Features | None, image_column: str | None) -> str:
    if features is None:
        if image_column is None:
            raise ValueError(
                "This dataset does not declare its features: name the image column with image_column=."
            )
        return image_column
    described = ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"No column {image_column!r} in this dataset. Available columns: {described}.")
        feature = features[image_column]
        usable = isinstance(feature, datasets.Image) or (
            isinstance(feature, datasets.Value)
            and feature.dtype in ("binary", "large_binary", "string", "large_string")
        )
        if not usable:
            raise ValueError(
                f"Column {image_column!r} holds {feature}, not images. Give an Image, binary or image-path column; "
                f"available columns: {described}."
            )
        return image_column
    candidates = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(candidates) != 1:
        found = "no Image column" if not candidates else f"several Image columns {candidates}"
        raise ValueError(
            f"Found {found}; name the one to use with image_column=. Available columns: {described}."
        )
    return candidates[0]


@dataclass(frozen=True)
class ImagePaths:
    """Where image entries that carry only a path (no bytes) may be read from.

    A dataset's content must not make the trainer read arbitrary files or send requests, so a path is followed
    only into what the user named as the source: `local` folders (everything below them) or files, and the files
    of the Hub dataset `hub_dataset` (`hf://datasets/<name>/...`, also inside a zip/tar archive there). Other
    local paths and every URL (http, https, s3, ...) are refused; the image is then skipped as unreadable.
    `ImagePaths()` allows no path at all: images must carry their bytes (parquet, webdataset).
    """

    local: tuple[str, ...] = ()
    hub_dataset: str | None = None

    @classmethod
    def of_folders(cls, *paths: str | os.PathLike) -> ImagePaths:
        return cls(local=tuple(os.path.abspath(os.path.expanduser(os.fspath(p))) for p in paths))

    def allows(self, path: str) -> bool:
        *archives, outer = path.split("::")  # fsspec chains: zip://member::<archive>
        if any(not part.startswith(("zip://", "tar://")) for part in archives):
            return False
        if outer.startswith("file://"):
            outer = outer[len("file://") :]
        if "://" in outer:
            hub = self.hub_dataset
            return hub is not None and outer.startswith((f"hf://datasets/{hub}@", f"hf://datasets/{hub}/"))
        resolved = os.path.abspath(os.path.expanduser(outer))  # normalises "..": no way out of a folder
        return any(
            resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep) for root in self.local
        )

    def describe(self) -> str:
        places = [f"under {root}" for root in self.local[:3]] + (["..."] if len(self.local) > 3 else [])
        if self.hub_dataset:
            places.append(f"in the Hub dataset {self.hub_dataset}")
        return "; ".join(places) if places else "nowhere: this source's images must carry their bytes"


def image_paths_of_source(source: str, streaming: bool = True, cache_dir: str | None = None) -> ImagePaths:
    """The `ImagePaths` a source named by the user allows (see `load_image_stream`): a local folder -> paths
    below it; image files or a glob of them (an imagefolder) -> exactly those files; parquet / webdataset / arrow
    files -> none; a Hub dataset -> its own files (and, with `streaming=False`, the `datasets` download cache its
    files were downloaded to)."""
    expanded = os.path.expanduser(source[len("file://") :] if source.startswith("file://") else source)
    if any(char in expanded for char in _GLOB_CHARS) and not os.path.exists(expanded):
        files = sorted(path for path in glob.glob(expanded, recursive=True) if os.path.isfile(path))
        return ImagePaths.of_folders(
            *(f for f in files if os.path.splitext(f)[1].lower() in _IMAGE_EXTENSIONS)
        )
    if os.path.isfile(expanded):
        is_image = os.path.splitext(expanded)[1].lower() in _IMAGE_EXTENSIONS
        return ImagePaths.of_folders(expanded) if is_image else ImagePaths()
    if os.path.isdir(expanded):
        return ImagePaths.of_folders(expanded)
    caches = () if streaming else tuple(c for c in (cache_dir, datasets.config.HF_DATASETS_CACHE) if c)
    return ImagePaths(local=ImagePaths.of_folders(*caches).local, hub_dataset=source)


def load_image_stream(
    source: str,
    split: str = "train",
    image_column: str | None = None,
    token: str | bool | None = None,
    streaming: bool = True,
    num_shards: int | None = None,
    **load_dataset_kwargs: Any,
) -> tuple[IterableDataset, str]:
    """Open `source` as an `IterableDataset` of undecoded images; returns `(dataset, image_column)`.

    Args:
        source: Hub dataset name, local directory, file or glob (see the module docstring).
        split: the split to read.
        image_column: column holding the images; default: the single `Image` column.
        token: Hub token for gated or private datasets (default: `HF_TOKEN` / the cached login).
        streaming: stream the files (default). `False` downloads and prepares an Arrow copy first (in the `datasets`
            cache), then iterates it with `to_iterable_dataset(num_shards)`.
        num_shards: shards of the iterable made from a prepared dataset (`streaming=False` only); more shards let
            more DataLoader workers read in parallel.
        load_dataset_kwargs: passed to `datasets.load_dataset` (e.g. `name=` for a dataset config, `revision=`).

    The returned dataset's `image_paths` (an `ImagePaths`) says where image entries given only as a path may be
    read from: inside `source` only (`image_paths_of_source`), never at a URL.
    """
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a dataset name or a path, got {source!r}.")
    dataset = _load(source, split, token, streaming, **load_dataset_kwargs)
    if not streaming:
        dataset = dataset.to_iterable_dataset(num_shards=num_shards or 1)
    elif num_shards is not None:
        raise ValueError(
            "num_shards only applies with streaming=False (a streamed dataset keeps its files' shards)."
        )
    dataset, column = as_raw_image_stream(dataset, image_column)
    # travels with the dataset to MultiCropDataLoader, which reads images by path only where this allows
    dataset.image_paths = image_paths_of_source(source, streaming, load_dataset_kwargs.get("cache_dir"))
    return dataset, column


def as_raw_image_stream(
    dataset: IterableDataset, image_column: str | None = None
) -> tuple[IterableDataset, str]:
    """Keep only the image column of an opened `IterableDataset`, undecoded; returns `(dataset, image_column)`."""
    if not isinstance(dataset, IterableDataset):
        raise TypeError(
            f"Expected a datasets.IterableDataset, got {type(dataset).__name__}; convert a Dataset with "
            ".to_iterable_dataset(num_shards=...)."
        )
    column = _find_image_column(dataset.features, image_column)
    dataset = dataset.select_columns([column])
    dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset, column


# --------------------------------------------------------------------------------------------- decoding

SKIP_REASONS = ("unreadable", "too_small", "unsupported_mode")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _read_bytes(
    value: Any, download_config: Any = None, image_paths: ImagePaths | None = None
) -> tuple[bytes | None, str | None]:
    """(bytes, path) of a column value; reads the file when only a path is given and `image_paths` allows it
    (`None`: local files only, for values a caller passes directly)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, (str, os.PathLike)):
        value = {"bytes": None, "path": os.fspath(value)}
    if not isinstance(value, dict):
        raise ImageDecodeError("unreadable", f"unexpected image value of type {type(value).__name__}")
    data, path = value.get("bytes"), value.get("path")
    if data is None:
        if not path or not isinstance(path, str):
            raise ImageDecodeError("unreadable", "image value has neither bytes nor a path")
        remote = "://" in path and not path.startswith("file://")
        allowed = image_paths.allows(path) if image_paths is not None else not remote
        if not allowed:
            where = image_paths.describe() if image_paths is not None else "local files only"
            raise ImageDecodeError(
                "unreadable",
                f"refused to follow the image path {path!r}: image entries without bytes are read only from the "
                f"source you named ({where}), never from URLs",
            )
        try:
            if not remote:
                with open(path[len("file://") :] if path.startswith("file://") else path, "rb") as file:
                    data = file.read()
            else:  # a file of the streamed Hub dataset (hf://..., zip://...::hf://...)
                from datasets.utils.file_utils import xopen

                with xopen(path, "rb", download_config=download_config) as file:
                    data = file.read()
        except Exception as error:  # missing file, network failure, ...: skip this image, keep training
            raise ImageDecodeError("unreadable", f"cannot read {path}: {error}") from error
    return data, path


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        pixels = np.asarray(image).astype(np.int64)
        if mode == "I":
            pixels = np.clip(pixels, 0, 65535)
        if mode != "I" or pixels.max(initial=0) > 255:
            pixels = (pixels * 255 + 32767) // 65535
        return Image.fromarray(pixels.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise ImageDecodeError("unsupported_mode", "float image with NaN or infinite values")
        if pixels.max(initial=0.0) <= 1.0:
            pixels = pixels * 255.0
        pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if mode in ("P", "PA"):
        # Palette transparency is only resolved through RGBA (PIL warns on a direct P -> RGB conversion).
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(
    value: Any, min_size: int = 16, download_config: Any = None, image_paths: ImagePaths | None = None
) -> Image.Image:
    """Decode one image value to an upright RGB PIL image, or raise `ImageDecodeError`.

    A value that is only a path is read if `image_paths` allows it (the data loader passes the source's
    `ImagePaths`); with the default `None` local files are read and URLs refused."""
    if isinstance(value, Image.Image):
        image = value.copy()  # the orientation fix below works in place; leave the caller's image alone
    else:
        data, path = _read_bytes(value, download_config, image_paths)
        where = f" ({path})" if path else ""
        try:
            with warnings.catch_warnings():
                # Oversized images raise DecompressionBombError beyond 2x the limit; below it PIL only warns.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                image.load()  # decode now: truncated or corrupt data fails here, not later
        # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data.
        except Exception as error:
            raise ImageDecodeError("unreadable", f"cannot decode image{where}: {error}") from error
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        pass
    try:
        image = _to_rgb(image)
    except ImageDecodeError:
        raise
    except Exception as error:  # whatever else a conversion raises, one image must not stop training
        raise ImageDecodeError(
            "unsupported_mode", f"cannot convert mode {image.mode} to RGB: {error}"
        ) from error
    if min(image.size) < min_size:
        raise ImageDecodeError(
            "too_small", f"image of {image.width}x{image.height} px is smaller than min_size={min_size}"
        )
    return image


# ---------------------------------------------------------------------------------------------- loading


STATE_VERSION = 1
# datasets >= 5 can hand out whole shards to readers even when they do not divide evenly; older versions fall back
# to their "auto" rule (shards only when num_shards % readers == 0).
_SHARDS_STRATEGY = (
    {"strategy": "shards"} if "strategy" in inspect.signature(split_dataset_by_node).parameters else {}
)
_MAX_SKIP_MESSAGES = 3  # per batch; the counts are complete, the examples in the log are a sample


class MultiCropBatch(NamedTuple):
    global_crops: torch.Tensor  # (B, 2, 3, H, W)
    local_crops: torch.Tensor  # (B, L, 3, h, w)


def _identity(item: Any) -> Any:
    return item


def _init_worker(worker_id: int) -> None:
    # Workers share the machine's cores with the training process: one thread each, or the
    # workers' default thread pools (one thread per core each) oversubscribe the cores.
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # albumentations brings OpenCV; without it there is nothing to limit
        pass
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    import fsspec.asyn

    fsspec.asyn.reset_lock()  # forked fsspec event-loop locks would hang remote reads


class _MultiCropStream(torch.utils.data.IterableDataset):
    """One epoch of one rank, as produced inside each DataLoader worker (or in-process with num_workers=0).

    Yields dicts: batches `{"worker", "end": False, "global_crops", "local_crops", "state", "skip_messages"}`, then
    one `{"worker", "end": True, "state", "skip_messages"}` marker when the worker's stream is exhausted.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        image_column: str,
        augmentation: MultiCropAugmentation,
        batch_size: int,
        drop_last: bool,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        worker_split: str,
        resume: list[dict | None] | None,
        min_image_size: int,
        download_config: Any,
        photometric_on_device: bool = False,
        image_paths: ImagePaths | None = None,
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.augmentation = augmentation
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.worker_split = worker_split
        self.resume = resume
        self.min_image_size = min_image_size
        self.download_config = download_config
        self.photometric_on_device = photometric_on_device
        self.image_paths = image_paths if image_paths is not None else ImagePaths()

    def _examples(self, worker: int, num_workers: int, state: dict) -> tuple[IterableDataset, Iterator[Any]]:
        """(dataset whose state_dict tracks the stream, iterator over this worker's raw image values)."""
        column = self.image_column
        readers = self.world_size * num_workers
        if self.worker_split == "shards":
            # Each (rank, worker) pair is one reader of its own shards. The split is made here rather than by
            # datasets inside DataLoader workers: restoring a worker's state there fails on shuffled multi-shard
            # streams (datasets 5.2 first applies it to the unsplit stream).
            dataset = (
                split_dataset_by_node(
                    self.dataset,
                    rank=self.rank * num_workers + worker,
                    world_size=readers,
                    **_SHARDS_STRATEGY,
                )
                if readers > 1
                else copy.deepcopy(self.dataset)
            )
            dataset.set_epoch(self.epoch)
            if self.resume and self.resume[worker] is not None:
                dataset.load_state_dict(self.resume[worker]["dataset"])
            # .iter() reads this dataset as it is, without datasets' own DataLoader-worker split.
            return dataset, (batch[column][0] for batch in dataset.iter(batch_size=1))

        # Fewer shards than readers: every worker reads the rank's stream and keeps the examples whose index is its
        # own modulo num_workers. All workers resume from the earliest saved position, so their streams stay equal.
        if self.world_size > 1:
            dataset = split_dataset_by_node(self.dataset, rank=self.rank, world_size=self.world_size)
        else:
            dataset = copy.deepcopy(self.dataset)
        dataset.set_epoch(self.epoch)
        saved = [entry for entry in (self.resume or []) if entry is not None and not entry["exhausted"]]
        start = min(saved, key=lambda entry: entry["position"]) if saved else None
        if start is not None:
            dataset.load_state_dict(start["dataset"])
        first_index = start["position"] if start is not None else 0
        own_from = state["position"]

        def own_examples() -> Iterator[Any]:
            for index, batch in enumerate(dataset.iter(batch_size=1), start=first_index):
                state["position"] = index + 1
                if index >= own_from and index % num_workers == worker:
                    yield batch[column][0]

        return dataset, own_examples()

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resumed = self.resume[worker] if self.resume else None
        state = copy.deepcopy(resumed) if resumed is not None else None
        if state is None:
            state = {"dataset": None, "consumed": 0, "position": 0, "skipped": {}, "exhausted": False}
        if state["exhausted"]:
            yield {"worker": worker, "end": True, "state": state, "skip_messages": []}
            return

        dataset, examples = self._examples(worker, num_workers, state)
        augmentation = self.augmentation
        in_worker = info is not None
        skipped = Counter(state["skipped"])
        skip_messages: list[str] = []
        filled = 0

        def new_buffers() -> tuple[torch.Tensor, ...]:
            # uint8 crops, channels last: 4x less to pass between processes than normalised float32 (measured
            # ~2x faster end to end on 2 workers). Allocated in shared memory, so sending them copies nothing.
            global_crops = torch.empty(
                (self.batch_size, 2, *augmentation.global_crop_size, 3), dtype=torch.uint8
            )
            local_crops = torch.empty(
                (self.batch_size, augmentation.num_local_crops, *augmentation.local_crop_size, 3),
                dtype=torch.uint8,
            )
            buffers = [global_crops, local_crops]
            if (
                self.photometric_on_device
            ):  # each crop's photometric decisions, applied on the training device
                buffers.append(
                    torch.empty((self.batch_size, 2 + augmentation.num_local_crops, NUM_PARAMETERS))
                )
            if in_worker:
                for buffer in buffers:
                    buffer.share_memory_()
            return tuple(buffers)

        def emit(end: bool) -> dict:
            nonlocal skip_messages
            snapshot = dict(state, dataset=dataset.state_dict(), skipped=dict(skipped), exhausted=end)
            item = {"worker": worker, "end": end, "state": snapshot, "skip_messages": skip_messages}
            skip_messages = []
            return item

        buffers = new_buffers()
        views = [buffer.numpy() for buffer in buffers]
        try:
            for value in examples:
                index = state["consumed"]
                state["consumed"] = index + 1
                try:
                    image = decode_image(value, self.min_image_size, self.download_config, self.image_paths)
                except ImageDecodeError as error:
                    skipped[error.reason] += 1
                    if len(skip_messages) < _MAX_SKIP_MESSAGES:
                        skip_messages.append(f"{error.reason}: {error}")
                    continue
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, index])
                if self.photometric_on_device:
                    crops = crops_with_parameters(augmentation, image, rng)
                else:
                    crops = augmentation.crops_uint8(image, rng)
                for view, crop in zip(views, crops):
                    view[filled] = crop
                filled += 1
                if filled == self.batch_size:
                    item = emit(end=False)
                    item["crops"] = buffers
                    buffers = new_buffers()
                    views = [buffer.numpy() for buffer in buffers]
                    filled = 0
                    yield item
            if filled and not self.drop_last:
                item = emit(end=False)
                item["crops"] = tuple(buffer[:filled] for buffer in buffers)
                yield item
            yield emit(end=True)
        finally:
            close = getattr(examples, "close", None)
            if close is not None:
                close()


class MultiCropDataLoader:
    """Batches of multi-crop views of a streamed image dataset, for one rank (see the module docstring).

    Args:
        dataset: an `IterableDataset` of raw images (from `load_image_stream`), NOT yet split by rank.
        image_column: its image column.
        augmentation: the multi-crop recipe.
        batch_size: examples per batch (per rank).
        num_workers: DataLoader worker processes (0: decode and augment in the calling process).
        rank, world_size: this process's place in distributed training.
        seed: seed of the shuffle (identical on all ranks, which keeps their parts disjoint) and of the crops.
        shuffle_buffer_size: examples in the shuffle buffer of each worker (0: no example shuffle; shard order is
            still shuffled per epoch by `datasets`).
        drop_last: drop each worker's last incomplete batch.
        min_image_size: images whose shorter side is smaller are skipped.
        pin_memory: pin batches for faster host-to-GPU copies; default: when CUDA is available.
        device: where batches are normalised and returned (e.g. `accelerator.device`): workers hand over uint8
            crops, and normalising them on the GPU moves 4x fewer bytes to it. Default: the CPU.
        prefetch_factor: batches prefetched per worker.
        token: Hub token, for images referenced by remote path (streamed imagefolder repositories).
        augmentation_device: where the photometric ops run. `"workers"` (default): everything in the workers, with
            `augmentation` (OpenCV). `"device"`: workers only decode, crop, resize and flip, and draw each crop's
            photometric parameters from the same per-image generator; colour jitter, grayscale, blur, solarisation
            and normalisation then run batched on `device` (`selfpatch_hf.data.batched_photometric`), which frees
            most of the workers' CPU time when `device` is a GPU.
        image_paths: where image entries given only as a path may be read from (`ImagePaths`); default: what
            `load_image_stream` allowed for its source (`dataset.image_paths`), else nowhere. URLs are never
            followed, so a crafted dataset cannot make training read other files or send requests.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        image_column: str,
        augmentation: MultiCropAugmentation,
        batch_size: int,
        *,
        num_workers: int = 2,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer_size: int = 1000,
        drop_last: bool = True,
        min_image_size: int = 16,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        token: str | bool | None = None,
        device: str | torch.device | None = None,
        augmentation_device: str = "workers",
        image_paths: ImagePaths | None = None,
    ):
        if augmentation_device not in ("workers", "device"):
            raise ValueError(
                f"augmentation_device must be 'workers' or 'device' (the training device), got {augmentation_device!r}."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        if shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        self.image_column = image_column
        self.augmentation = augmentation
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle_buffer_size = int(shuffle_buffer_size)
        self.drop_last = drop_last
        self.min_image_size = int(min_image_size)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.device = torch.device(device) if device is not None else None
        self.prefetch_factor = prefetch_factor
        self.augmentation_device = augmentation_device
        self.download_config = datasets.DownloadConfig(token=token) if token is not None else None
        # image entries given only as a path are read where the source allows (see ImagePaths), else nowhere
        self.image_paths = image_paths or getattr(dataset, "image_paths", None) or ImagePaths()

        if self.shuffle_buffer_size:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
        self.dataset = dataset  # split per (rank, worker) when iterated
        readers = self.world_size * max(1, self.num_workers)
        splittable = dataset.num_shards >= readers and (_SHARDS_STRATEGY or dataset.num_shards % readers == 0)
        self.worker_split = "shards" if splittable else "examples"

        self.epoch = 0
        self._position: dict | None = None  # progress through self.epoch, None before its first batch
        self._skipped_before = Counter()  # finished epochs

    # -- epoch and position -------------------------------------------------------------------------------------

    @property
    def _logical_workers(self) -> int:
        return max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next `for` loop iterates; a saved position of another epoch is dropped."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        if epoch != self.epoch:
            self._finish_epoch_accounting()
            self.epoch = int(epoch)

    def _finish_epoch_accounting(self) -> None:
        if self._position is not None:
            for worker_state in self._position["workers"]:
                if worker_state is not None:
                    self._skipped_before.update(worker_state["skipped"])
        self._position = None

    @property
    def skipped_images_by_reason(self) -> dict[str, int]:
        counts = Counter(self._skipped_before)
        if self._position is not None:
            for worker_state in self._position["workers"]:
                if worker_state is not None:
                    counts.update(worker_state["skipped"])
        return {reason: counts[reason] for reason in SKIP_REASONS if counts[reason]}

    @property
    def skipped_images(self) -> int:
        return sum(self.skipped_images_by_reason.values())

    @property
    def batches_in_epoch(self) -> int:
        """Batches yielded so far in the current epoch."""
        return 0 if self._position is None else self._position["batches"]

    def _settings(self) -> dict[str, int]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle_buffer_size": self.shuffle_buffer_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: JSON-serialisable; save one per rank."""
        return copy.deepcopy(
            {
                "version": STATE_VERSION,
                **self._settings(),
                "epoch": self.epoch,
                "position": self._position,
                "skipped_before": dict(self._skipped_before),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Unknown data loader state version {state.get('version')!r} (expected {STATE_VERSION})."
            )
        different = {
            name: (state.get(name), value)
            for name, value in self._settings().items()
            if state.get(name) != value
        }
        if different:
            details = ", ".join(
                f"{name}: saved {saved}, now {now}" for name, (saved, now) in different.items()
            )
            raise ValueError(
                f"Cannot resume this data stream with different settings ({details}). Resume with the saved "
                "values, or start the epoch over (do not load the data loader state)."
            )
        self.epoch = int(state["epoch"])
        self._position = copy.deepcopy(state["position"])
        self._skipped_before = Counter(state["skipped_before"])

    # -- iteration ----------------------------------------------------------------------------------------------

    def _report_skips(self, worker_state_before: dict | None, item: dict) -> None:
        before = sum(worker_state_before["skipped"].values()) if worker_state_before else 0
        new = sum(item["state"]["skipped"].values()) - before
        if new > 0:
            examples = "; ".join(item["skip_messages"])
            logger.warning(
                "Skipped %d unusable image(s) on rank %d (epoch %d): %s. %d skipped on this rank so far.",
                new,
                self.rank,
                self.epoch,
                examples,
                self.skipped_images,
            )

    def _normalize(self, crops: torch.Tensor) -> torch.Tensor:
        # Without a device, keep the float batch pinned like the uint8 one, for a fast copy by the caller.
        pin = self.pin_memory and self.device is None
        return self.augmentation.normalize(crops, self.device, pin_memory=pin)

    def _finish_batch(self, crops: tuple[torch.Tensor, ...]) -> MultiCropBatch:
        if self.augmentation_device == "workers":
            return MultiCropBatch(self._normalize(crops[0]), self._normalize(crops[1]))
        # the crops go to the device; the parameters stay on the host, where the per-crop decisions are read
        global_crops, local_crops = (
            tensor.to(self.device, non_blocking=True) if self.device is not None else tensor
            for tensor in crops[:2]
        )
        parameters = crops[2]
        mean, std = self.augmentation.mean, self.augmentation.std
        return MultiCropBatch(
            apply_photometric(global_crops, parameters[:, :2], mean, std),
            apply_photometric(local_crops, parameters[:, 2:], mean, std),
        )

    def __iter__(self) -> Iterator[MultiCropBatch]:
        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # parquet streaming otherwise sleeps 5 s per pass
        workers = self._logical_workers
        if self._position is None or self._position["epoch"] != self.epoch:
            self._position = {
                "epoch": self.epoch,
                "batches": 0,
                "next_worker": 0,
                "workers": [None] * workers,
            }
        position = self._position
        resume = position["workers"] if any(entry is not None for entry in position["workers"]) else None
        active = [
            w
            for w in range(workers)
            if position["workers"][w] is None or not position["workers"][w]["exhausted"]
        ]
        stream = _MultiCropStream(
            self.dataset,
            self.image_column,
            self.augmentation,
            self.batch_size,
            self.drop_last,
            self.seed,
            self.epoch,
            self.rank,
            self.world_size,
            self.worker_split,
            copy.deepcopy(resume),
            self.min_image_size,
            self.download_config,
            photometric_on_device=self.augmentation_device == "device",
            image_paths=self.image_paths,
        )
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            worker_init_fn=_init_worker if self.num_workers else None,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )
        pending: list[deque] = [deque() for _ in range(workers)]
        items = iter(loader)
        try:
            while active:
                # Next worker in round-robin order among those not exhausted.
                worker = min(active, key=lambda w: (w - position["next_worker"]) % workers)
                while not pending[worker]:
                    try:
                        item = next(items)
                    except StopIteration:
                        raise RuntimeError(
                            f"Data worker {worker} stopped without finishing its stream."
                        ) from None
                    pending[item["worker"]].append(item)
                item = pending[worker].popleft()
                previous_state, position["workers"][worker] = position["workers"][worker], item["state"]
                self._report_skips(previous_state, item)
                position["next_worker"] = (worker + 1) % workers
                if item["end"]:
                    active.remove(worker)
                    continue
                position["batches"] += 1
                yield self._finish_batch(item["crops"])
        finally:
            del items  # shuts the workers down, also when the caller stops early
        logger.info(
            "Finished epoch %d on rank %d: %d batches, %d images skipped.",
            self.epoch,
            self.rank,
            position["batches"],
            sum(sum(state["skipped"].values()) for state in position["workers"]),
        )
        self._finish_epoch_accounting()
        self.epoch += 1


def build_pretraining_dataloader(
    source: str | IterableDataset,
    augmentation: MultiCropAugmentation | str | None = None,
    batch_size: int = 64,
    *,
    split: str = "train",
    image_column: str | None = None,
    token: str | bool | None = None,
    streaming: bool = True,
    **loader_kwargs: Any,
) -> MultiCropDataLoader:
    """Open `source` and wrap it in a `MultiCropDataLoader` (arguments: see that class and `load_image_stream`).

    `augmentation` defaults to the SelfPatch recipe (`MultiCropAugmentation()`: 2 x 224 px + 8 x 96 px); a string
    names a recipe of `MultiCropAugmentation.from_recipe` ("selfpatch", "dino", "moby": MoBY's two views).
    """
    if augmentation is None or isinstance(augmentation, str):
        augmentation = MultiCropAugmentation.from_recipe(augmentation or "selfpatch")
    if isinstance(source, IterableDataset):  # opened by the caller: paths only where `image_paths=` allows
        dataset, column = as_raw_image_stream(source, image_column)
    else:
        dataset, column = load_image_stream(
            source, split=split, image_column=image_column, token=token, streaming=streaming
        )
    return MultiCropDataLoader(dataset, column, augmentation, batch_size, token=token, **loader_kwargs)


__all__ = [
    "SKIP_REASONS",
    "ImageDecodeError",
    "ImagePaths",
    "MultiCropBatch",
    "MultiCropDataLoader",
    "as_raw_image_stream",
    "build_pretraining_dataloader",
    "decode_image",
    "hub_dataset_id",
    "image_paths_of_source",
    "load_image_stream",
]
