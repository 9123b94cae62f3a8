"""Pictures of what patch-level pretraining changes (the paper's Figure 1).

- `attention_figure`: for chosen query patches, the patches that receive the top 10% of the query's
  last-layer attention (averaged over heads, prefix tokens excluded), side by side for several backbones.
- `positives_figure`: the positive neighbours the SelfPatch teacher selected for chosen patches (the
  top-k neighbour indices of a teacher forward pass, (N, k) into the row-major h x w patch grid).

Both return a `PIL.Image` (save it as PNG) and are available from the command line:
`python -m selfpatch_hf.evaluation visualize --model A --model B --image photo.jpg --query 0.5,0.5 ...`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..image_conventions import IMAGENET_MEAN, IMAGENET_STD, as_height_width
from .features import FrozenBackbone, resize_image

Query = int | tuple[float, float]

_QUERY_COLOUR = (255, 40, 40)
_KEEP_COLOUR = (255, 200, 0)
_POSITIVE_COLOUR = (40, 220, 80)
_TITLE_HEIGHT = 18


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def resolve_query(query: Query, grid: tuple[int, int]) -> int:
    """A query as a row-major patch index of `grid`: an int is taken as is; (y, x) fractions in [0, 1] of the
    image height and width select the patch under that point."""
    h, w = grid
    if isinstance(query, tuple | list):
        y, x = float(query[0]), float(query[1])
        if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
            raise ValueError(f"Query point {query} must be (y, x) fractions of the image size in [0, 1].")
        return min(int(y * h), h - 1) * w + min(int(x * w), w - 1)
    index = int(query)
    if not 0 <= index < h * w:
        raise ValueError(f"Query patch {index} is outside the {h}x{w} patch grid (0..{h * w - 1}).")
    return index


def query_attention(
    backbone: FrozenBackbone,
    pixel_values: torch.Tensor,
    query_patches: Sequence[int],
    layer: int = -1,
) -> torch.Tensor:
    """Attention of each query patch over the patch tokens: (Q, heads, h, w).

    pixel_values: (1, 3, H, W) in [0, 1]. The backbone must run eager attention
    (`FrozenBackbone.from_pretrained(..., attn_implementation="eager")`). Attention to prefix tokens (CLS,
    registers) is dropped, so a row sums to 1 minus the attention the query pays to them.
    """
    output = backbone.forward_features(pixel_values, output_attentions=True)
    h, w = output.patch_tokens.shape[1:3]
    attention = output.attentions[layer][0]  # (heads, P + h*w, P + h*w)
    prefix = attention.shape[-1] - h * w
    rows = torch.tensor([prefix + int(q) for q in query_patches])
    return attention[:, rows, prefix:].permute(1, 0, 2).reshape(len(query_patches), -1, h, w).float()


def top_fraction_mask(attention: torch.Tensor, fraction: float = 0.1, mode: str = "patches") -> torch.Tensor:
    """Boolean mask over the last two axes (h, w) of the highest-attention patches.

    mode "patches": the ceil(fraction * h * w) patches with the largest attention (the paper's top-10%);
    mode "mass": the smallest set of patches holding `fraction` of the attention mass (DINO's threshold).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    flat = attention.flatten(-2)
    order = flat.argsort(dim=-1, descending=True)
    if mode == "patches":
        keep_sorted = torch.zeros_like(flat, dtype=torch.bool)
        keep_sorted[..., : max(1, math.ceil(fraction * flat.shape[-1]))] = True
    elif mode == "mass":
        sorted_values = flat.gather(-1, order)
        cumulative = sorted_values.cumsum(-1) / sorted_values.sum(-1, keepdim=True).clamp_min(1e-12)
        keep_sorted = (
            cumulative - sorted_values / sorted_values.sum(-1, keepdim=True).clamp_min(1e-12)
        ) < fraction
    else:
        raise ValueError(f"Unknown mode {mode!r}; choose 'patches' or 'mass'.")
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.view_as(attention)


def _cell_box(index: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = grid
    height, width = size
    row, col = divmod(index, w)
    return (
        round(col * width / w),
        round(row * height / h),
        round((col + 1) * width / w) - 1,
        round((row + 1) * height / h) - 1,
    )


def _highlight(image: Image.Image, keep: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """Dim and grey the image outside `keep` (h, w); tint the kept cells with `colour`."""
    array = np.asarray(image, dtype=np.float32)
    height, width = array.shape[:2]
    h, w = keep.shape
    rows = np.minimum((np.arange(height) * h) // height, h - 1)
    cols = np.minimum((np.arange(width) * w) // width, w - 1)
    kept = keep[rows][:, cols][..., None]
    grey = array.mean(axis=-1, keepdims=True)
    dimmed = 0.35 * grey + 0.1 * array
    tinted = 0.65 * array + 0.35 * np.asarray(colour, dtype=np.float32)
    return Image.fromarray(np.where(kept, tinted, dimmed).clip(0, 255).astype(np.uint8))


def _outline(
    image: Image.Image, index: int, grid: tuple[int, int], colour: tuple[int, int, int]
) -> Image.Image:
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = _cell_box(index, grid, (image.height, image.width))
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=max(1, min(image.size) // 112))
    return image


def _grid_figure(cells: list[list[Image.Image]], titles: list[str]) -> Image.Image:
    """Rows of equally sized cells under a title strip."""
    cell_w, cell_h = cells[0][0].size
    columns = max(len(row) for row in cells)
    figure = Image.new("RGB", (columns * cell_w, _TITLE_HEIGHT + len(cells) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    for column, title in enumerate(titles):
        draw.text((column * cell_w + 3, 3), title[: max(4, cell_w // 6)], fill=(0, 0, 0), font=font)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            figure.paste(cell, (c * cell_w, _TITLE_HEIGHT + r * cell_h))
    return figure


def attention_figure(
    image: Image.Image | np.ndarray,
    backbones: Mapping[str, FrozenBackbone | str],
    queries: Sequence[Query],
    image_size: int | Sequence[int] = 224,
    fraction: float = 0.1,
    mode: str = "patches",
    per_head: bool = False,
    layer: int = -1,
) -> Image.Image:
    """One row per query: the input with the query patch outlined, then for each backbone the patches with
    the top `fraction` of the query's attention (mean over heads; with `per_head`, also each head).

    backbones: name -> `FrozenBackbone` loaded with attn_implementation="eager", or a path / Hub id.
    queries: patch indices (same grid for every backbone) or (y, x) image fractions.
    image_size: the network input size, int (square) or (height, width); multiples of the patch sizes.
    """
    if not backbones:
        raise ValueError("Give at least one backbone.")
    if not queries:
        raise ValueError("Give at least one query patch.")
    models = {
        name: FrozenBackbone.from_pretrained(b, attn_implementation="eager") if isinstance(b, str) else b
        for name, b in backbones.items()
    }
    size = as_height_width(image_size)
    picture = _as_pil(image).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    pixel_values = resize_image(picture, size)[None]

    grids = {name: (size[0] // m.patch_size, size[1] // m.patch_size) for name, m in models.items()}
    if any(isinstance(q, int) for q in queries) and len(set(grids.values())) > 1:
        raise ValueError(
            f"The backbones have different patch grids {sorted(set(grids.values()))}; give the queries as "
            "(y, x) image fractions instead of patch indices."
        )
    rows: list[list[Image.Image]] = [[] for _ in queries]
    titles = ["query"]
    first_grid = next(iter(grids.values()))
    for row, query in zip(rows, queries, strict=True):
        row.append(_outline(picture.copy(), resolve_query(query, first_grid), first_grid, _QUERY_COLOUR))
    for name, model in models.items():
        grid = grids[name]
        indices = [resolve_query(q, grid) for q in queries]
        attention = query_attention(model, pixel_values, indices, layer)  # (Q, heads, h, w)
        maps = [attention.mean(dim=1)] + (
            [attention[:, i] for i in range(attention.shape[1])] if per_head else []
        )
        titles += [name] + ([f"{name} h{i}" for i in range(attention.shape[1])] if per_head else [])
        for attention_map in maps:
            keep = top_fraction_mask(attention_map, fraction, mode).numpy()
            for row, index, kept in zip(rows, indices, keep, strict=True):
                row.append(_outline(_highlight(picture, kept, _KEEP_COLOUR), index, grid, _QUERY_COLOUR))
    return _grid_figure(rows, titles)


def positives_figure(
    image: Image.Image | np.ndarray,
    grid: tuple[int, int],
    query_patches: Sequence[Query],
    positive_indices: torch.Tensor | np.ndarray,
) -> Image.Image:
    """For each query patch: the patch (red outline) and its positive neighbours (green), others dimmed.

    image: the view the teacher saw (PIL or H x W x 3 array), shown as is.
    grid: (h, w) patch grid of that view.
    positive_indices: (N, k) or (1, N, k) integer indices into the row-major h x w grid, as returned by the
        SelfPatch teacher's neighbour matching.
    """
    h, w = grid
    positives = torch.as_tensor(np.asarray(positive_indices)).long()
    if positives.ndim == 3:
        if positives.shape[0] != 1:
            raise ValueError("positive_indices has a batch dimension: pass the (N, k) indices of one image.")
        positives = positives[0]
    if positives.ndim != 2 or positives.shape[0] != h * w:
        raise ValueError(
            f"positive_indices must have shape ({h * w}, k) for a {h}x{w} grid, got {tuple(positives.shape)}."
        )
    if positives.numel() and (positives.min() < 0 or positives.max() >= h * w):
        raise ValueError(f"positive_indices must lie in [0, {h * w}).")
    picture = _as_pil(image)
    cells, titles = [], []
    for query in query_patches:
        index = resolve_query(query, grid)
        keep = np.zeros(h * w, dtype=bool)
        keep[positives[index].numpy()] = True
        cell = _highlight(picture, keep.reshape(h, w), _POSITIVE_COLOUR)
        for positive in positives[index].tolist():
            _outline(cell, positive, grid, _POSITIVE_COLOUR)
        cells.append(_outline(cell, index, grid, _QUERY_COLOUR))
        titles.append(f"patch {index}")
    return _grid_figure([cells], titles)


@torch.no_grad()
def teacher_positives(
    model, image: Image.Image | np.ndarray, image_size: int | Sequence[int] | None = None
) -> tuple[Image.Image, tuple[int, int], torch.Tensor]:
    """Runs the SelfPatch teacher of a `SelfPatchViTForPretraining` on one image, as during pretraining.

    The image is resized (bicubic) to `image_size` (default: the config's global crop size) and normalised with
    ImageNet statistics, like a training crop. Returns the resized picture, its `(h, w)` patch grid and the
    teacher's `(N, k)` positive indices, ready for `positives_figure`.
    """
    from ..modeling_selfpatch import select_positive_neighbors

    config = model.config
    height, width = as_height_width(image_size if image_size is not None else config.global_crop_size)
    patch = config.patch_size
    if height % patch or width % patch:
        raise ValueError(f"image_size {height}x{width} is not divisible by the patch size {patch}.")
    picture = _as_pil(image).resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    pixels = ((pixels - mean) / std).permute(2, 0, 1)[None]
    parameter = next(model.teacher.parameters())
    features, _ = model.teacher.encode(pixels.to(parameter.device, parameter.dtype))
    grid = (height // patch, width // patch)
    positives = select_positive_neighbors(features, grid, config.num_positives, config.neighborhood_size)
    return picture, grid, positives[0].cpu()
