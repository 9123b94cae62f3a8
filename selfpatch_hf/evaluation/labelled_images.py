"""The labelled image splits of image-level evaluation (`selfpatch eval linear`): an image column read undecoded
and decoded on use (unreadable images skipped, counted and warned once each), integer labels checked against the
class list, and the class names of a `ClassLabel` column."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from selfpatch_hf.data.decoding import decode_image
from selfpatch_hf.data.unreadable_examples import UNREADABLE_ERRORS

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("label", "labels", "class", "category", "fine_label")  # found by name when none is given


@dataclass
class LabelledSplit:
    """One split's images (decoded when read; unreadable ones are skipped and counted) and integer labels."""

    dataset: Any
    image_column: str
    labels: np.ndarray
    raw_images: bool  # the image column is a `datasets.Image` read undecoded (we decode and skip)
    unreadable: set[int]

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices: Sequence[int]) -> list[Image.Image | None]:
        """The images at `indices`, None for an unreadable one (also recorded in `unreadable`)."""
        values = self.dataset[[int(i) for i in indices]][self.image_column] if len(indices) else []
        images: list[Image.Image | None] = []
        for index, value in zip(indices, values, strict=True):
            try:
                if self.raw_images or isinstance(value, Image.Image):
                    images.append(decode_image(value, min_size=1))
                else:
                    images.append(Image.fromarray(np.asarray(value)).convert("RGB"))
            except (*UNREADABLE_ERRORS, TypeError, ValueError) as error:  # also arrays that are no image
                if int(index) not in self.unreadable:
                    logger.warning("skipping image %d: %s", int(index), str(error).splitlines()[0])
                self.unreadable.add(int(index))
                images.append(None)
        return images


def _label_names(dataset, label_column: str) -> list[str] | None:
    import datasets

    feature = (dataset.features or {}).get(label_column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def find_label_column(train_dataset, eval_dataset, image_column: str, label_column: str | None) -> str:
    """`label_column`, or the first of `LABEL_COLUMNS` the training split has; ValueError (naming the options) when
    a split lacks it or the image column."""
    if label_column is None:
        label_column = next((c for c in LABEL_COLUMNS if c in train_dataset.column_names), None)
    for name, dataset in (("train", train_dataset), ("eval", eval_dataset)):
        missing = [c for c in (image_column, label_column) if c is None or c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"The {name} split has columns {dataset.column_names}, not {missing[0] or 'a label column'!r}; "
                "pass the image and label column names (--image-column / --label-column)."
            )
    return label_column


def prepare_splits(
    train_dataset,
    eval_dataset,
    image_column: str = "image",
    label_column: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[LabelledSplit, LabelledSplit, list[str]]:
    """The two splits and the class names; ValueError (one line, naming the fix) for missing columns, labels out of
    range or a training split with a single class."""
    import datasets

    label_column = find_label_column(train_dataset, eval_dataset, image_column, label_column)
    splits = []
    for dataset, limit in ((train_dataset, max_train_samples), (eval_dataset, max_eval_samples)):
        if limit is not None and limit < len(dataset):
            dataset = dataset.select(range(limit))
        labels = np.asarray(dataset.select_columns([label_column]).with_format("numpy")[label_column])
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"Column {label_column!r} holds {labels.dtype} values of shape {labels.shape[1:]}, not one integer "
                "class per image; pass the label column (--label-column)."
            )
        raw = isinstance((dataset.features or {}).get(image_column), datasets.Image)
        if raw:
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        splits.append(LabelledSplit(dataset.select_columns([image_column]), image_column, labels, raw, set()))
    train, evaluation = splits
    if len(train) == 0 or len(evaluation) == 0:
        raise ValueError("A split has no images; give splits with labelled images.")
    names = _label_names(train_dataset, label_column)
    num_labels = len(names) if names else int(max(train.labels.max(), evaluation.labels.max())) + 1
    for name, split in (("train", train), ("eval", evaluation)):
        low, high = int(split.labels.min()), int(split.labels.max())
        if low < 0 or high >= num_labels:
            raise ValueError(
                f"The {name} split has labels {low}..{high}, outside 0..{num_labels - 1} (-1 marks an unlabelled "
                "image, e.g. ImageNet's test split): evaluate a labelled split (--eval-split / --train-split)."
            )
    if len(np.unique(train.labels)) < 2:
        raise ValueError(
            f"The training split has a single class ({int(train.labels[0])}): a classifier needs at least two; "
            "check --label-column and --train-split."
        )
    return train, evaluation, names or [str(i) for i in range(num_labels)]


__all__ = ["LABEL_COLUMNS", "LabelledSplit", "find_label_column", "prepare_splits"]
