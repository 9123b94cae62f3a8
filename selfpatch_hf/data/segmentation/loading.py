"""Semantic-segmentation data for fine-tuning: any `datasets` dataset with an image and a mask column, label names,
the offline synthetic set, and a resumable per-process batch order.

- `load_segmentation_splits`: a Hub dataset (`scene_parse_150` is ADE20K: columns `image` / `annotation`, 0 =
  "other", use `reduce_labels`), a local folder of parquet / imagefolder files, or `offline-scenes` (the synthetic
  set of `selfpatch_hf.data.samples.synthetic_scenes`, built on first use; what `selfpatch eval make-offline-data` writes
  under `segmentation/`).
- `SegmentationTrainSet` / `SegmentationEvalSet`: examples whose image or mask bytes cannot be decoded are skipped
  and reported (the fine-tuning run takes the next readable example in their place, so every batch stays full and
  the order stays a function of the step; the evaluation set returns a `SkippedExample`); a mask that no setting can
  train on (labels outside the classes, another size than its image, non-integer values) is an error naming the
  example (`ExampleProblem` in the evaluation), which the script turns into one line. `check_evaluation_masks` reads every mask of the evaluation split before training, so that such a mask
  stops the run before any work, not after it.
- `SegmentationBatchSampler`: epoch `e` visits the images in the order `default_rng([seed, e]).permutation`; each
  process takes its own slice of every global batch, and every image is augmented by `default_rng([seed, e, index])`.
  The order and the crops are thus functions of the step, so resuming at step s (`start_batch = s * accumulation`)
  continues exactly where the run stopped, with any number of data workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfpatch_hf.atomic_folders import staged_folder
from selfpatch_hf.data.segmentation.augmentation import (
    SegmentationDataError,
    check_label_range,
    check_mask_size,
)

OFFLINE_SCENES = "offline-scenes"

# ADE20K's 150 SceneParsing classes in label order 1..150 (0 = "other", dropped by reduce_labels), as mmsegmentation's
# ADE20KDataset lists them.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
_MASK_COLUMN_NAMES = ("mask", "annotation", "label", "segmentation", "semantic_segmentation", "seg")


def label_names(spec: str | None, dataset_name: str) -> list[str]:
    """Class names in label order: `ade20k`, `offline-scenes`, a JSON file (a list, or a mapping id -> name), or
    None: from the dataset's name (ADE20K / the offline set)."""
    if spec is None:
        if dataset_name == OFFLINE_SCENES:
            spec = OFFLINE_SCENES
        elif "scene_parse_150" in dataset_name or "ade20k" in dataset_name.lower():
            spec = "ade20k"
        else:
            raise ValueError(
                f"No class names known for {dataset_name!r}: pass --label_names with a JSON file (a list of names, "
                "or a mapping id -> name), `ade20k` or `offline-scenes`."
            )
    if spec == "ade20k":
        return list(ADE20K_CLASSES)
    if spec == OFFLINE_SCENES:
        from selfpatch_hf.data.samples.synthetic_scenes import SEGMENTATION_CLASSES

        return list(SEGMENTATION_CLASSES)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--label_names {spec!r} is neither `ade20k`, `offline-scenes` nor a JSON file.")
    try:
        names = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--label_names {spec}: cannot read it as JSON ({error}).") from None
    shape = f"--label_names {spec} must hold a list of at least 2 class names or a mapping id -> name"
    if isinstance(names, Mapping):
        try:
            ids = sorted(int(key) for key in names)
        except ValueError:
            raise ValueError(f"{shape}; its keys {list(names)[:5]} are no class ids 0, 1, ...") from None
        if len(ids) < 2 or ids != list(range(len(ids))):
            raise ValueError(f"{shape}; its ids must be 0..{len(ids) - 1}, got {ids[:5]}...")
        by_id = {int(key): name for key, name in names.items()}
        return [str(by_id[index]) for index in ids]
    if not isinstance(names, list) or len(names) < 2:
        raise ValueError(f"{shape}.")
    return [str(name) for name in names]


