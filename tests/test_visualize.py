"""Attention and positive-neighbour pictures (the paper's Figure 1)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, ViTConfig, ViTModel

from selfpatch_hf.evaluation.features import FrozenBackbone
from selfpatch_hf.evaluation.visualize import (
    MIN_CELL_WIDTH,
    TITLE_HEIGHT,
    attention_figure,
    positives_figure,
    query_attention,
    resolve_query,
    save_figure,
    top_fraction_mask,
)


def save_tiny_vit(path, patch_size=8, seed=0):
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=patch_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)


def photo(size=64):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size + 16, 3), dtype=np.uint8))


def test_top_fraction_mask_hand_worked():
    attention = torch.tensor([[0.3, 0.25, 0.2, 0.1, 0.05], [0.04, 0.03, 0.02, 0.005, 0.005]])
    kept = lambda mask: set(torch.nonzero(mask.flatten()).flatten().tolist())  # noqa: E731
    assert kept(top_fraction_mask(attention, 0.1)) == {0}  # ceil(0.1 * 10) = 1 patch
    assert kept(top_fraction_mask(attention, 0.25)) == {0, 1, 2}  # ceil(2.5) = 3 patches
    assert kept(top_fraction_mask(attention, 0.5, mode="mass")) == {0, 1}  # 0.30 + 0.25 >= 0.5
    assert kept(top_fraction_mask(attention, 0.3, mode="mass")) == {0}
    batched = top_fraction_mask(torch.stack([attention, attention.flip((-2, -1))]), 0.1)
    assert batched.shape == (2, 2, 5) and batched[1, 1, 4] and batched.sum() == 2
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mask(attention, 0.0)


def test_resolve_query():
    assert resolve_query(5, (4, 6)) == 5
    assert resolve_query((0.0, 0.0), (4, 6)) == 0
    assert resolve_query((0.99, 0.99), (4, 6)) == 23
    assert resolve_query((0.5, 0.25), (4, 6)) == 2 * 6 + 1
    with pytest.raises(ValueError, match="outside"):
        resolve_query(24, (4, 6))


def test_query_attention_rows_are_the_models_last_layer(tmp_path):
    path = save_tiny_vit(tmp_path)
    backbone = FrozenBackbone.from_pretrained(path, attn_implementation="eager")
    pixels = torch.rand(1, 3, 32, 48)
    attention = query_attention(backbone, pixels, [0, 7, 11])
    assert attention.shape == (3, 2, 4, 6)
    model = AutoModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False).eval()
    with torch.no_grad():
        normalised = (pixels - backbone.image_mean) / backbone.image_std
        maps = model(normalised, interpolate_pos_encoding=True, output_attentions=True).attentions[-1][0]
    for row, query in enumerate([0, 7, 11]):
        # token 1 + q is patch q (token 0 is CLS); its attention to CLS is what is missing from the sum
        torch.testing.assert_close(attention[row].flatten(1), maps[:, 1 + query, 1:])
        torch.testing.assert_close(attention[row].sum((1, 2)) + maps[:, 1 + query, 0], torch.ones(2))


def test_attention_figure_png(tmp_path):
    models = {
        "dino": FrozenBackbone.from_pretrained(
            save_tiny_vit(tmp_path / "a", seed=0), attn_implementation="eager"
        ),
        "selfpatch": save_tiny_vit(tmp_path / "b", seed=1),  # a path is loaded with eager attention
    }
    grey = np.full((64, 64, 3), 128, np.uint8)
    figure = attention_figure(grey, models, [3, (0.5, 0.5)], image_size=(64, 64))
    save_figure(figure, tmp_path / "fig.png")
    cell = 5 * 64  # a 64 px input is shown 5x enlarged: at least MIN_CELL_WIDTH (320 px) wide
    with Image.open(tmp_path / "fig.png") as png:
        assert png.format == "PNG" and png.width == 3 * cell  # input + 2 models
        caption_height = png.height - TITLE_HEIGHT - 2 * cell  # 2 queries
        description = png.text["Description"]
        pixels = np.asarray(png.convert("RGB")).astype(int)
    # the caption is drawn under the cells (dark text on white) and says what the figure shows
    assert caption_height > 40 and (pixels[-caption_height:] < 100).any()
    assert "10% of patches that receive the most attention (7 of 64 patches)" in description
    assert "dino: layer 2 of 2, 2 heads" in description and "averaged over heads" in description
    assert "row 1: patch 3 (row 0, column 3" in description
    assert (
        "row 2: patch 36 (row 4, column 4 from 0 in the 8x8 patch grid), under the point y=0.50"
        in description
    )
    assert f"dino = {tmp_path / 'a'}" in description and f"selfpatch = {tmp_path / 'b'}" in description
    assert "shown 5x enlarged" in description
    cells = pixels[TITLE_HEIGHT : TITLE_HEIGHT + 2 * cell]
    for row in range(2):
        for column in (1, 2):
            centres = cells[
                row * cell + 20 : (row + 1) * cell : 40, column * cell + 20 : (column + 1) * cell : 40
            ]
            # ceil(10% of the 8x8 = 64 patches) = 7 patches tinted (grey 128 -> R 172), the rest dimmed (58)
            assert (centres[..., 0] > 150).sum() == 7
            assert ((centres[..., 0] < 70) | (centres[..., 0] > 150)).all()
    per_head = attention_figure(photo(), models, [3], image_size=64, per_head=True)
    # 64 is the shorter side: the 64x80 photo keeps its aspect ratio (input 64x80, shown 4x: 256x320)
    assert per_head.size[0] == (1 + 2 * 3) * 320
    assert "dino: layer 2 of 2" in per_head.info["Description"]


def test_attention_figure_keeps_the_aspect_ratio_and_enlarges_small_inputs(tmp_path):
    models = {"vit": save_tiny_vit(tmp_path / "a")}
    wide = np.random.default_rng(0).integers(0, 255, (300, 450, 3), dtype=np.uint8)  # 3:2 landscape
    figure = attention_figure(wide, models, [(0.5, 0.5)])  # default: shorter side 224, aspect kept
    cell_height = figure.height - TITLE_HEIGHT - _caption_height(figure)
    assert figure.width == 2 * 336 * 1 and cell_height == 224  # 224 x 336 input, 336 >= MIN_CELL_WIDTH
    assert (
        "450x300 px picture resized to 336x224 px (width x height), aspect ratio kept"
        in figure.info["Description"]
    )
    small = attention_figure(wide, models, [(0.5, 0.5)], image_size=96)  # e.g. the demo's 96 px crops
    assert small.width // 2 >= MIN_CELL_WIDTH and small.width == 2 * 3 * 144  # 96 x 144 input shown 3x
    assert small.height - TITLE_HEIGHT - _caption_height(small) == 3 * 96
    with pytest.raises(ValueError, match="outside the 12x18 patch grid"):
        attention_figure(wide, models, [999], image_size=96)


def _caption_height(figure) -> int:
    """Height of the white caption block under the cells (the cells of these tests are never pure white rows)."""
    pixels = np.asarray(figure.convert("RGB"))
    rows = np.nonzero((pixels[TITLE_HEIGHT:] != 255).any(axis=-1).all(axis=-1))[0]
    return figure.height - TITLE_HEIGHT - (rows.max() + 1)


def test_attention_figure_with_different_patch_sizes(tmp_path):
    models = {"p8": save_tiny_vit(tmp_path / "a", 8), "p16": save_tiny_vit(tmp_path / "b", 16)}
    with pytest.raises(ValueError, match="fractions"):
        attention_figure(photo(), models, [3], image_size=64)
    figure = attention_figure(
        photo(), models, [(0.25, 0.75)], image_size=64
    )  # 64x80 input (lcm of patches 16)
    assert figure.width == 3 * 4 * 80
    assert (
        "p8: layer 2 of 2" in figure.info["Description"] and "p16: layer 2 of 2" in figure.info["Description"]
    )


def test_positives_figure_marks_the_neighbours(tmp_path):
    grey = np.full((64, 64, 3), 128, np.uint8)
    positives = torch.zeros(16, 4, dtype=torch.long)
    positives[5] = torch.tensor([0, 1, 2, 10])
    positives[15] = torch.tensor([10, 11, 14, 12])
    figure = positives_figure(grey, (4, 4), [5, (0.99, 0.99)], positives[None])  # (1, N, k) accepted
    save_figure(figure, tmp_path / "pos.png")
    with Image.open(tmp_path / "pos.png") as png:
        assert png.width == 2 * 320  # shown 5x enlarged
        assert "the 4 positive neighbours of the patch outlined in red" in png.text["Description"]
        pixels = np.asarray(png.convert("RGB")).astype(int)[TITLE_HEIGHT : TITLE_HEIGHT + 320]
    first = pixels[:, :320]
    r, g, b = first[40, 40]  # centre of positive patch 0: tinted green
    assert g > 150 and g > r + 40
    assert first[280, 280].max() < 70  # patch 15 is not a positive of patch 5: dimmed
    assert tuple(first[80, 100]) == (255, 40, 40)  # top edge of query patch 5 (rows 80-159, cols 80-159)
    second = pixels[:, 320:]
    assert second[200, 200][1] > 150 and second[40, 40].max() < 70  # positives of patch 15 include 10
    with pytest.raises(ValueError, match="shape"):
        positives_figure(grey, (4, 4), [0], positives[:8])
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        positives_figure(grey, (4, 4), [0], positives + 16)
