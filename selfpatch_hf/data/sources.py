"""Image sources for pretraining: a Hub dataset, local parquet / imagefolder / webdataset files, or a glob of them,
opened through `datasets` as a stream of undecoded images.

`load_image_stream(source, split="train", image_column=None, token=None, streaming=True, num_shards=None,
**load_dataset_kwargs)` returns `(dataset, image_column)`, where `dataset` holds only the image column, typed
`datasets.Image(decode=False)`: each example is `{image_column: {"bytes": ..., "path": ...}}`, decoded later
(`selfpatch_hf.data.decoding`, in DataLoader workers or on the training device), so that one corrupt file is skipped
instead of raising inside `datasets`. `as_raw_image_stream(dataset, image_column=None)` does the same for a dataset
the caller opened.

`source` may be:

- a local directory: parquet shards, an imagefolder tree or webdataset `.tar` shards (the builder is inferred by
  `datasets` from the files, as `load_dataset(directory)` does);
- a local file or a glob (`"/data/shards/*.parquet"`, `"/data/**/*.jpg"`): `.parquet` -> parquet,
  `.tar` -> webdataset, image files -> imagefolder;
- otherwise a Hub dataset name (`"ILSVRC/imagenet-1k"`). Gated and private datasets use `token`, else the token
  from the usual places (`HF_TOKEN`, `hf auth login`).

The image column is the dataset's single `Image` feature unless `image_column` names one (an `Image`, binary or
path-string column). Labels and every other column are dropped.

An entry that is only a path is followed only inside the source the user named (`ImagePaths`: the local folder or
image files, or the Hub dataset's own files; `image_paths_of_source`), never to a URL: a crafted dataset cannot make
training read other files or send requests. `hub_dataset_id(source)` tells a Hub id from local data (model cards list
only Hub ids as datasets).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

import datasets
from datasets import IterableDataset

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


__all__ = [
    "ImagePaths",
    "as_raw_image_stream",
    "hub_dataset_id",
    "image_paths_of_source",
    "load_image_stream",
]
