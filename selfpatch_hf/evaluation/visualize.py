"""Pictures of what patch-level pretraining changes (the paper's Figure 1).

- `attention_figure`: for chosen query patches, the patches that receive the top 10% of the query's
  last-layer attention (averaged over heads, prefix tokens excluded), side by side for several backbones.
- `positives_figure`: the positive neighbours the SelfPatch teacher selected for chosen patches (the
  top-k neighbour indices of a teacher forward pass, (N, k) into the row-major h x w patch grid).

Both return a `PIL.Image` that says what it shows (column titles, row labels, a caption; `save_figure` writes it as
PNG with the caption as its "Description") and are available from the command line:
`python -m selfpatch_hf.evaluation visualize --model A --model B --image photo.jpg --query 0.5,0.5 ...`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from selfpatch_hf.evaluation.configs import AttentionFigureConfig
from selfpatch_hf.evaluation.features import FrozenBackbone, resize_image
from selfpatch_hf.image_conventions import IMAGENET_MEAN, IMAGENET_STD, as_height_width

Query = int | tuple[float, float]

_QUERY_COLOUR = (255, 40, 40)
_KEEP_COLOUR = (255, 200, 0)
_POSITIVE_COLOUR = (40, 220, 80)
DEFAULT_SHORT_SIDE = 224  # network input: shorter side of the picture, aspect ratio kept
MIN_CELL_WIDTH = 320  # px: smaller inputs (e.g. 96 px crops) are shown enlarged by a whole factor
TITLE_FONT_SIZE = 16
CAPTION_FONT_SIZE = 13
TITLE_HEIGHT = TITLE_FONT_SIZE + 10  # the strip of column titles above the cells


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def network_input_size(
    picture_size: tuple[int, int], image_size: int | Sequence[int] | None, multiple: int
) -> tuple[int, int]:
    """(height, width) of the network input for a picture of `picture_size` = (width, height).

    `image_size` (height, width) is taken as given; an int (default 224) is the shorter side, and the longer side
    keeps the picture's aspect ratio. Both sides are rounded to a multiple of `multiple` (the patch size), so the
    patch grid covers the picture without squashing it to a square.
    """
    if image_size is not None and not isinstance(image_size, int):
        height, width = image_size
        return int(height), int(width)
    short = image_size or DEFAULT_SHORT_SIDE
    width, height = picture_size
    scale = short / min(width, height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))


def _display_scale(width: int) -> int:
    """Whole-number upscaling that makes a cell at least MIN_CELL_WIDTH wide (patch edges stay on pixels)."""
    return max(1, math.ceil(MIN_CELL_WIDTH / width))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font, width: float) -> str:
    """`text` cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, font, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def save_figure(figure: Image.Image, path: str | os.PathLike) -> None:
    """Write a figure as PNG, with its caption also stored as the PNG's "Description" text (atomically)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key in ("Title", "Description"):
        if key in figure.info:
            info.add_text(key, figure.info[key])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    figure.save(partial, format="PNG", pnginfo=info)
    os.replace(partial, path)


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


def _grid_figure(
    cells: list[list[Image.Image]],
    titles: list[str],
    row_labels: Sequence[str] = (),
    caption: Sequence[str] = (),
    title: str = "",
) -> Image.Image:
    """Rows of equally sized cells under a strip of column titles, each row's label on its first cell, and the
    caption (paragraphs, wrapped to the figure's width) below. The caption is also kept in `figure.info`."""
    cell_w, cell_h = cells[0][0].size
    columns = max(len(row) for row in cells)
    width = columns * cell_w
    title_font, text_font = _font(TITLE_FONT_SIZE), _font(CAPTION_FONT_SIZE)
    caption_lines = [line for paragraph in caption for line in _wrap(paragraph, text_font, width - 16)]
    line_height = CAPTION_FONT_SIZE + 5
    caption_height = (len(caption_lines) * line_height + 12) if caption_lines else 0
    top = TITLE_HEIGHT
    figure = Image.new("RGB", (width, top + len(cells) * cell_h + caption_height), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    for column, text in enumerate(titles):
        draw.text(
            (column * cell_w + 6, 4), _fit(text, title_font, cell_w - 12), fill=(0, 0, 0), font=title_font
        )
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            figure.paste(cell, (c * cell_w, top + r * cell_h))
        if r < len(row_labels):
            label = _fit(row_labels[r], text_font, cell_w - 16)
            x0, y0 = 4, top + r * cell_h + 4
            box = draw.textbbox((x0 + 4, y0 + 2), label, font=text_font)
            draw.rectangle((x0, y0, box[2] + 4, box[3] + 4), fill=(255, 255, 255))
            draw.text((x0 + 4, y0 + 2), label, fill=(0, 0, 0), font=text_font)
    y = top + len(cells) * cell_h + 6
    for line in caption_lines:
        draw.text((8, y), line, fill=(0, 0, 0), font=text_font)
        y += line_height
    figure.info["Title"] = title
    figure.info["Description"] = "\n".join(caption)
    return figure


def _describe_query(query: Query, index: int, grid: tuple[int, int]) -> str:
    row, col = divmod(index, grid[1])
    where = f"patch {index} (row {row}, column {col} from 0 in the {grid[0]}x{grid[1]} patch grid)"
    if isinstance(query, tuple | list):
        return f"{where}, under the point y={float(query[0]):.2f}, x={float(query[1]):.2f} of the image"
    return where


def attention_figure(
    image: Image.Image | np.ndarray,
    backbones: Mapping[str, FrozenBackbone | str],
    queries: Sequence[Query],
    image_size: int | Sequence[int] | None = None,
    fraction: float = AttentionFigureConfig.fraction,
    mode: str = AttentionFigureConfig.mode,
    per_head: bool = AttentionFigureConfig.per_head,
    layer: int = AttentionFigureConfig.layer,
) -> Image.Image:
    """One row per query: the input with the query patch outlined, then for each backbone the patches with
    the top `fraction` of the query's attention (mean over heads; with `per_head`, also each head).

    backbones: name -> `FrozenBackbone` loaded with attn_implementation="eager", or a path / Hub id.
    queries: patch indices (same grid for every backbone) or (y, x) image fractions.
    image_size: the network input: (height, width), or an int for the shorter side with the picture's aspect
        ratio kept (default 224); rounded to multiples of the patch sizes.

    The figure says what it shows: column titles (the backbones), a label per query row and a caption under the
    picture (layer, threshold, queries, models, sizes), also stored as the PNG's "Description" by `save_figure`.
    Pictures narrower than MIN_CELL_WIDTH are shown enlarged.
    """
    if not backbones:
        raise ValueError("Give at least one backbone.")
    if not queries:
        raise ValueError("Give at least one query patch.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    models = {
        name: FrozenBackbone.from_pretrained(b, attn_implementation="eager") if isinstance(b, str) else b
        for name, b in backbones.items()
    }
    original = _as_pil(image)
    multiple = math.lcm(*(m.patch_size for m in models.values()))
    size = network_input_size(original.size, image_size, multiple)
    picture = original.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    pixel_values = resize_image(picture, size)[None]
    scale = _display_scale(size[1])
    shown = picture.resize((size[1] * scale, size[0] * scale), Image.Resampling.BICUBIC)

    grids = {name: (size[0] // m.patch_size, size[1] // m.patch_size) for name, m in models.items()}
    if any(isinstance(q, int) for q in queries) and len(set(grids.values())) > 1:
        raise ValueError(
            f"The backbones have different patch grids {sorted(set(grids.values()))}; give the queries as "
            "(y, x) image fractions instead of patch indices."
        )
    first_grid = next(iter(grids.values()))
    first_indices = [
        resolve_query(q, first_grid) for q in queries
    ]  # out-of-range queries fail before any work
    rows: list[list[Image.Image]] = [
        [_outline(shown.copy(), index, first_grid, _QUERY_COLOUR)] for index in first_indices
    ]
    titles = ["input, query patch in red"]
    heads, layers = {}, {}
    for name, model in models.items():
        grid = grids[name]
        indices = [resolve_query(q, grid) for q in queries]
        depth = getattr(model.model.config, "num_hidden_layers", None)
        if depth and not -depth <= layer < depth:
            raise ValueError(
                f"layer {layer} is outside the {depth} layers of {name} (0..{depth - 1}, or -1..-{depth} from the "
                "last)."
            )
        attention = query_attention(model, pixel_values, indices, layer)  # (Q, heads, h, w)
        heads[name] = attention.shape[1]
        layers[name] = (layer % depth + 1 if depth else layer, depth)
        maps = [attention.mean(dim=1)] + (
            [attention[:, i] for i in range(attention.shape[1])] if per_head else []
        )
        titles += [name] + ([f"{name}, head {i}" for i in range(attention.shape[1])] if per_head else [])
        for attention_map in maps:
            keep = top_fraction_mask(attention_map, fraction, mode).numpy()
            for row, index, kept in zip(rows, indices, keep, strict=True):
                row.append(_outline(_highlight(shown, kept, _KEEP_COLOUR), index, grid, _QUERY_COLOUR))

    percent = f"{100 * fraction:g}%"
    if mode == "patches":
        kept = ", ".join(
            f"{max(1, math.ceil(fraction * h * w))} of {h * w} patches"
            for h, w in sorted(set(grids.values()))
        )
        what = f"the {percent} of patches that receive the most attention ({kept})"
    else:
        what = f"the fewest patches that together receive {percent} of the attention"
    layer_text = "; ".join(
        f"{name}: layer {index}" + (f" of {depth}" if depth else "") + f", {heads[name]} heads"
        for name, (index, depth) in layers.items()
    )
    sources = "; ".join(
        f"{name} = {getattr(m.model, 'name_or_path', '') or name}" for name, m in models.items()
    )
    caption = [
        f"Yellow: for the query patch outlined in red, {what} from that patch; the rest is dimmed. Attention of "
        f"one layer, {'averaged over heads (per-head maps follow each model)' if per_head else 'averaged over heads'}, "
        f"attention to CLS/register tokens left out ({layer_text}).",
        "Queries: "
        + "; ".join(
            f"row {r + 1}: {_describe_query(q, i, first_grid)}"
            for r, (q, i) in enumerate(zip(queries, first_indices, strict=True))
        )
        + ".",
        f"Models: {sources}.",
        f"Input: {original.width}x{original.height} px picture resized to {size[1]}x{size[0]} px (width x height)"
        + (", aspect ratio kept" if image_size is None or isinstance(image_size, int) else "")
        + (f"; shown {scale}x enlarged" if scale > 1 else "")
        + ".",
    ]
    row_labels = [f"query {r + 1}: patch {i}" for r, i in enumerate(first_indices)]
    return _grid_figure(rows, titles, row_labels, caption, title=f"Top-{percent} attention of query patches")


def positives_figure(
    image: Image.Image | np.ndarray,
    grid: tuple[int, int],
    query_patches: Sequence[Query],
    positive_indices: torch.Tensor | np.ndarray,
    description: str | None = None,
) -> Image.Image:
    """For each query patch: the patch (red outline) and its positive neighbours (green), others dimmed.

    image: the view the teacher saw (PIL or H x W x 3 array), shown as is (enlarged when narrow).
    grid: (h, w) patch grid of that view.
    positive_indices: (N, k) or (1, N, k) integer indices into the row-major h x w grid, as returned by the
        SelfPatch teacher's neighbour matching.
    description: where the positives come from, added to the caption.
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
    indices = [resolve_query(query, grid) for query in query_patches]
    picture = _as_pil(image)
    scale = _display_scale(picture.width)
    shown = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.BICUBIC)
    cells, titles = [], []
    for index in indices:
        keep = np.zeros(h * w, dtype=bool)
        keep[positives[index].numpy()] = True
        cell = _highlight(shown, keep.reshape(h, w), _POSITIVE_COLOUR)
        for positive in positives[index].tolist():
            _outline(cell, positive, grid, _POSITIVE_COLOUR)
        cells.append(_outline(cell, index, grid, _QUERY_COLOUR))
        titles.append(f"patch {index}")
    caption = [
        f"Green: the {positives.shape[1]} positive neighbours of the patch outlined in red, on the {h}x{w} patch "
        "grid; the rest is dimmed." + (f" {description}" if description else ""),
        "Columns: "
        + "; ".join(_describe_query(q, i, grid) for q, i in zip(query_patches, indices, strict=True))
        + ".",
        f"Picture: {picture.width}x{picture.height} px"
        + (f", shown {scale}x enlarged" if scale > 1 else "")
        + ".",
    ]
    return _grid_figure([cells], titles, caption=caption, title="Positive neighbours of patches")


@torch.no_grad()
def teacher_positives(
    model, image: Image.Image | np.ndarray, image_size: int | Sequence[int] | None = None
) -> tuple[Image.Image, tuple[int, int], torch.Tensor]:
    """Runs the SelfPatch teacher of a `SelfPatchForPretraining` on one image, as during pretraining.

    The image is resized (bicubic) to `image_size` ((height, width), or an int for the shorter side with the aspect
    ratio kept; default: the backbone's image_size, the global crop size of training, as the shorter side) and
    normalised with ImageNet statistics, like a training crop. Returns the resized picture, its `(h, w)` patch grid and the
    teacher's `(N, k)` positive indices, ready for `positives_figure`.
    """
    from selfpatch_hf.models.selfpatch.modeling import select_positive_neighbors

    config = model.config
    patch = config.patch_size
    picture = _as_pil(image)
    if image_size is None:  # the global crop's shorter side, the picture's aspect ratio kept
        image_size = min(as_height_width(config.backbone_config.image_size))
    height, width = network_input_size(picture.size, image_size, patch)
    if height % patch or width % patch:
        raise ValueError(f"image_size {height}x{width} is not divisible by the patch size {patch}.")
    picture = picture.resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    pixels = ((pixels - mean) / std).permute(2, 0, 1)[None]
    parameter = next(model.teacher.parameters())
    features, _ = model.teacher.encode(pixels.to(parameter.device, parameter.dtype))
    grid = (height // patch, width // patch)
    positives = select_positive_neighbors(features, grid, config.num_positives, config.neighborhood_size)
    return picture, grid, positives[0].cpu()
