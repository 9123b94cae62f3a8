"""Image conventions shared by training, export and evaluation (no heavy imports: data workers load this).

- `IMAGENET_MEAN` / `IMAGENET_STD`: the pixel statistics every backbone here is trained and evaluated with (equal to
  transformers' `IMAGENET_DEFAULT_MEAN` / `IMAGENET_DEFAULT_STD`, which the exported image processors also carry).
- `as_height_width`: the one reading of a size given as `224` or `(height, width)`.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SizeLike = int | Sequence[int]


def as_height_width(size: SizeLike, name: str = "size") -> tuple[int, int]:
    """`224` or `(height, width)` -> `(height, width)`; raises a `ValueError` naming `name` for anything else."""
    if isinstance(size, bool):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}.")
    if isinstance(size, int):
        size = (size, size)
    try:
        pair = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}.") from None
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}.")
    return pair


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SizeLike", "as_height_width"]
