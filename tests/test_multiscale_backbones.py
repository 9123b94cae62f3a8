"""Multi-scale backbones (strides 4-32): ViT exports as native `BeitBackbone(add_fpn=True)` folders, CLS-free SigLIP
towers as `SelfPatchSiglipBackbone(add_fpn=True)`, Swin exports as `SwinBackbone`, and UperNet on them."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import tiny_config
from transformers import (
    AutoModel,
    AutoModelForSemanticSegmentation,
    BeitBackbone,
    SiglipVisionConfig,
    SiglipVisionModel,
    SwinBackbone,
    SwinConfig,
    SwinModel,
    ViTConfig,
    ViTModel,
)

from selfpatch_hf import SelfPatchForPretraining, export_backbone
from selfpatch_hf.models.dense.backbones import dense_backbone, export_dense_backbone, load_dense_backbone
from selfpatch_hf.models.dense.block_selection import checked_out_indices, multiscale_out_indices
from selfpatch_hf.models.dense.heads import build_upernet
from selfpatch_hf.models.dense.multiscale import feature_strides, vit_to_beit_backbone
from selfpatch_hf.models.dense.siglip_backbone import SelfPatchSiglipBackbone

# 16-pixel patches (the neck's strides are patch / 4 ... 2 x patch): square, larger than the training size, smaller,
# and non-square both ways, some with odd patch grids (the stride-32 map then floors, as MaxPool does)
SIZES = [(64, 64), (96, 96), (32, 32), (64, 96), (112, 48)]


def _vit_export(tmp_path, **overrides):
    torch.manual_seed(0)
    config = tiny_config(
        num_hidden_layers=4,
        patch_size=16,
        image_size=64,
        **overrides,
    )
    return export_backbone(SelfPatchForPretraining(config), tmp_path / "vit")


class _WarningRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    handler = _WarningRecords()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield handler.records
    root.removeHandler(handler)


def test_multiscale_out_indices():
    assert multiscale_out_indices(12) == [3, 6, 9, 12]  # the reference's Semantic FPN blocks (2, 5, 8, 11)
    assert multiscale_out_indices(24) == [6, 12, 18, 24]
    assert multiscale_out_indices(4) == [1, 2, 3, 4]
    assert multiscale_out_indices(5) == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="at least 4 blocks"):
        multiscale_out_indices(3)
    with pytest.raises(ValueError, match="exactly 4"):
        checked_out_indices([2, 4, 6], 12, multi_scale=True)
    with pytest.raises(ValueError, match="increasing"):
        checked_out_indices([6, 3, 9, 12], 12, multi_scale=True)
    assert checked_out_indices([4, 6, 8, 12], 12, multi_scale=True) == [4, 6, 8, 12]


def test_beit_export_equals_the_vit_export(tmp_path, transformers_warnings):
    vit_dir = _vit_export(tmp_path)
    dense_dir = export_dense_backbone(vit_dir, tmp_path / "beit", multi_scale=True)
    transformers_warnings.clear()
    backbone, info = BeitBackbone.from_pretrained(dense_dir, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected, mismatched or newly initialised
    assert transformers_warnings == []
    assert (dense_dir / "preprocessor_config.json").is_file()
    assert (
        backbone.config.out_features == ["stage1", "stage2", "stage3", "stage4"] and backbone.config.add_fpn
    )
    assert isinstance(load_dense_backbone(dense_dir), BeitBackbone)
    assert feature_strides(backbone) == [4, 8, 16, 32]
    vit = AutoModel.from_pretrained(vit_dir).eval()
    backbone.eval()
    for height, width in SIZES:
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            reference = vit(pixels, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
            output = backbone(pixels, output_hidden_states=True)
        assert len(output.hidden_states) == len(reference) == 5
        for ours, theirs in zip(output.hidden_states, reference):
            # the dropped key biases shift each query's logits by a constant: equal up to float rounding
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())
        grid_h, grid_w = height // 16, width // 16
        expected = [
            (grid_h * 4, grid_w * 4),
            (grid_h * 2, grid_w * 2),
            (grid_h, grid_w),
            (grid_h // 2, grid_w // 2),
        ]
        assert [tuple(m.shape[2:]) for m in output.feature_maps] == expected, (height, width)
        assert all(m.shape[:2] == (2, 32) for m in output.feature_maps)


def test_the_neck_is_beits_on_raw_block_outputs():
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=16,
                  image_size=64, qkv_bias=False),
        add_pooling_layer=False,
    ).eval()  # fmt: skip
    backbone = vit_to_beit_backbone(vit, out_indices=[1, 2, 3, 4]).eval()
    pixels = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        hidden = vit(pixels, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
        maps = backbone(pixels).feature_maps
        raw = [h[:, 1:].reshape(1, 4, 5, 32).permute(0, 3, 1, 2) for h in hidden[1:]]  # no output norm
        neck = backbone.fpn
        up = neck.fpn1.conv_transpose2(
            torch.nn.functional.gelu(neck.fpn1.normalization(neck.fpn1.conv_transpose1(raw[0])))
        )
        expected = [up, neck.fpn2(raw[1]), raw[2], torch.nn.functional.max_pool2d(raw[3], 2)]
    scale = max(r.abs().max().item() for r in raw)
    for ours, theirs in zip(maps, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * scale)


def test_siglip_multiscale_backbone_has_beits_neck(tmp_path, transformers_warnings):
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=4, patch_size=16,
        image_size=64, hidden_act="gelu", vision_use_head=False,
    )  # fmt: skip
    tower = SiglipVisionModel(config).eval()
    tower.save_pretrained(tmp_path / "siglip")
    dense_dir = export_dense_backbone(tmp_path / "siglip", tmp_path / "dense", multi_scale=True)
    transformers_warnings.clear()
    backbone, info = SelfPatchSiglipBackbone.from_pretrained(dense_dir, output_loading_info=True)
    assert not any(info.values()), info
    assert transformers_warnings == []
    assert backbone.config.add_fpn and not backbone.config.apply_layernorm
    assert backbone.config.out_indices == [1, 2, 3, 4]
    beit = vit_to_beit_backbone(
        ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                           patch_size=16, image_size=64), add_pooling_layer=False)
    )  # fmt: skip
    neck_names = {k: v.shape for k, v in backbone.state_dict().items() if k.startswith("fpn.")}
    assert neck_names == {k: v.shape for k, v in beit.state_dict().items() if k.startswith("fpn.")}
    backbone.eval()
    for height, width in [
        (64, 64),
        (64, 96),
        (112, 48),
        (70, 90),
    ]:  # the last: not whole patches, as BEiT allows
        pixels = torch.randn(2, 3, height, width)
        grid_h, grid_w = height // 16, width // 16
        with torch.no_grad():
            reference = tower(pixels[..., : grid_h * 16, : grid_w * 16], interpolate_pos_encoding=True,
                              output_hidden_states=True).hidden_states  # fmt: skip
            maps = backbone(pixels).feature_maps
            raw = [h.reshape(2, grid_h, grid_w, 32).permute(0, 3, 1, 2) for h in reference[1:]]
            expected = backbone.fpn(tuple(raw))
        for ours, theirs in zip(maps, expected):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        assert [tuple(m.shape[2:]) for m in maps][0] == (grid_h * 4, grid_w * 4)
    with pytest.raises(ValueError, match="exactly 4"):
        dense_backbone(tower, out_indices=[2, 4], multi_scale=True)


def test_swin_backbone_from_a_swin_export(tmp_path, transformers_warnings):
    torch.manual_seed(0)
    config = SwinConfig(
        embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], patch_size=4, window_size=2, image_size=64
    )
    swin = SwinModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # a trained-looking output norm, so that the test sees it carried over
        swin.layernorm.weight.uniform_(0.5, 1.5)
        swin.layernorm.bias.uniform_(-0.5, 0.5)
    swin.save_pretrained(tmp_path / "swin")
    dense_dir = export_dense_backbone(tmp_path / "swin", tmp_path / "dense")
    transformers_warnings.clear()
    backbone, info = SwinBackbone.from_pretrained(dense_dir, output_loading_info=True)
    assert not any(info.values()), info
    assert transformers_warnings == []
    assert isinstance(load_dense_backbone(dense_dir), SwinBackbone)
    assert feature_strides(backbone) == [4, 8, 16, 32]
    backbone.eval()
    for height, width in [(64, 64), (64, 128), (128, 64)]:
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            maps = backbone(pixels).feature_maps
            last = swin(pixels).last_hidden_state  # the last stage after the output norm
        assert [tuple(m.shape[2:]) for m in maps] == [(height // s, width // s) for s in (4, 8, 16, 32)]
        expected = last.reshape(2, height // 32, width // 32, 64).permute(0, 3, 1, 2)
        torch.testing.assert_close(maps[-1], expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="stages"):
        dense_backbone(backbone, out_indices=[2, 3, 4])


def test_upernet_on_the_multiscale_backbone_round_trips(tmp_path):
    vit_dir = _vit_export(tmp_path)
    model = build_upernet(vit_dir, ["sky", "grass", "cow"], hidden_size=16, multi_scale=True).eval()
    assert isinstance(model.backbone, BeitBackbone)
    reference = vit_to_beit_backbone(AutoModel.from_pretrained(vit_dir))
    for name, tensor in reference.state_dict().items():
        if name.startswith("beit."):  # the pretrained part; the neck is new
            torch.testing.assert_close(model.backbone.state_dict()[name], tensor, rtol=0, atol=0)
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(pixels).logits
    assert logits.shape == (2, 3, 64, 96)
    model.save_pretrained(tmp_path / "upernet")
    loaded, info = AutoModelForSemanticSegmentation.from_pretrained(
        tmp_path / "upernet", output_loading_info=True
    )
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixels).logits, logits, rtol=0, atol=0)
    # drop-path reaches the BEiT blocks
    assert (
        build_upernet(
            vit_dir, ["a", "b"], multi_scale=True, drop_path_rate=0.1
        ).backbone.config.drop_path_rate
        == 0.1
    )
