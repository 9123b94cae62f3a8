"""Reading foreign `.pth` checkpoints safely, and the key checks every converter makes.

`read_checkpoint` never runs an unrestricted unpickler: `torch.load(weights_only=True)` with two extra allowed
globals, the `argparse.Namespace` the DINO / SelfPatch scripts save as `args` and MoBY's yacs `CfgNode` config,
read as a plain `OrderedDict`. `check_keys` fails listing every missing, unexpected and mis-shaped key (there is no
non-strict loading anywhere in the converters); `non_finite_keys` names tensors holding NaN or infinity; `sizes_of`
and `majority` read a dimension off every tensor that shows it, so that one damaged tensor is reported as the one
mis-shaped key instead of making its well-shaped siblings look wrong.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class ConversionError(ValueError):
    """The file is not a supported checkpoint, or its keys do not match the reference format."""


# MoBY's `save_checkpoint` pickles its yacs `CfgNode` config (a dict subclass): read it as a plain OrderedDict, so
# that neither yacs nor any code of the file's is needed. Nothing else outside torch's allow-list is accepted.
_YACS_CONFIG_AS_DICT = (OrderedDict, "yacs.config.CfgNode")


def read_checkpoint(path: str | Path) -> Any:
    """The object saved in `path`, read with `torch.load(weights_only=True)` on the CPU; `ConversionError` for a
    file that needs any global beyond tensors, plain containers, `argparse.Namespace` and yacs configs."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace, _YACS_CONFIG_AS_DICT]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # UnpicklingError for disallowed globals, RuntimeError for non-torch files
        raise ConversionError(
            f"{path} cannot be read as a PyTorch checkpoint with torch.load(weights_only=True): {error}\n"
            "Only tensors, plain containers and argparse.Namespace are accepted; this converter never runs an "
            "unrestricted unpickler on downloaded files."
        ) from error


def is_tensor_dict(value: Any) -> bool:
    import torch

    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Removes `prefix` from every key when all keys carry it (DDP's `module.`, wrappers' `backbone.`)."""
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return dict(state)


def listing(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], where: str, hint: str = ""
) -> None:
    """Fails listing every missing, unexpected and mis-shaped key (never a silent non-strict load)."""
    missing = [key for key in expected if key not in actual]
    unexpected = [key for key in actual if key not in expected]
    misshaped = [
        f"{key}: {tuple(actual[key].shape)} (expected {expected[key]})"
        for key in expected
        if key in actual and tuple(actual[key].shape) != tuple(expected[key])
    ]
    if missing or unexpected or misshaped:
        lines = [f"{where} does not match the reference format{hint}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {listing(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped keys ({len(misshaped)}): {listing(misshaped)}")
        raise ConversionError("\n".join(lines))


def non_finite_keys(state: Mapping[str, Any]) -> list[str]:
    """The keys of floating-point tensors that hold NaN or infinity."""
    import torch

    return [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


def sizes_of(state: Mapping[str, torch.Tensor], where: Iterable[tuple[str, int]]) -> list[int]:
    """The size along `axis` of each named tensor that exists and has that axis."""
    sizes = []
    for key, axis in where:
        tensor = state.get(key)
        if tensor is not None and tensor.ndim > (axis if axis >= 0 else -axis - 1):
            sizes.append(int(tensor.shape[axis]))
    return sizes


def majority(sizes: list[int]) -> int | None:
    """The most frequent size (ties: the first seen); None when nothing shows it."""
    return Counter(sizes).most_common(1)[0][0] if sizes else None


def numbered(state: Mapping[str, Any], pattern: str) -> list[int]:
    """The sorted distinct integers that `pattern`'s first group matches at the start of the keys."""
    return sorted({int(m.group(1)) for key in state if (m := re.match(pattern, key))})


__all__ = [
    "ConversionError",
    "check_keys",
    "is_tensor_dict",
    "listing",
    "majority",
    "non_finite_keys",
    "numbered",
    "read_checkpoint",
    "sizes_of",
    "strip_prefix",
]