def offline_scenes_path(
    data_dir: str | os.PathLike,
    num_train: int = 240,
    num_eval: int = 80,
    image_size: int = 224,
    seed: int = 0,
) -> Path:
    """The synthetic segmentation set under `data_dir/segmentation` (`selfpatch eval make-offline-data`'s layout),
    built atomically on first use (about 10 s for the default 240 + 80 images of 224 x 224)."""
    from selfpatch_hf.data.samples.synthetic_scenes import make_segmentation_dataset

    target = Path(data_dir) / "segmentation"
    if (target / "data").is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # staged as every model folder is: a build killed half-way leaves a staging folder the next build removes
    with staged_folder(target) as staging:
        make_segmentation_dataset(staging, num_train, num_eval, image_size, seed)
    return target


def load_segmentation_splits(
    dataset_name: str,
    train_split: str,
    eval_split: str | None,
    config_name: str | None = None,
    token: str | None = None,
    offline_data_dir: str | os.PathLike | None = None,
    revision: str | None = None,
):
    """(train, eval or None) `datasets.Dataset`s (map-style: indexable, so the batch order can be resumed).
    `offline_data_dir`: where `offline-scenes` is found or built (default: `default_offline_data_dir()`)."""
    import datasets

    from selfpatch_hf.data.samples.synthetic_scenes import default_offline_data_dir

    source = dataset_name
    if dataset_name == OFFLINE_SCENES:
        source = str(offline_scenes_path(offline_data_dir or default_offline_data_dir()))
    kwargs: dict[str, Any] = {"token": token} if token else {}
    if config_name:
        kwargs["name"] = config_name
    if revision:
        kwargs["revision"] = revision
    train = datasets.load_dataset(source, split=train_split, **kwargs)
    evaluation = datasets.load_dataset(source, split=eval_split, **kwargs) if eval_split else None
    return train, evaluation


def find_columns(dataset, image_column: str | None, mask_column: str | None) -> tuple[str, str]:
    """The image and mask columns: as given, else `image` and the first of mask / annotation / label / ... that is
    an image feature."""
    import datasets

    image_features = [
        name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)
    ]
    image_column = image_column or ("image" if "image" in image_features else None)
    if mask_column is None:
        candidates = [name for name in _MASK_COLUMN_NAMES if name in image_features and name != image_column]
        mask_column = candidates[0] if candidates else None
    for role, column in (("image", image_column), ("mask", mask_column)):
        if column is None:
            raise ValueError(
                f"No {role} column found (columns: {dataset.column_names}); pass --{role}_column with the column "
                f"holding the {role}s."
            )
        if column not in dataset.column_names:
            raise ValueError(
                f"--{role}_column {column!r} is not a column of the dataset (columns: {dataset.column_names})."
            )
        feature = dataset.features[column]
        # a mask may also be an array column; a scalar (a class or a number per image) is neither
        scalar = isinstance(feature, (datasets.Value, datasets.ClassLabel))
        if not isinstance(feature, datasets.Image) and (role == "image" or scalar):
            raise ValueError(
                f"--{role}_column {column!r} holds {feature}, not images (image columns: "
                f"{image_features}); pass the column holding the {role}s."
            )
    return image_column, mask_column


@dataclass(frozen=True)
class SkippedExample:
    """An example whose image or mask cannot be decoded (truncated or corrupt bytes): left out and counted."""

    index: int
    reason: str


@dataclass(frozen=True)
class ExampleProblem:
    """A mask that stops the run: `message` names the example and the fix."""

    message: str


def read_example(dataset, index: int, image_column: str, mask_column: str) -> tuple[Image.Image, Any]:
    """(image, mask) of row `index`, decoded now; corrupt or truncated bytes raise `SkippedExample`'s reason as an
    `OSError`."""
    try:
        row = dataset[int(index)]
        image, mask = row[image_column], row[mask_column]
        for value in (image, mask):
            if isinstance(value, Image.Image):
                value.load()  # PIL decodes lazily: truncated data fails here, not inside the transform
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise OSError(f"cannot decode example {index}: {error}") from error
    return image, mask


