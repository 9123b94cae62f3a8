"""Attention and positive-neighbour pictures (the paper's Figure 1)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, ViTConfig, ViTModel

from selfpatch_hf.evaluation.features import FrozenBackbone
from selfpatch_hf.evaluation.visualize import (
    attention_figure,
    positives_figure,
    query_attention,
    resolve_query,
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
    figure.save(tmp_path / "fig.png")
    with Image.open(tmp_path / "fig.png") as png:
        assert png.format == "PNG" and png.size == (3 * 64, 18 + 2 * 64)  # input + 2 models; 2 queries
        pixels = np.asarray(png.convert("RGB")).astype(int)[18:]
    for row in range(2):
        for column in (1, 2):
            centres = pixels[row * 64 + 4 : (row + 1) * 64 : 8, column * 64 + 4 : (column + 1) * 64 : 8]
            # ceil(10% of the 8x8 = 64 patches) = 7 patches tinted (grey 128 -> R 172), the rest dimmed (58)
            assert (centres[..., 0] > 150).sum() == 7
            assert ((centres[..., 0] < 70) | (centres[..., 0] > 150)).all()
    per_head = attention_figure(photo(), models, [3], image_size=64, per_head=True)
    assert per_head.size == ((1 + 2 * 3) * 64, 18 + 64)


def test_attention_figure_with_different_patch_sizes(tmp_path):
    models = {"p8": save_tiny_vit(tmp_path / "a", 8), "p16": save_tiny_vit(tmp_path / "b", 16)}
    with pytest.raises(ValueError, match="fractions"):
        attention_figure(photo(), models, [3], image_size=64)
    figure = attention_figure(photo(), models, [(0.25, 0.75)], image_size=64)
    assert figure.size == (3 * 64, 18 + 64)


def test_positives_figure_marks_the_neighbours(tmp_path):
    grey = np.full((64, 64, 3), 128, np.uint8)
    positives = torch.zeros(16, 4, dtype=torch.long)
    positives[5] = torch.tensor([0, 1, 2, 10])
    positives[15] = torch.tensor([10, 11, 14, 12])
    figure = positives_figure(grey, (4, 4), [5, (0.99, 0.99)], positives[None])  # (1, N, k) accepted
    figure.save(tmp_path / "pos.png")
    with Image.open(tmp_path / "pos.png") as png:
        assert png.size == (2 * 64, 18 + 64)
        pixels = np.asarray(png.convert("RGB")).astype(int)[18:]
    first = pixels[:, :64]
    r, g, b = first[8, 8]  # centre of positive patch 0: tinted green
    assert g > 150 and g > r + 40
    assert first[56, 56].max() < 70  # patch 15 is not a positive of patch 5: dimmed
    assert tuple(first[16, 20]) == (255, 40, 40)  # top edge of query patch 5 (rows 16-31, cols 16-31)
    second = pixels[:, 64:]
    assert second[40, 40][1] > 150 and second[8, 8].max() < 70  # positives of patch 15 include 10
    with pytest.raises(ValueError, match="shape"):
        positives_figure(grey, (4, 4), [0], positives[:8])
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        positives_figure(grey, (4, 4), [0], positives + 16)
