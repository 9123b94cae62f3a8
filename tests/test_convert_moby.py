"""Conversion of MoBY checkpoints (Transformer-SSL format; Swin and DeiT encoders): exact backbones, strict keys."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from reference_checkpoints import reference_vit
from reference_moby import (
    TINY_SWIN,
    moby_deit_checkpoint,
    moby_swin_checkpoint,
    save_with_yacs_config,
)
from transformers import AutoImageProcessor, AutoModel, SwinModel, ViTModel

from selfpatch_hf.convert import ConversionError, convert_checkpoint, main

TOLERANCE = 1e-4


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    difference = (ours - reference).abs().max().item()
    assert difference <= tolerance, f"max abs difference {difference:.3g} > {tolerance}"


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"absolute_embedding": True},
        # no shifted block (depth 1 per stage) -> no attention masks: the image size comes from the config
        {"depths": (1, 1, 1), "image_size": 16, "window_size": 2},
    ],
    ids=["swin", "absolute-position", "size-from-config"],
)
def test_moby_swin_converts_to_an_exact_swin_model(tmp_path, overrides):
    checkpoint, online, target = moby_swin_checkpoint(**overrides)
    path = tmp_path / "moby_swin_t_300ep_pretrained.pth"
    save_with_yacs_config(checkpoint, path)  # the yacs config is read without yacs (weights_only)
    size = overrides.get("image_size", TINY_SWIN["image_size"])

    result = convert_checkpoint(path, tmp_path / "out")

    assert result.format == "moby-swin-training" and result.model_type == "swin"
    assert result.max_abs_difference is not None and result.max_abs_difference <= TOLERANCE
    assert result.pretraining_dir is None and "No pretraining checkpoint" in result.notes[0]
    model = AutoModel.from_pretrained(result.backbone_dir).eval()
    assert type(model) is SwinModel
    assert json.loads((result.backbone_dir / "config.json").read_text())["model_type"] == "swin"
    x = pixels(2, 3, size, size)
    with torch.no_grad():
        output = model(
            pixel_values=x, output_hidden_states=True, output_hidden_states_before_downsampling=True
        )
        tokens, image = online(x)  # default: the online encoder, which MoBY's own evaluation loads
        stages = online.stages(x)
    assert_close(output.last_hidden_state, tokens)
    assert_close(output.pooler_output, image)  # the average pool: MoBY's image representation for Swin
    # every stage, not only the last: reshaped_hidden_states[i + 1] = stage i before its patch merging (B, C, h, w)
    for i, stage in enumerate(stages):
        assert_close(output.reshaped_hidden_states[i + 1].flatten(2).transpose(1, 2), stage)

    processor = AutoImageProcessor.from_pretrained(result.backbone_dir)
    assert processor.size == {"height": size, "width": size} and processor.resample == 3
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    card = (result.backbone_dir / "README.md").read_text()
    assert "MoBY" in card and "`SwinModel`" in card and "stride = 8" in card  # patch 2 x 2**2 merges

    # the momentum encoder on request
    teacher = convert_checkpoint(path, tmp_path / "target", network="teacher", pretraining=False)
    assert teacher.notes == []
    with torch.no_grad():
        ours = AutoModel.from_pretrained(teacher.backbone_dir).eval()(pixel_values=x).last_hidden_state
        assert_close(ours, target(x)[0])
        assert (ours - tokens).abs().max() > 0.1  # really the other network


def test_moby_deit_converts_to_an_exact_vit(tmp_path):
    checkpoint, online, _ = moby_deit_checkpoint()
    # a DDP-wrapped model saved without unwrapping, and no "model" wrapper around the state dict
    state = {f"module.{key}": value for key, value in checkpoint["model"].items()}
    torch.save(state, tmp_path / "moby_deit_small.pth")

    result = convert_checkpoint(tmp_path / "moby_deit_small.pth", tmp_path / "out", num_heads=2)

    assert result.format == "moby-vit-training" and result.model_type == "vit"
    model = AutoModel.from_pretrained(result.backbone_dir).eval()
    assert type(model) is ViTModel
    x = pixels(2, 3, 32, 32)
    with torch.no_grad():
        output = model(pixel_values=x)
        raw = reference_vit(online, cls=True, hidden=32, layers=2, heads=2, mlp=64, patch=8, grid=4)(x)
        expected = F.layer_norm(raw, (32,), online["norm.weight"], online["norm.bias"], 1e-6)
    assert_close(output.last_hidden_state, expected)
    # MoBY-DeiT's image representation: the normalised CLS token
    assert_close(output.pooler_output, expected[:, 0], 1e-6)


def _damage(checkpoint: dict, change) -> dict:
    checkpoint = dict(checkpoint)
    checkpoint["model"] = dict(checkpoint["model"])
    change(checkpoint["model"])
    return checkpoint


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda m: m.pop("encoder_k.layers.1.blocks.1.mlp.fc2.bias"),
            r"(?s)encoder_k\.\* keys.*missing keys \(1\): layers\.1\.blocks\.1\.mlp\.fc2\.bias",
        ),
        (
            lambda m: m.update({"encoder.extra.weight": torch.zeros(1)}),
            r"unexpected keys \(1\): extra\.weight",
        ),
        (lambda m: m.update({"something_else": torch.zeros(1)}), r"Unexpected keys .*something_else"),
        (
            lambda m: m.update({"projector_k.linear_out.weight": torch.zeros(8, 15)}),
            r"projector_k\.\* keys.*\n.*mis-shaped keys \(1\): linear_out\.weight: \(8, 15\) \(expected \(8, 16\)\)",
        ),
        (
            lambda m: m.update({"queue2": torch.zeros(7, 32)}),
            r"queues.*\n.*queue2: \(7, 32\) \(expected \(8, 32\)\)",
        ),
        (
            lambda m: m.update(
                {
                    "encoder.layers.0.blocks.1.attn.relative_position_index": torch.zeros(
                        16, 16, dtype=torch.long
                    )
                }
            ),
            r"layers\.0\.blocks\.1\.attn\.relative_position_index is not the standard",
        ),
        (lambda m: m.pop("queue_ptr"), r"lacks queue_ptr"),
    ],
    ids=[
        "missing",
        "unexpected-in-encoder",
        "unexpected-part",
        "mis-shaped-head",
        "queue",
        "index",
        "no-pointer",
    ],
)
def test_damaged_moby_checkpoints_name_the_keys_and_write_nothing(tmp_path, change, message):
    checkpoint, _, _ = moby_swin_checkpoint()
    save_with_yacs_config(_damage(checkpoint, change), tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(tmp_path / "bad.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_swin_too_small_for_its_window_is_refused(tmp_path):
    # 16 px, patch 2, window 4: the last stage is 2x2, smaller than the window (transformers' SwinModel cannot run it)
    checkpoint, _, _ = moby_swin_checkpoint(image_size=16, depths=(1, 1, 1))
    save_with_yacs_config(checkpoint, tmp_path / "small.pth")
    with pytest.raises(ConversionError, match=r"stage 2 has a 2x2 grid"):
        convert_checkpoint(tmp_path / "small.pth", tmp_path / "out")


def test_command_line(tmp_path, capsys):
    checkpoint, _, _ = moby_swin_checkpoint()
    save_with_yacs_config(checkpoint, tmp_path / "moby.pth")
    assert main([str(tmp_path / "moby.pth"), str(tmp_path / "out"), "--no-pretraining"]) == 0
    out = capsys.readouterr().out
    assert "Detected moby-swin-training: swin-e8-d2-2-2-patch2-window4" in out and "max abs difference" in out

    bad = _damage(checkpoint, lambda m: m.pop("encoder.norm.weight"))
    save_with_yacs_config(bad, tmp_path / "bad.pth")
    assert main([str(tmp_path / "bad.pth"), str(tmp_path / "bad")]) == 1
    assert "missing keys (1): norm.weight" in capsys.readouterr().err
