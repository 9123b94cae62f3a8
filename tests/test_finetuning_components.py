"""Pieces of dense fine-tuning: layer-wise learning-rate decay, the warm-up + poly / cosine schedule, sliding-window
inference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from selfpatch_hf.evaluation.segmentation_inference import predict_logits
from selfpatch_hf.models.dense.heads import build_upernet
from selfpatch_hf.training.finetuning_optimization import (
    FinetuningSchedule,
    apply_learning_rate,
    build_finetuning_optimizer,
    layer_decay_param_groups,
)


def _tiny_upernet(num_layers: int = 4) -> nn.Module:
    vit = ViTModel(
        ViTConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=num_layers,
                  patch_size=8, image_size=32),
        add_pooling_layer=False,
    )  # fmt: skip
    return build_upernet(vit, ["a", "b", "c"], hidden_size=16)


def test_layer_decay_scales_each_block_and_spares_norms_and_embeddings_from_weight_decay():
    model = _tiny_upernet(4)
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.5, num_layers=4)
    by_name = {name: group for group in groups for name in group["names"]}
    assert set(by_name) == {name for name, _ in model.named_parameters()}
    # L = 4 blocks: embeddings 0.5^5, block i (0-based) 0.5^(4 - i), output norm and heads 1
    assert by_name["backbone.embeddings.patch_embeddings.projection.weight"]["lr_scale"] == 0.5**5
    assert by_name["backbone.encoder.layer.0.attention.q_proj.weight"]["lr_scale"] == 0.5**4
    assert by_name["backbone.encoder.layer.3.mlp.fc2.weight"]["lr_scale"] == 0.5**1
    assert by_name["backbone.layernorm.weight"]["lr_scale"] == 1.0
    assert by_name["decode_head.classifier.weight"]["lr_scale"] == 1.0
    for name in ("backbone.embeddings.position_embeddings", "backbone.embeddings.cls_token",
                 "backbone.encoder.layer.2.norm1.weight", "decode_head.classifier.bias"):  # fmt: skip
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["backbone.encoder.layer.2.attention.k_proj.weight"]["weight_decay"] == 0.05

    optimizer = build_finetuning_optimizer(model, 0.05, 0.5, 4)
    apply_learning_rate(optimizer, 1e-3)
    rates = {group["lr"] for group in optimizer.param_groups}
    assert rates == {1e-3 * 0.5**k for k in range(6)}


def test_schedule_warm_up_then_poly_or_cosine():
    poly = FinetuningSchedule(
        learning_rate=1.0, total_steps=100, warmup_steps=10, warmup_ratio=0.0, power=1.0
    )
    assert poly.at(0) == 0.0
    # warm-up multiplies the decayed value (mmseg): step 5 -> 0.5 * (1 - 5 / 100)
    assert poly.at(5) == pytest.approx(0.5 * 0.95)
    assert poly.at(10) == pytest.approx(0.9)
    assert poly.at(100) == 0.0
    squared = FinetuningSchedule(learning_rate=1.0, total_steps=100, power=2.0, min_learning_rate=0.1)
    assert squared.at(50) == pytest.approx(0.1 + 0.9 * 0.25)
    cosine = FinetuningSchedule(learning_rate=2.0, total_steps=100, kind="cosine")
    assert cosine.at(50) == pytest.approx(1.0) and cosine.at(25) == pytest.approx(1 + math.cos(math.pi / 4))
    with pytest.raises(ValueError, match="warmup_steps"):
        FinetuningSchedule(learning_rate=1.0, total_steps=10, warmup_steps=10)


class _PixelwiseModel(nn.Module):
    """A 1x1 convolution: its logits at a pixel depend on that pixel only, so overlapping windows agree."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, pixel_values):
        return type("Output", (), {"logits": self.conv(pixel_values)})()


@pytest.mark.parametrize("size", [(40, 56), (20, 24), (32, 32)])
def test_sliding_windows_cover_the_image_and_average_overlaps(size):
    torch.manual_seed(0)
    model = _PixelwiseModel()
    pixels = torch.randn(2, 3, *size)
    whole = predict_logits(model, pixels, 4, "whole", patch_size=8)
    slide = predict_logits(model, pixels, 4, "slide", crop_size=(32, 32), stride=(12, 20), patch_size=8)
    assert whole.shape == slide.shape == (2, 4, *size)
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, model(pixels).logits, rtol=0, atol=1e-6)


def test_whole_image_inference_pads_to_whole_patches():
    model = _tiny_upernet(4).eval()
    pixels = torch.randn(1, 3, 36, 44)  # not multiples of the 8-pixel patch
    logits = predict_logits(model, pixels, 3, "whole", patch_size=8)
    assert logits.shape == (1, 3, 36, 44)
    padded = torch.nn.functional.pad(pixels, (0, 4, 0, 4))
    with torch.no_grad():
        torch.testing.assert_close(logits, model(pixel_values=padded).logits[..., :36, :44])


def test_unreadable_examples_are_replaced_by_the_next_readable_one_and_broken_data_is_named():
    from PIL import UnidentifiedImageError

    from selfpatch_hf.data.unreadable_examples import SKIPPED_KEY, SkipUnreadable, collate_with_skipped

    class Examples(torch.utils.data.Dataset):
        def __init__(self, unreadable):
            self.unreadable = unreadable

        def __len__(self):
            return 6

        def __getitem__(self, key):
            epoch, index = key
            if index in self.unreadable:
                raise UnidentifiedImageError(f"cannot identify image {index}")
            return torch.tensor([epoch, index])

    data = SkipUnreadable(Examples({1, 2, 5}))
    assert data[(0, 0)][0].tolist() == [0, 0] and data[(0, 0)][1] == []
    example, reasons = data[(3, 1)]  # 1 and 2 unreadable: the next readable is 3, same epoch
    assert example.tolist() == [3, 3] and [reason.split(":")[0] for reason in reasons] == [
        "training example 1",
        "training example 2",
    ]
    assert data[(0, 5)][0].tolist() == [0, 0]  # wraps around the split
    batch = collate_with_skipped(lambda items: {"x": torch.stack(items)})([data[(0, 0)], data[(0, 1)]])
    assert batch["x"].tolist() == [[0, 0], [0, 3]] and len(batch[SKIPPED_KEY]) == 2
    with pytest.raises(
        ValueError, match="3 consecutive training examples cannot be read, the first training example 0"
    ):
        SkipUnreadable(Examples({0, 1, 2}), max_consecutive=3)[(0, 0)]
