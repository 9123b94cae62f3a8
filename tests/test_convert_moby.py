"""Conversion of MoBY checkpoints (Transformer-SSL format; Swin and DeiT encoders): exact backbones, strict keys."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from reference_moby import (
    TINY_SWIN,
    moby_deit_checkpoint,
    moby_swin_checkpoint,
    save_with_yacs_config,
)
from transformers import AutoImageProcessor, AutoModel, SwinModel, ViTModel

from selfpatch_hf import SelfPatchForPretraining
from selfpatch_hf.conversion.checkpoints import ConversionError
from selfpatch_hf.conversion.cli import main
from selfpatch_hf.conversion.convert import convert_checkpoint

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
    if overrides.get("absolute_embedding"):  # a fixed input size: no SelfPatchForPretraining for it
        assert result.pretraining_dir is None and "absolute position embeddings" in result.notes[0]
    else:
        assert result.pretraining_dir is not None and result.notes == []
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
    assert teacher.notes == [] and teacher.pretraining_dir is None
    with torch.no_grad():
        ours = AutoModel.from_pretrained(teacher.backbone_dir).eval()(pixel_values=x).last_hidden_state
        assert_close(ours, target(x)[0])
        assert (ours - tokens).abs().max() > 0.1  # really the other network


def test_moby_deit_converts_to_an_exact_vit(tmp_path):
    checkpoint, online, target = moby_deit_checkpoint()
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
        expected = online.tokens(x)  # timm's VisionTransformer as MoBY builds it: every token after the norm
        assert_close(output.last_hidden_state, expected)
        # MoBY-DeiT's image representation: what its encoder returns, the normalised CLS token
        assert_close(output.pooler_output, online(x), 1e-6)
        # the momentum encoder on request
        teacher = convert_checkpoint(
            tmp_path / "moby_deit_small.pth",
            tmp_path / "k",
            num_heads=2,
            network="teacher",
            pretraining=False,
        )
        ours = AutoModel.from_pretrained(teacher.backbone_dir).eval()(pixel_values=x).last_hidden_state
        assert_close(ours, target.tokens(x))
        assert (ours - expected).abs().max() > 0.1  # really the other network


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


@pytest.mark.parametrize("make", [moby_swin_checkpoint, moby_deit_checkpoint], ids=["swin", "deit"])
def test_a_moby_checkpoint_without_its_momentum_encoder_is_told_so(tmp_path, make):
    checkpoint, _, _ = make()
    cut = {
        **checkpoint,
        "model": {k: v for k, v in checkpoint["model"].items() if not k.startswith("encoder_k.")},
    }
    save_with_yacs_config(cut, tmp_path / "online_only.pth")
    with pytest.raises(
        ConversionError, match=r"online_only.pth lacks its momentum encoder \(encoder_k\.\*\)"
    ):
        convert_checkpoint(tmp_path / "online_only.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_swin_missing_a_whole_block_is_refused_naming_its_keys(tmp_path):
    from reference_moby import FakeYacsConfig

    checkpoint, _, _ = moby_swin_checkpoint()
    depths = list(TINY_SWIN["depths"])
    checkpoint["config"]["MODEL"]["SWIN"] = FakeYacsConfig(DEPTHS=depths)
    save_with_yacs_config(checkpoint, tmp_path / "whole.pth")
    assert convert_checkpoint(tmp_path / "whole.pth", tmp_path / "whole").max_abs_difference <= TOLERANCE
    last = f"layers.{len(depths) - 1}.blocks.{depths[-1] - 1}."
    shallower = [*depths[:-1], depths[-1] - 1]
    cut = _damage(
        checkpoint,
        lambda m: [m.pop(k) for k in list(m) if k.startswith((f"encoder.{last}", f"encoder_k.{last}"))],
    )
    save_with_yacs_config(cut, tmp_path / "cut.pth")
    with pytest.raises(ConversionError) as raised:
        convert_checkpoint(tmp_path / "cut.pth", tmp_path / "out")
    message = str(raised.value)
    assert (
        f"config records Swin depths {depths}, but its weights hold {shallower} blocks per stage" in message
    )
    assert f"missing keys (14): {last}attn.proj.bias" in message and f"{last}norm2.weight" in message
    assert not (tmp_path / "out").exists()


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


def _mlp(state: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """MoBYMLP in eval mode: Linear - BatchNorm1d (running statistics) - ReLU - Linear."""
    p = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    h = F.linear(x, p["linear_hidden.1.weight"], p["linear_hidden.1.bias"])
    h = F.batch_norm(
        h, p["linear_hidden.2.running_mean"], p["linear_hidden.2.running_var"], p["linear_hidden.2.weight"],
        p["linear_hidden.2.bias"], training=False, eps=1e-5,
    )  # fmt: skip
    return F.linear(F.relu(h), p["linear_out.weight"], p["linear_out.bias"])


def _info_nce(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2
) -> torch.Tensor:
    logits = torch.cat([(query * key).sum(1, keepdim=True), query @ queue], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long))


@pytest.mark.parametrize("backbone", ["swin", "deit"])
def test_moby_pretraining_checkpoint_restarts_moby_exactly(tmp_path, backbone):
    """`--pretraining-recipe moby`: SelfPatchForPretraining with MoBY's online/target encoders, projectors, predictor
    and queues; its loss equals MoBY's computed here from the checkpoint's tensors and the reference encoders."""
    if backbone == "swin":
        checkpoint, online, target = moby_swin_checkpoint()
        represent = {"online": lambda x: online(x)[1], "target": lambda x: target(x)[1]}  # average pool
        kwargs = {}
    else:
        checkpoint, online, target = moby_deit_checkpoint()
        represent = {"online": online, "target": target}  # the normalised CLS token
        kwargs = {"num_heads": 2}
    save_with_yacs_config(checkpoint, tmp_path / "moby.pth")
    result = convert_checkpoint(tmp_path / "moby.pth", tmp_path / "out", pretraining_recipe="moby", **kwargs)

    model = SelfPatchForPretraining.from_pretrained(result.pretraining_dir).eval()
    config = model.config
    assert (config.image_objective, config.patch_loss_weight, config.moby_queue_size) == ("moby", 0.0, 32)
    assert config.image_representation == ("average_pool" if backbone == "swin" else "cls")
    state = checkpoint["model"]
    torch.testing.assert_close(model.objective.queue1, state["queue1"])
    torch.testing.assert_close(model.objective.queue2, state["queue2"])
    assert model.objective.queue_ptr.item() == 16
    views = pixels(3, 2, 3, 32, 32)
    with torch.no_grad():
        output = model(views, None, update_state=False)
        queries, keys = [], []
        for v in range(2):
            x = views[:, v]
            queries.append(
                F.normalize(
                    _mlp(state, "predictor.", _mlp(state, "projector.", represent["online"](x))), dim=1
                )
            )
            keys.append(F.normalize(_mlp(state, "projector_k.", represent["target"](x)), dim=1))
        expected = _info_nce(queries[0], keys[1], state["queue2"]) + _info_nce(
            queries[1], keys[0], state["queue1"]
        )
    assert_close(output.image_loss, expected)
    assert_close(output.loss, expected)

    # the default recipe adds SelfPatch: same networks and queues, fresh aggregation and patch heads
    selfpatch = convert_checkpoint(tmp_path / "moby.pth", tmp_path / "sp", **kwargs)
    model = SelfPatchForPretraining.from_pretrained(selfpatch.pretraining_dir)
    assert model.config.patch_loss_weight == 0.1 and model.config.image_representation == "aggregation"
    for name, value in model.student.projector.state_dict().items():
        assert torch.equal(value, state[f"projector.{name}"].to(value.dtype))
    torch.testing.assert_close(model.objective.queue2, state["queue2"])
    with pytest.raises(ConversionError, match="--pretraining-recipe dino is for DINO checkpoints"):
        convert_checkpoint(tmp_path / "moby.pth", tmp_path / "bad", pretraining_recipe="dino", **kwargs)


def test_a_conversion_that_cannot_write_its_folders_is_one_line_and_changes_nothing(tmp_path):
    import os
    import resource
    import signal
    import subprocess
    import sys

    def limit_file_size():  # writes beyond 100 kB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    checkpoint, _, _ = moby_swin_checkpoint()
    save_with_yacs_config(checkpoint, tmp_path / "moby.pth")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    failed = subprocess.run(
        [sys.executable, "-m", "selfpatch_hf.conversion", str(tmp_path / "moby.pth"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"selfpatch-convert: error: converting {tmp_path / 'moby.pth'} into {tmp_path / 'out'} failed:"
    )
    assert "nothing was changed in" in last
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["notes.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["moby.pth", "out"]  # no staging left
