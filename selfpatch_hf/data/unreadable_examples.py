"""Training examples whose image (or mask) cannot be read, in the map-style data of the fine-tuning scripts: skipped
and counted, never the end of a long run.

`SkipUnreadable` wraps a dataset indexed by `(epoch, index)` keys: an example whose image bytes are corrupt, truncated
or missing is replaced by the next readable example of the split (the same replacement on every run, so resuming
stays exact), and the reasons travel with the batch under `SKIPPED_KEY` (`collate_with_skipped`), where the training
loop counts and reports them. Many unreadable examples in a row mean broken data, not bad luck: a `ValueError` then
names the first of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from selfpatch_hf.data.decoding import ImageDecodeError

SKIPPED_KEY = "skipped_examples"  # in a collated batch: the reasons of the examples replaced in it
# what reading a corrupt, truncated or missing image raises: PIL's UnidentifiedImageError and "image file is
# truncated" are OSErrors, some broken PNG chunks a SyntaxError, our own decoder an ImageDecodeError
UNREADABLE_ERRORS = (OSError, SyntaxError, ImageDecodeError)


class SkipUnreadable(torch.utils.data.Dataset):
    """`dataset[(epoch, index)]`, or when it cannot be read, `dataset[(epoch, index + 1)]` and so on, at most
    `max_consecutive` tries; each item is `(example, [reasons of the examples skipped for it])`."""

    def __init__(self, dataset: torch.utils.data.Dataset, max_consecutive: int = 16):
        self.dataset = dataset
        self.max_consecutive = max_consecutive

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, list[str]]:
        epoch, index = key
        skipped: list[str] = []
        for attempt in range(min(self.max_consecutive, len(self.dataset))):
            position = (int(index) + attempt) % len(self.dataset)
            try:
                return self.dataset[(epoch, position)], skipped
            except UNREADABLE_ERRORS as error:
                skipped.append(f"training example {position}: {type(error).__name__}: {error}")
        raise ValueError(
            f"{len(skipped)} consecutive training examples cannot be read, the first {skipped[0]}: the data looks "
            "broken (check the image column and its files)"
        )


class collate_with_skipped:  # noqa: N801 -- used like the collate function it wraps
    """`collate` over the examples, plus the reasons of the replaced ones under `SKIPPED_KEY` (a class, not a
    closure, so that data workers started with spawn can pickle it)."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]):
        self.collate = collate

    def __call__(self, items: list[tuple[Any, list[str]]]) -> dict[str, Any]:
        batch = self.collate([example for example, _ in items])
        batch[SKIPPED_KEY] = [reason for _, reasons in items for reason in reasons]
        return batch


__all__ = ["SKIPPED_KEY", "UNREADABLE_ERRORS", "SkipUnreadable", "collate_with_skipped"]
