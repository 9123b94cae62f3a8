"""Which blocks (or stages) of a backbone feed a dense head: the defaults and the one check of a user's choice.

- `dense_out_indices`: single-stride heads on a ViT (`Dinov2Backbone`): a third, half, two thirds and all of the
  depth, [4, 6, 8, 12] of 12, the blocks the ViT dense-prediction literature takes (and the SelfPatch reference's
  Mask R-CNN configuration, zero-based [3, 5, 7, 11]).
- `multiscale_out_indices`: the four blocks a multi-scale neck resamples to strides 4, 8, 16 and 32: a quarter,
  half, three quarters and all of the depth, [3, 6, 9, 12] of 12 (the SelfPatch reference's Semantic FPN
  configuration, zero-based [2, 5, 8, 11]).

Block numbers are 1-based, as transformers' backbones name their stages (`stage1` is the output of block 1; `stem`,
the embeddings, is never a useful feature map).
"""

from __future__ import annotations

from collections.abc import Sequence


def _spread(num_hidden_layers: int, fractions: Sequence[float]) -> list[int]:
    indices: list[int] = []
    for fraction in fractions:
        index = max(1, round(num_hidden_layers * fraction))
        indices.append(max(index, indices[-1] + 1) if indices else index)
    return indices


def dense_out_indices(num_hidden_layers: int) -> list[int]:
    """The blocks whose outputs feed a single-stride dense head: [4, 6, 8, 12] for 12 blocks, in general a third,
    half, two thirds and all of the depth (rounded, kept strictly increasing). Needs at least 4 blocks."""
    if num_hidden_layers < 4:
        raise ValueError(
            f"Default out_indices need at least 4 blocks, the backbone has {num_hidden_layers}: pass out_indices "
            f"explicitly (block numbers 1..{num_hidden_layers})."
        )
    return _spread(num_hidden_layers, (1 / 3, 1 / 2, 2 / 3, 1))


def multiscale_out_indices(num_hidden_layers: int) -> list[int]:
    """The four blocks a multi-scale neck turns into strides 4-32: [3, 6, 9, 12] for 12 blocks, in general a
    quarter, half, three quarters and all of the depth (rounded, kept strictly increasing). Needs at least 4."""
    if num_hidden_layers < 4:
        raise ValueError(
            f"A multi-scale neck takes 4 blocks, the backbone has {num_hidden_layers}; it needs at least 4 blocks."
        )
    return _spread(num_hidden_layers, (1 / 4, 1 / 2, 3 / 4, 1))


def checked_out_indices(
    out_indices: Sequence[int] | None,
    num_hidden_layers: int,
    *,
    multi_scale: bool = False,
    unit: str = "block",
) -> list[int]:
    """`out_indices` as a list after checking it (increasing numbers in 1..num_hidden_layers; exactly four for a
    multi-scale neck), or the default for the depth when None."""
    if out_indices is None:
        return (multiscale_out_indices if multi_scale else dense_out_indices)(num_hidden_layers)
    try:
        indices = [int(index) for index in out_indices]
    except (TypeError, ValueError):
        raise ValueError(f"out_indices must be {unit} numbers, got {out_indices!r}.") from None
    if (
        not indices
        or any(not 1 <= index <= num_hidden_layers for index in indices)
        or indices != sorted(set(indices))
    ):
        raise ValueError(
            f"out_indices must be increasing {unit} numbers in 1..{num_hidden_layers} (0 = the embeddings is not a "
            f"useful feature map), got {list(out_indices)}."
        )
    if multi_scale and len(indices) != 4:
        raise ValueError(
            f"A multi-scale neck resamples exactly 4 {unit}s to strides 4, 8, 16, 32; got out_indices {indices}."
        )
    return indices


__all__ = ["checked_out_indices", "dense_out_indices", "multiscale_out_indices"]
