"""Frozen-backbone patch features through AutoModel: ViT (CLS) and SigLIP (no prefix token)."""

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTImageProcessor, ViTModel

from selfpatch_hf.evaluation.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrozenBackbone,
    expected_prefix_tokens,
)

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def save_tiny_vit(path, processor=True, seed=0):
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, **TINY), add_pooling_layer=False)
    model.save_pretrained(path)
    if processor:
        ViTImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(path)
    return model.eval()


def test_vit_patch_features_match_direct_forward(tmp_path):
    model = save_tiny_vit(tmp_path)
    backbone = FrozenBackbone.from_pretrained(str(tmp_path))
    assert backbone.patch_size == 8 and backbone.expected_prefix_tokens == 1
    assert not any(p.requires_grad for p in backbone.parameters())
    images = torch.rand(2, 3, 40, 56)  # not the config's size: needs position interpolation
    features = backbone(images)
    assert features.shape == (2, 5, 7, 32)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model(pixel_values=(images - mean) / std, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(features, tokens[:, 1:].reshape(2, 5, 7, 32))  # row-major patch grid
    torch.testing.assert_close(backbone.image_embedding(images), tokens[:, 0])
    torch.testing.assert_close(backbone.image_embedding(images, "mean"), tokens[:, 1:].mean(1))


def test_missing_processor_falls_back_to_imagenet(tmp_path):
    save_tiny_vit(tmp_path, processor=False)
    backbone = FrozenBackbone.from_pretrained(str(tmp_path))
    torch.testing.assert_close(backbone.image_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(backbone.image_std.flatten(), torch.tensor(IMAGENET_STD))
    explicit = FrozenBackbone.from_pretrained(str(tmp_path), image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    torch.testing.assert_close(explicit.image_mean.flatten(), torch.full((3,), 0.5))


def test_siglip_backbone_without_cls(tmp_path):
    # The layout of converted reference SelfPatch checkpoints: no prefix token at all.
    torch.manual_seed(0)
    config = SiglipVisionConfig(image_size=32, patch_size=8, vision_use_head=False, **TINY)
    model = SiglipVisionModel(config).eval()
    model.save_pretrained(tmp_path)
    backbone = FrozenBackbone.from_pretrained(str(tmp_path), image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    assert backbone.expected_prefix_tokens == 0
    images = torch.rand(1, 3, 48, 32)
    output = backbone.forward_features(images)
    assert output.patch_tokens.shape == (1, 6, 4, 32) and output.prefix_tokens.shape[1] == 0
    with torch.no_grad():
        tokens = model(pixel_values=(images - 0.5) / 0.5, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(output.patch_tokens, tokens.reshape(1, 6, 4, 32))
    torch.testing.assert_close(backbone.image_embedding(images), tokens.mean(1))  # auto -> mean pooling
    with pytest.raises(ValueError, match="no CLS"):
        backbone.image_embedding(images, "cls")


def test_prefix_tokens_by_config():
    assert expected_prefix_tokens(ViTConfig()) == 1
    assert expected_prefix_tokens(SiglipVisionConfig()) == 0


def test_bad_inputs(tmp_path):
    save_tiny_vit(tmp_path)
    backbone = FrozenBackbone.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbone(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="eager"):
        backbone.forward_features(torch.rand(1, 3, 32, 32), output_attentions=True)  # SDPA: no maps
