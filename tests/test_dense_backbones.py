"""Dense backbones: ViT exports as native `Dinov2Backbone` folders, CLS-free SigLIP towers as
`SelfPatchSiglipBackbone`, and the dense heads built around them."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from tiny_models import tiny_config
from transformers import (
    AutoModel,
    AutoModelForSemanticSegmentation,
    Dinov2Backbone,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from selfpatch_hf import SelfPatchForPretraining, export_backbone
from selfpatch_hf.models.dense.backbones import dense_out_indices, export_dense_backbone, load_dense_backbone
from selfpatch_hf.models.dense.heads import build_dpt, build_upernet
from selfpatch_hf.models.dense.siglip_backbone import SelfPatchSiglipBackbone

# square, larger than the training size, and non-square both ways (multiples of the 8-pixel patch)
SIZES = [(32, 32), (48, 48), (32, 64), (56, 24)]


def _as_maps(tokens: torch.Tensor, height: int, width: int, patch: int = 8) -> torch.Tensor:
    # (batch, tokens, hidden) row-major -> (batch, hidden, height / patch, width / patch)
    return tokens.reshape(tokens.shape[0], height // patch, width // patch, -1).permute(0, 3, 1, 2)


class _WarningRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Warnings transformers logs while the test runs (its loggers do not propagate to pytest's caplog)."""
    handler = _WarningRecords()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield handler.records
    root.removeHandler(handler)


def test_dense_out_indices_follow_the_depth():
    assert dense_out_indices(12) == [4, 6, 8, 12]
    assert dense_out_indices(24) == [8, 12, 16, 24]
    assert dense_out_indices(4) == [1, 2, 3, 4]
    assert dense_out_indices(5) == [2, 3, 4, 5]  # strictly increasing after rounding
    with pytest.raises(ValueError, match="at least 4 blocks"):
        dense_out_indices(2)


def test_dinov2_export_equals_the_vit_export(tmp_path, transformers_warnings):
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config(num_hidden_layers=4))
    vit_dir = export_backbone(model, tmp_path / "vit")
    dense_dir = export_dense_backbone(vit_dir, tmp_path / "dense", out_indices=[1, 3, 4])

    transformers_warnings.clear()
    backbone, info = Dinov2Backbone.from_pretrained(dense_dir, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected, mismatched or newly initialised
    assert transformers_warnings == []
    assert (dense_dir / "preprocessor_config.json").is_file()
    assert backbone.config.out_features == ["stage1", "stage3", "stage4"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert dense_dir.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    for file in dense_dir.iterdir():  # not save_pretrained's 0600
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name
    vit = AutoModel.from_pretrained(vit_dir).eval()
    backbone.eval()

    for height, width in SIZES:
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            reference = vit(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
            maps = backbone(pixels).feature_maps
        assert [tuple(m.shape) for m in maps] == [(2, 32, height // 8, width // 8)] * 3
        for block, feature_map in zip([1, 3, 4], maps):
            expected = _as_maps(vit.layernorm(reference.hidden_states[block])[:, 1:], height, width)
            torch.testing.assert_close(feature_map, expected, rtol=0, atol=1e-6)
        # the last stage is exactly the exported ViT's output patch tokens
        torch.testing.assert_close(
            maps[-1], _as_maps(reference.last_hidden_state[:, 1:], height, width), rtol=0, atol=1e-6
        )


def test_siglip_backbone_equals_the_converted_tower(tmp_path, transformers_warnings):
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        num_hidden_layers=4,
        patch_size=8,
        image_size=32,
        hidden_act="gelu",
        vision_use_head=False,
    )
    tower = SiglipVisionModel(config).eval()
    tower.save_pretrained(tmp_path / "siglip")
    dense_dir = export_dense_backbone(tmp_path / "siglip", tmp_path / "dense")

    transformers_warnings.clear()
    backbone, info = SelfPatchSiglipBackbone.from_pretrained(dense_dir, output_loading_info=True)
    assert not any(info.values()), info
    assert transformers_warnings == []
    assert isinstance(load_dense_backbone(dense_dir), SelfPatchSiglipBackbone)
    assert backbone.config.out_indices == [1, 2, 3, 4]
    backbone.eval()
    for height, width in SIZES:
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            reference = tower(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
            maps = backbone(pixels).feature_maps
        for block, feature_map in zip([1, 2, 3, 4], maps):
            expected = _as_maps(tower.post_layernorm(reference.hidden_states[block]), height, width)
            torch.testing.assert_close(feature_map, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            maps[-1], _as_maps(reference.last_hidden_state, height, width), rtol=0, atol=1e-6
        )


def test_upernet_carries_the_pretrained_backbone_and_round_trips(tmp_path):
    torch.manual_seed(0)
    vit_dir = export_backbone(SelfPatchForPretraining(tiny_config(num_hidden_layers=4)), tmp_path / "vit")
    model = build_upernet(vit_dir, ["sky", "grass", "cow"], hidden_size=16).eval()
    reference = load_dense_backbone(export_dense_backbone(vit_dir, tmp_path / "dense"))
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor, rtol=0, atol=0)
    assert model.config.id2label == {0: "sky", 1: "grass", 2: "cow"}
    assert model.auxiliary_head is not None  # 4 feature maps: the FCN head reads the third

    model.save_pretrained(tmp_path / "upernet")
    loaded, info = AutoModelForSemanticSegmentation.from_pretrained(
        tmp_path / "upernet", output_loading_info=True
    )
    assert not any(info.values()), info
    pixels = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixels).logits, model(pixels).logits, rtol=0, atol=0)


def test_upernet_on_a_siglip_backbone_loads_once_registered(tmp_path):
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=4, patch_size=8,
        image_size=32, vision_use_head=False,
    )  # fmt: skip
    model = build_upernet(SiglipVisionModel(config), ["a", "b"], hidden_size=16).eval()
    model.save_pretrained(tmp_path / "upernet")
    loaded = AutoModelForSemanticSegmentation.from_pretrained(
        tmp_path / "upernet"
    ).eval()  # registered by import
    assert isinstance(loaded.backbone, SelfPatchSiglipBackbone)
    pixels = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)


def test_dpt_depth_model_on_the_vit_backbone(tmp_path):
    torch.manual_seed(0)
    vit_dir = export_backbone(SelfPatchForPretraining(tiny_config(num_hidden_layers=4)), tmp_path / "vit")
    model = build_dpt(vit_dir, fusion_hidden_size=16).eval()
    with torch.no_grad():
        depth = model(torch.randn(2, 3, 32, 48)).predicted_depth
    assert depth.shape == (2, 64, 96)  # DPT assumes 16-pixel patches: with 8-pixel ones it predicts at 2x
    assert torch.isfinite(depth).all()
    tower = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=4,
                           patch_size=8, image_size=32, vision_use_head=False)
    )  # fmt: skip
    with pytest.raises(ValueError, match="class token"):
        build_dpt(tower)


def test_a_pretraining_folder_gives_its_teachers_backbone(tmp_path):
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config(num_hidden_layers=4))
    model.save_pretrained(tmp_path / "pretraining")
    from_folder = load_dense_backbone(
        export_dense_backbone(tmp_path / "pretraining", tmp_path / "dense-a")
    ).eval()
    from_export = load_dense_backbone(
        export_dense_backbone(export_backbone(model, tmp_path / "vit"), tmp_path / "dense-b")
    ).eval()
    pixels = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        for a, b in zip(from_folder(pixels).feature_maps, from_export(pixels).feature_maps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
