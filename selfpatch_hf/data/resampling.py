"""Random resized crops of a batch of images in a few batched matrix products (`--augmentation_device device_crops`).

An antialiased resize is separable: along each axis, output pixel `i` of a crop is a weighted sum of the source
pixels near `crop_start + (i + 0.5) * scale` (`scale = crop_length / output_length`), with the filter (bicubic with
a = -0.5, or the triangle of bilinear) stretched by `scale` when shrinking. These are the weights of PIL's
`Image.resize` and of `torch.nn.functional.interpolate(..., antialias=True)`, which the CPU path runs per crop
(`MultiCropAugmentation.resize_crop`). Written out as a dense matrix per crop and axis (zero outside the crop's
taps), a whole batch of crops of differently sized boxes, of images of different sizes, becomes:

    rows  = images (n, 3 * H, W) @ Wx^T of all crops of each image (n, W, V * w)     horizontal pass, one bmm
    crops = Wy (n * V, h, H)     @ rows of each crop              (n * V, H, 3 * w)  vertical pass, one bmm per size

with `H, W` the largest image of the group (smaller images are zero-padded; their weights never reach the padding).
A horizontal flip is the same matrix with its output columns reversed, so it costs nothing.

Numerics: float32 throughout, the horizontal pass first and clamped to [0, 255] as PIL's 8-bit intermediate is,
without its two roundings to 8 bits: against the CPU path's uint8 resize (torch's PIL-compatible integer kernel)
the crops agree within 1 grey level (tests/test_device_crops.py measures the exact figures, docs/data.md lists them).
On a GPU with TF32 matmuls allowed (the training script's default) the products round to TF32 (10-bit mantissa).
"""

from __future__ import annotations

import math

import torch

# Half-width of each filter at scale 1, in source pixels (torch's `interp_size / 2`).
FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's and torch's antialiased bicubic)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_(min=0.0)


_FILTERS = {"bicubic": _bicubic, "bilinear": _triangle}