class SegmentationTrainSet(torch.utils.data.Dataset):
    """Indexed by `(epoch, index)`: example `index` augmented with `default_rng([seed, epoch, index])`. Bytes that
    cannot be decoded raise an `OSError` (the fine-tuning run replaces the example by the next readable one,
    `selfpatch_hf.data.unreadable_examples`); a mask that cannot be trained on a `ValueError` naming the example."""

    def __init__(
        self,
        dataset,
        image_column: str,
        mask_column: str,
        transform,
        seed: int,
        num_labels: int | None = None,
        ignore_index: int = 255,
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.mask_column = mask_column
        self.transform = transform
        self.seed = seed
        self.num_labels = num_labels
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        epoch, index = key
        image, mask = read_example(self.dataset, index, self.image_column, self.mask_column)
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        try:
            pixels, labels = self.transform(image, mask, rng)
            if self.num_labels is not None:
                check_label_range(labels, self.num_labels, self.ignore_index)
        except ValueError as error:  # the mask: labels, size, non-integer values
            raise ValueError(f"training example {index}: {error}.") from None
        return pixels, labels


class SegmentationEvalSet(torch.utils.data.Dataset):
    """The evaluation images of one process (`indices`), transformed without randomness; an unreadable example is a
    `SkippedExample`, a mask that cannot be scored an `ExampleProblem`."""

    def __init__(self, dataset, image_column: str, mask_column: str, transform, indices: Sequence[int]):
        self.dataset = dataset
        self.image_column = image_column
        self.mask_column = mask_column
        self.transform = transform
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        try:
            image, mask = read_example(self.dataset, index, self.image_column, self.mask_column)
        except OSError as error:
            return SkippedExample(index, str(error))
        try:
            return self.transform(image, mask)
        except ValueError as error:
            return ExampleProblem(f"evaluation example {index}: {error}.")


def check_evaluation_masks(
    dataset,
    image_column: str,
    mask_column: str,
    num_labels: int,
    ignore_index: int,
    prepare: Callable[[Any], np.ndarray],
) -> tuple[list[int], list[SkippedExample]]:
    """Reads every mask of the evaluation split (and its image's size) before training: `(the indices to evaluate,
    the examples that cannot be decoded)`. A mask that cannot be scored raises `SegmentationDataError` naming the
    example. `prepare`: the mask -> class ids of the evaluation (`prepare_mask` with the run's settings)."""
    indices, skipped = [], []
    for index in range(len(dataset)):
        try:
            row = dataset[index]
            image, mask = row[image_column], row[mask_column]
            labels = prepare(mask)  # decodes the mask; the image is read up to its header only (its size)
        except SegmentationDataError:
            raise
        except ValueError as error:  # non-integer values
            raise SegmentationDataError(f"evaluation example {index}: {error}.") from None
        except Exception as error:  # corrupt bytes
            skipped.append(SkippedExample(index, f"cannot decode example {index}: {error}"))
            continue
        try:
            check_mask_size(image, labels)
            check_label_range(labels, num_labels, ignore_index)
        except SegmentationDataError as error:
            raise SegmentationDataError(f"evaluation example {index}: {error}.") from None
        indices.append(index)
    return indices, skipped


class SegmentationBatchSampler(torch.utils.data.Sampler):
    """Endless per-process micro-batches of `(epoch, index)` keys (see the module docstring).

    Global micro-batch b of epoch e holds `permutation_e[b * B * W : (b + 1) * B * W]` (B images per process, W
    processes); process r takes its r-th slice of B. An epoch is `len // (B * W)` micro-batches (the rest dropped).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        self.batches_per_epoch = num_examples // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{num_examples} training images cannot fill one global batch of {batch_size * world_size} "
                f"({world_size} processes x {batch_size}); lower the batch size."
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch = self.start_batch
        while True:
            epoch, within = divmod(batch, self.batches_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            global_size = self.batch_size * self.world_size
            start = within * global_size + self.rank * self.batch_size
            yield [(epoch, int(index)) for index in order[start : start + self.batch_size]]
            batch += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its progress estimate
        return 2**62


def collate_segmentation(examples: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    pixel_values = torch.from_numpy(np.stack([pixels for pixels, _ in examples]))
    labels = torch.from_numpy(np.stack([labels for _, labels in examples]))
    return {"pixel_values": pixel_values, "labels": labels}


__all__ = [
    "ADE20K_CLASSES",
    "OFFLINE_SCENES",
    "ExampleProblem",
    "SegmentationBatchSampler",
    "SegmentationDataError",
    "SegmentationEvalSet",
    "SegmentationTrainSet",
    "SkippedExample",
    "check_evaluation_masks",
    "check_label_range",
    "check_mask_size",
    "collate_segmentation",
    "find_columns",
    "label_names",
    "load_segmentation_splits",
    "offline_scenes_path",
    "read_example",
]
