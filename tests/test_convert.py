"""Conversion of reference SelfPatch / DINO checkpoints: exact features, strict keys, pretraining checkpoints."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from reference_checkpoints import (
    aggregation_state,
    backbone_state,
    dino_training_checkpoint,
    head_state,
    prefixed,
    reference_dino_head,
    reference_vit,
    selfpatch_training_checkpoint,
)
from transformers import AutoImageProcessor, AutoModel, SiglipVisionModel, ViTModel

from selfpatch_hf.conversion.checkpoints import ConversionError
from selfpatch_hf.conversion.convert import convert_checkpoint
from selfpatch_hf.conversion.dino_selfpatch import load_reference_checkpoint

TOLERANCE = 1e-4
ARCH = {"hidden": 32, "layers": 2, "heads": 2, "mlp": 64, "patch": 8, "grid": 4}


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def layer_norm(x: torch.Tensor, state: dict[str, torch.Tensor] | None, prefix: str = "") -> torch.Tensor:
    if state is None:
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    return F.layer_norm(x, (x.shape[-1],), state[prefix + "weight"], state[prefix + "bias"], 1e-6)


def unprefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


@torch.no_grad()
def assert_close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    assert ours.shape == reference.shape
    difference = (ours - reference).abs().max().item()
    assert difference <= tolerance, f"max abs difference {difference:.3g} > {tolerance}"


# --------------------------------------------------------------------------------------------------------- DINO
def test_dino_backbone_file_converts_to_an_exact_vit(tmp_path):
    state = backbone_state(cls=True)
    path = tmp_path / "dino_deittiny8_pretrain.pth"
    torch.save(state, path)

    result = convert_checkpoint(path, tmp_path / "out", num_heads=2)

    assert result.format == "dino-backbone" and result.model_type == "vit"
    assert result.max_abs_difference is not None and result.max_abs_difference <= TOLERANCE
    model = AutoModel.from_pretrained(result.backbone_dir).eval()
    assert type(model) is ViTModel and model.config.model_type == "vit"
    reference = reference_vit(state, cls=True, **ARCH)
    x = pixels(2, 3, 32, 32)
    with torch.no_grad():
        output = model(pixel_values=x)
        expected = layer_norm(reference(x), state, "norm.")
    assert_close(output.last_hidden_state, expected)  # CLS + 16 patch tokens after the final norm
    # identity pooler: pooler_output is DINO's image representation (normalised CLS), nothing random
    assert_close(output.pooler_output, expected[:, 0], 1e-6)

    processor = AutoImageProcessor.from_pretrained(result.backbone_dir)
    assert processor.size == {"height": 32, "width": 32}
    assert processor.resample == 3  # bicubic
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(processor.image_std) == pytest.approx([0.229, 0.224, 0.225])
    card = ModelCard.load(result.backbone_dir / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
    assert "dino_deittiny8_pretrain.pth" in card.content


def test_dino_training_checkpoint_teacher_by_default_student_on_request(tmp_path):
    checkpoint = dino_training_checkpoint()
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    x = pixels(1, 3, 32, 32, seed=1)

    for network, key_prefix in (("teacher", "backbone."), ("student", "module.backbone.")):
        # args.arch="vit_tiny" (width 192) does not fit these width-32 weights: the head count comes from the option
        result = convert_checkpoint(path, tmp_path / network, network=network, num_heads=2, pretraining=False)
        assert result.format == "dino-training" and result.pretraining_dir is None
        state = unprefixed(checkpoint[network], key_prefix)
        model = AutoModel.from_pretrained(result.backbone_dir).eval()
        with torch.no_grad():
            expected = layer_norm(reference_vit(state, cls=True, **ARCH)(x), state, "norm.")
            assert_close(model(pixel_values=x).last_hidden_state, expected)


def test_dino_pretraining_checkpoint_holds_both_networks_heads_and_centre(tmp_path):
    from selfpatch_hf import SelfPatchForPretraining
    from selfpatch_hf.conversion.dino_selfpatch import dino_to_pretraining_model, infer_architecture

    checkpoint = dino_training_checkpoint()
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    result = convert_checkpoint(path, tmp_path / "out", num_heads=2)
    assert result.pretraining_dir is not None

    model = SelfPatchForPretraining.from_pretrained(result.pretraining_dir).eval()
    config = model.config
    assert config.image_representation == "aggregation" and config.patch_loss_weight == pytest.approx(0.1)
    assert (config.image_out_dim, config.head_hidden_dim, config.head_bottleneck_dim) == (16, 24, 12)
    assert "num_local_crops" not in config.to_dict()  # a training setting, not the model's
    assert torch.equal(model.objective.image_center, checkpoint["dino_loss"]["center"])

    x = pixels(2, 3, 32, 32, seed=2)
    for network, prefix in ((model.teacher, ""), (model.student, "module.")):
        side = checkpoint["teacher" if prefix == "" else "student"]
        backbone = unprefixed(side, prefix + "backbone.")
        head = unprefixed(side, prefix + "head.")
        with torch.no_grad():
            expected = layer_norm(reference_vit(backbone, cls=True, **ARCH)(x), backbone, "norm.")
            tokens = network.backbone(x).last_hidden_state
            assert_close(tokens, expected)
            # the converted DINO head maps the normalised CLS token exactly like the reference head
            assert_close(network.image_head(tokens[:, 0]), reference_dino_head(head, expected[:, 0]))

    # continued training works: a SelfPatch step on global + local crops gives a finite loss with a patch term
    model.train()
    output = model(pixels(2, 2, 3, 32, 32, seed=3), pixels(2, 2, 3, 16, 16, seed=4))
    assert torch.isfinite(output.loss)

    # in memory: the teacher and the frozen weight-norm magnitudes do not train
    in_memory = dino_to_pretraining_model(
        load_reference_checkpoint(path), infer_architecture(load_reference_checkpoint(path), num_heads=2)
    )
    assert not any(p.requires_grad for p in in_memory.teacher.parameters())
    assert not in_memory.student.image_head.last_layer.parametrizations.weight.original0.requires_grad
    dino = dino_to_pretraining_model(
        load_reference_checkpoint(path),
        infer_architecture(load_reference_checkpoint(path), num_heads=2),
        recipe="dino",
    )
    assert dino.config.image_representation == "cls" and dino.config.patch_loss_weight == 0


def test_dino_backbone_file_gives_a_pretraining_checkpoint_with_fresh_heads(tmp_path):
    from selfpatch_hf import SelfPatchForPretraining

    state = backbone_state(cls=True)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    result = convert_checkpoint(path, tmp_path / "out", num_heads=2)
    model = SelfPatchForPretraining.from_pretrained(result.pretraining_dir).eval()
    x = pixels(1, 3, 32, 32)
    with torch.no_grad():
        expected = layer_norm(reference_vit(state, cls=True, **ARCH)(x), state, "norm.")
        for network in (model.student, model.teacher):
            assert_close(network.backbone(x).last_hidden_state, expected)


# ---------------------------------------------------------------------------------------------------- SelfPatch
def test_selfpatch_training_checkpoint_converts_to_an_exact_siglip_backbone(tmp_path):
    checkpoint = selfpatch_training_checkpoint()
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    with pytest.raises(ConversionError, match="args.arch='vit_small' has hidden size 384"):
        convert_checkpoint(path, tmp_path / "out")  # the recorded arch contradicts the weights
    result = convert_checkpoint(path, tmp_path / "out", num_heads=2)

    assert result.format == "selfpatch-training" and result.model_type == "siglip_vision_model"
    assert result.pretraining_dir is None and any("CLS token" in note for note in result.notes)
    model = AutoModel.from_pretrained(result.backbone_dir).eval()
    assert type(model) is SiglipVisionModel and model.config.vision_use_head is False

    backbone = unprefixed(checkpoint["teacher"], "backbone.")
    ca_head = unprefixed(checkpoint["teacher"], "ca_head.")
    x = pixels(2, 3, 32, 32)
    with torch.no_grad():
        raw = reference_vit(backbone, cls=False, **ARCH)(x)  # (2, 16, 32): no CLS
        output = model(pixel_values=x, output_hidden_states=True)
    assert_close(output.last_hidden_state, layer_norm(raw, ca_head, "norm."))  # what the patch head reads
    assert_close(output.hidden_states[-1], raw)  # the raw features the reference DAVIS evaluation uses

    processor = AutoImageProcessor.from_pretrained(result.backbone_dir)
    assert type(processor).__name__.startswith("SiglipImageProcessor")
    assert processor.size == {"height": 32, "width": 32} and processor.resample == 3
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])


def test_selfpatch_backbone_file_without_output_norm(tmp_path):
    state = backbone_state(cls=False, seed=5)
    path = tmp_path / "dino_selfpatch.pth"
    torch.save(state, path)
    x = pixels(1, 3, 32, 32)
    raw = reference_vit(state, cls=False, **ARCH)(x).detach()

    result = convert_checkpoint(path, tmp_path / "plain", num_heads=2)
    assert result.format == "selfpatch-backbone"
    model = AutoModel.from_pretrained(result.backbone_dir).eval()
    with torch.no_grad():
        output = model(pixel_values=x, output_hidden_states=True)
    # no ca_head.norm in the file: a parameter-free standardisation, and it is said loudly
    assert_close(output.last_hidden_state, layer_norm(raw, None))
    assert_close(output.hidden_states[-1], raw)
    assert any("without the output norm" in note for note in result.notes)
    assert "without the output norm" in (result.backbone_dir / "README.md").read_text()

    # the trained norm can come from the full training checkpoint
    donor = selfpatch_training_checkpoint()
    donor_path = tmp_path / "checkpoint.pth"
    torch.save(donor, donor_path)
    result = convert_checkpoint(path, tmp_path / "normed", num_heads=2, output_norm_from=donor_path)
    model = AutoModel.from_pretrained(result.backbone_dir).eval()
    with torch.no_grad():
        expected = layer_norm(raw, unprefixed(donor["teacher"], "ca_head."), "norm.")
        assert_close(model(pixel_values=x).last_hidden_state, expected)


def test_position_interpolation_at_other_resolutions(tmp_path):
    """Off the native grid, transformers interpolates bicubically to the exact target grid; the reference code
    uses a scale factor with a +0.1 offset. The converted models match the former exactly."""
    dino, selfpatch = backbone_state(cls=True), backbone_state(cls=False)
    torch.save(dino, tmp_path / "dino.pth")
    torch.save(selfpatch, tmp_path / "selfpatch.pth")
    x = pixels(1, 3, 48, 40)  # 6x5 grid from a 4x4 position grid, not square
    for name, state, cls in (("dino", dino, True), ("selfpatch", selfpatch, False)):
        result = convert_checkpoint(tmp_path / f"{name}.pth", tmp_path / name, num_heads=2, pretraining=False)
        model = AutoModel.from_pretrained(result.backbone_dir).eval()
        reference = reference_vit(state, cls=cls, **ARCH)
        with torch.no_grad():
            hidden = model(
                pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True
            ).hidden_states[-1]
            assert_close(hidden, reference(x, interpolation="size"))
            assert hidden.shape[1] == 30 + int(cls)


# ------------------------------------------------------------------------------------------------- architecture
def test_head_count_sources(tmp_path):
    state = backbone_state(cls=True, hidden=192, layers=1, mlp=96)
    path = tmp_path / "wide.pth"
    torch.save(state, path)
    x = pixels(1, 3, 32, 32)
    expected = {}
    for heads in (3, 4):
        reference = reference_vit(state, cls=True, hidden=192, layers=1, heads=heads, mlp=96, patch=8, grid=4)
        expected[heads] = layer_norm(reference(x), state, "norm.").detach()

    # default for width 192 (ViT-Ti): 3 heads; --num-heads overrides; --arch must agree with the width
    for kwargs, heads in (({}, 3), ({"num_heads": 4}, 4), ({"arch": "vit_tiny"}, 3)):
        result = convert_checkpoint(path, tmp_path / f"h{heads}-{len(kwargs)}", pretraining=False, **kwargs)
        assert result.architecture.num_attention_heads == heads
        with torch.no_grad():
            assert_close(
                AutoModel.from_pretrained(result.backbone_dir)(pixel_values=x).last_hidden_state,
                expected[heads],
            )
    with pytest.raises(ConversionError, match="hidden size 384"):
        convert_checkpoint(path, tmp_path / "bad", arch="vit_small")

    # args.arch of a training checkpoint is used when it fits the width
    checkpoint = {
        "teacher": {**prefixed("backbone.", state), **prefixed("head.", head_state(hidden=192))},
        "args": argparse.Namespace(arch="deit_tiny"),
    }
    torch.save(checkpoint, tmp_path / "args.pth")
    result = convert_checkpoint(tmp_path / "args.pth", tmp_path / "args", pretraining=False)
    assert result.architecture.num_attention_heads == 3 and result.architecture.arch_name == "vit_tiny"

    # width 32 has no standard head count
    torch.save(backbone_state(cls=True), tmp_path / "narrow.pth")
    with pytest.raises(ConversionError, match="--num-heads"):
        convert_checkpoint(tmp_path / "narrow.pth", tmp_path / "narrow")


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("blocks.1.mlp.fc2.bias"), r"missing keys \(1\): blocks\.1\.mlp\.fc2\.bias"),
        (lambda s: s.update({"head.weight": torch.zeros(3, 32)}), r"unexpected keys \(1\): head\.weight"),
        (
            lambda s: s.update({"blocks.0.attn.qkv.bias": torch.zeros(95)}),
            r"mis-shaped keys \(1\): blocks\.0\.attn\.qkv\.bias: \(95,\) \(expected \(96,\)\)",
        ),
        (lambda s: s.update({"pos_embed": torch.zeros(1, 15, 32)}), r"square grid"),
    ],
)
def test_bad_keys_are_listed(tmp_path, mutate, message):
    state = backbone_state(cls=True)
    mutate(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(tmp_path / "bad.pth", tmp_path / "out", num_heads=2)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_training_checkpoints(tmp_path):
    checkpoint = selfpatch_training_checkpoint()
    checkpoint["teacher"].pop("ca_head.cls_blocks.1.attn.q.weight")
    checkpoint["teacher"]["extra.thing"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "a.pth")
    with pytest.raises(ConversionError, match=r"Unexpected keys .*extra\.thing"):
        convert_checkpoint(tmp_path / "a.pth", tmp_path / "a", num_heads=2)
    checkpoint["teacher"].pop("extra.thing")
    torch.save(checkpoint, tmp_path / "b.pth")
    with pytest.raises(
        ConversionError, match=r"(?s)ca_head keys .*missing keys \(1\): cls_blocks\.1\.attn\.q\.weight"
    ):
        convert_checkpoint(tmp_path / "b.pth", tmp_path / "b", num_heads=2)

    # DINO heads with BatchNorm (use_bn_in_head) cannot become our heads
    dino = dino_training_checkpoint()
    for side, prefix in (("teacher", "head."), ("student", "module.head.")):
        dino[side][prefix + "mlp.1.weight"] = torch.ones(24)
    torch.save(dino, tmp_path / "bn.pth")
    with pytest.raises(ConversionError, match="BatchNorm"):
        convert_checkpoint(tmp_path / "bn.pth", tmp_path / "bn", num_heads=2)


def test_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="weights_only"):
        load_reference_checkpoint(tmp_path / "text.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="not a checkpoint dictionary"):
        load_reference_checkpoint(tmp_path / "list.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="not a SelfPatch or DINO ViT checkpoint"):
        load_reference_checkpoint(tmp_path / "other.pth")
    # a pickled object outside the allow-list (argparse.Namespace) is refused, never unpickled
    checkpoint = dino_training_checkpoint()
    checkpoint["args"] = argparse.Namespace(started=datetime.datetime(2022, 1, 1))
    torch.save(checkpoint, tmp_path / "pickled.pth")
    with pytest.raises(ConversionError, match="weights_only"):
        load_reference_checkpoint(tmp_path / "pickled.pth")


# ---------------------------------------------------------------------------------------------------------- CLI
def test_command_line(tmp_path):
    torch.save(selfpatch_training_checkpoint(), tmp_path / "checkpoint.pth")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfpatch_hf.conversion",
            str(tmp_path / "checkpoint.pth"),
            str(tmp_path / "out"),
            "--num-heads",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Detected selfpatch-training" in done.stdout and "max abs difference" in done.stdout
    assert "WARNING: No pretraining checkpoint" in done.stderr
    assert (
        json.loads((tmp_path / "out/backbone/config.json").read_text())["model_type"] == "siglip_vision_model"
    )

    bad = backbone_state(cls=False)
    bad.pop("blocks.0.norm1.weight")
    torch.save(bad, tmp_path / "bad.pth")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfpatch_hf.conversion",
            str(tmp_path / "bad.pth"),
            str(tmp_path / "bad"),
            "--num-heads",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1
    assert "missing keys (1): blocks.0.norm1.weight" in done.stderr


def test_aggregation_state_is_validated_for_backbone_conversion_only_where_present(tmp_path):
    # a SelfPatch training checkpoint whose ca_head.norm is mis-shaped fails before anything is written
    checkpoint = selfpatch_training_checkpoint()
    checkpoint["teacher"]["ca_head.norm.weight"] = torch.ones(31)
    torch.save(checkpoint, tmp_path / "c.pth")
    with pytest.raises(ConversionError, match=r"norm\.weight: \(31,\) \(expected \(32,\)\)"):
        convert_checkpoint(tmp_path / "c.pth", tmp_path / "c", num_heads=2)
    assert aggregation_state()["norm.weight"].shape == (32,)


# ------------------------------------------------------------------------------------------- hostile or unlucky input
def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_non_finite_weights_are_named_and_an_earlier_export_survives(tmp_path, monkeypatch):
    good = dino_training_checkpoint()
    torch.save(good, tmp_path / "good.pth")
    convert_checkpoint(tmp_path / "good.pth", tmp_path / "out", num_heads=2)
    before = _files(tmp_path / "out")
    assert "backbone/model.safetensors" in before and "pretraining/model.safetensors" in before

    damaged = dino_training_checkpoint()
    damaged["teacher"]["backbone.blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    damaged["student"]["module.head.last_layer.weight_v"][1, 1] = float("inf")
    torch.save(damaged, tmp_path / "nan.pth")
    with pytest.raises(ConversionError, match="non-finite") as error:
        convert_checkpoint(tmp_path / "nan.pth", tmp_path / "out", num_heads=2)
    message = str(error.value)
    assert "['teacher'] backbone.blocks.1.mlp.fc2.weight" in message
    assert "['student'] head.last_layer.weight_v" in message
    assert "tensor(s)" in message and "report" not in message  # the input is blamed, not the converter
    assert _files(tmp_path / "out") == before

    # a self-check that fails after everything was written: still nothing of the earlier export is touched
    monkeypatch.setattr("selfpatch_hf.conversion.writing.VERIFY_TOLERANCE", -1.0)
    other = dino_training_checkpoint()
    other["teacher"]["backbone.norm.bias"] += 1.0
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="nothing was written"):
        convert_checkpoint(tmp_path / "other.pth", tmp_path / "out", num_heads=2)
    assert _files(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pth", "nan.pth", "other.pth", "out"]

    # a successful conversion replaces the export, with the user's normal permissions
    monkeypatch.setattr("selfpatch_hf.conversion.writing.VERIFY_TOLERANCE", 1e-4)
    convert_checkpoint(tmp_path / "other.pth", tmp_path / "out", num_heads=2)
    assert _files(tmp_path / "out") != before
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out/backbone").stat().st_mode & 0o777 == 0o777 & ~umask
    for file in (tmp_path / "out/backbone").iterdir():  # model.safetensors included (save_pretrained: 0600)
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name


@pytest.mark.parametrize(
    "key",
    ["blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.bias", "blocks.0.norm1.weight"],
)
def test_one_misshaped_tensor_is_the_one_named(tmp_path, key):
    state = backbone_state(cls=True)
    shape = list(state[key].shape)
    shape[0] += 8
    state[key] = torch.zeros(shape)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(tmp_path / "bad.pth", tmp_path / "out", num_heads=2)
    message = str(error.value)
    assert f"mis-shaped keys (1): {key}: {tuple(shape)}" in message, message
    assert "missing" not in message and "unexpected" not in message


def test_one_misshaped_head_tensor_is_the_one_named(tmp_path):
    checkpoint = dino_training_checkpoint()
    checkpoint["teacher"]["head.mlp.0.weight"] = torch.zeros(40, 32)
    torch.save(checkpoint, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=r"mis-shaped keys \(1\): mlp\.0\.weight: \(40, 32\)"):
        convert_checkpoint(tmp_path / "bad.pth", tmp_path / "out", num_heads=2)


@pytest.mark.parametrize("args", ["--arch vit_small", ["vit_small"], 3])
def test_args_that_are_not_a_namespace_are_ignored_with_a_warning(tmp_path, caplog, args):
    checkpoint = dino_training_checkpoint()
    checkpoint["args"] = args
    torch.save(checkpoint, tmp_path / "c.pth")
    result = convert_checkpoint(tmp_path / "c.pth", tmp_path / "out", num_heads=2, pretraining=False)
    assert result.max_abs_difference <= TOLERANCE
    assert "ignoring its 'args' entry" in caplog.text


def test_command_line_errors(tmp_path):
    from selfpatch_hf.conversion.cli import main

    def run(*argv):
        done = subprocess.run(
            [sys.executable, "-m", "selfpatch_hf.conversion", *map(str, argv)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        return done.returncode, done.stderr.strip().splitlines()

    code, lines = run(tmp_path / "missing.pth", tmp_path / "out")
    assert code == 2 and lines == [
        f"selfpatch-convert: error: checkpoint {tmp_path / 'missing.pth'} does not exist or is not a file: give a "
        "reference .pth file."
    ]
    state = backbone_state(cls=True)
    torch.save(state, tmp_path / "c.pth")
    (tmp_path / "file").write_text("")
    assert main([str(tmp_path / "c.pth"), str(tmp_path / "file")]) == 2
    assert main([str(tmp_path / "c.pth"), str(tmp_path / "out"), "--num-heads", "0"]) == 2
    state["pos_embed"][0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    code, lines = run(tmp_path / "nan.pth", tmp_path / "out", "--num-heads", 2)
    assert code == 1 and len(lines) == 1 and "non-finite" in lines[0] and "backbone.pos_embed" in lines[0]