def resampling_weights(
    starts: torch.Tensor,
    lengths: torch.Tensor,
    extent: int,
    out_size: int,
    interpolation: str = "bicubic",
    flips: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense 1-D resampling matrices of N crops: `(N, out_size, extent)` float32 on `device`.

    Row `i` of crop `n` holds the weights with which source positions `0 .. extent - 1` make output pixel `i` of the
    crop `[starts[n], starts[n] + lengths[n])` resized to `out_size`, antialiased (PIL / torch
    `interpolate(antialias=True)`: taps clipped to the crop and renormalised). `flips[n]` reverses the output.
    `starts`, `lengths` (and `flips`) are host tensors: the number of taps is read from them without a device sync.
    """
    if interpolation not in _FILTERS:
        raise ValueError(f"interpolation must be one of {tuple(_FILTERS)}, got {interpolation!r}.")
    count = int(starts.numel())
    if count == 0:
        return torch.zeros(0, out_size, extent, device=device)
    largest_scale = max(float(lengths.max()) / out_size, 1.0)
    taps = int(math.ceil(2.0 * FILTER_SUPPORT[interpolation] * largest_scale)) + 2
    # The tap window in float64 on the small (N, out) grid: int() of a bound that lands on a whole number must
    # truncate as torch's C++ does.
    starts = starts.to(device=device, dtype=torch.float64).view(-1, 1)
    lengths = lengths.to(device=device, dtype=torch.float64).view(-1, 1)
    scale = lengths / out_size
    support = FILTER_SUPPORT[interpolation] * scale.clamp(min=1.0)
    centre = scale * (
        torch.arange(out_size, device=device, dtype=torch.float64) + 0.5
    )  # (N, out), crop coords
    first = torch.trunc(centre - support + 0.5).clamp_(min=0.0)
    stop = torch.minimum(torch.trunc(centre + support + 0.5), lengths)
    positions = first.unsqueeze(-1) + torch.arange(taps, device=device, dtype=torch.float64)  # (N, out, taps)
    weights = _FILTERS[interpolation](
        (positions - centre.unsqueeze(-1) + 0.5) / scale.clamp(min=1.0).unsqueeze(-1)
    )
    weights = weights * (positions < stop.unsqueeze(-1))
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(torch.float32)
    index = (positions + starts.unsqueeze(-1)).long()  # absolute source positions; the unused taps lie beyond
    if flips is not None:
        flipped = flips.to(device=device, dtype=torch.bool).view(-1, 1, 1)
        weights = torch.where(flipped, weights.flip(1), weights)
        index = torch.where(flipped, index.flip(1), index)
    # unused taps land in the `taps` spare columns past the crop's end (all positions of a row are distinct)
    dense = torch.zeros(count, out_size, extent + taps, device=device)
    dense.scatter_(2, index, weights)
    return dense[..., :extent]


def resize_crops(
    images: torch.Tensor,
    boxes: torch.Tensor,
    sizes: list[tuple[int, int]],
    counts: list[int],
    interpolation: str = "bicubic",
    flips: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Antialiased resized crops of a batch of images, grouped by output size.

    Args:
        images: `(n, 3, H, W)` float32 pixels in [0, 255] (zero-padded to a common size).
        boxes: `(n, V, 4)` integer `(top, left, height, width)` of each image's V crops, inside its own image (a host
            tensor: the weights are built from it on the images' device without a sync).
        sizes: output `(height, width)` of each group of crops; `counts[g]` crops of each image have `sizes[g]`,
            in order (e.g. the 2 global crops, then the L local crops).
        flips: `(n, V)` bool host tensor, horizontal flip of each crop.

    Returns one `(n, counts[g], 3, height, width)` float32 tensor in [0, 255] per group.
    """
    n, channels, height, width = images.shape
    if sum(counts) != boxes.shape[1] or boxes.shape[0] != n or len(sizes) != len(counts):
        raise ValueError(
            f"boxes {tuple(boxes.shape)} do not match {n} images with {counts} crops of sizes {sizes}."
        )
    device = images.device
    column_weights, row_weights, first = [], [], 0
    for (out_height, out_width), count in zip(sizes, counts):
        if count == 0:
            row_weights.append(None)
            continue
        group = boxes[:, first : first + count].reshape(-1, 4)
        group_flips = flips[:, first : first + count].reshape(-1) if flips is not None else None
        wx = resampling_weights(
            group[:, 1], group[:, 3], width, out_width, interpolation, group_flips, device
        )
        column_weights.append(wx.reshape(n, count * out_width, width))
        row_weights.append(
            resampling_weights(group[:, 0], group[:, 2], height, out_height, interpolation, device=device)
        )
        first += count
    # horizontal pass of every crop of every image at once: (n, 3H, W) @ (n, W, sum V w)
    all_columns = torch.cat(column_weights, dim=1).transpose(1, 2)
    rows = torch.bmm(images.reshape(n, channels * height, width), all_columns).clamp_(0.0, 255.0)
    out, column = [], 0
    for (out_height, out_width), count, wy in zip(sizes, counts, row_weights):
        if count == 0:
            out.append(images.new_zeros(n, 0, channels, out_height, out_width))
            continue
        span = count * out_width
        # (n, 3, H, V, w) -> (n V, H, 3 w): each crop's rows as one matrix for the vertical pass
        group_rows = rows[:, :, column : column + span].reshape(n, channels, height, count, out_width)
        group_rows = group_rows.permute(0, 3, 2, 1, 4).reshape(n * count, height, channels * out_width)
        crops = torch.bmm(wy, group_rows).clamp_(0.0, 255.0)  # (n V, h, 3 w)
        crops = crops.view(n, count, out_height, channels, out_width).permute(0, 1, 3, 2, 4)
        out.append(crops.contiguous())
        column += span
    return out


__all__ = ["FILTER_SUPPORT", "resampling_weights", "resize_crops"]
