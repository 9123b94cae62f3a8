"""Checkpoints written by the model before it was split by concern (model type `selfpatch_vit`, the objective's
state at the top level) load into today's model with identical tensors and compute what the old code computed.
`tests/legacy_checkpoints.py` says how the fixtures were made."""

from __future__ import annotations

import json

import pytest
import torch
from legacy_checkpoints import (
    ACCELERATE_CASES,
    CASES,
    FIXTURES,
    LEGACY_STATE_NAMES,
    current_config_kwargs,
    objective_state,
    record,
)
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForPreTraining

from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining


def current_name(key: str) -> str:
    return f"objective.{key}" if key in LEGACY_STATE_NAMES else key


def backbone_key(key: str) -> bool:
    # the backbones' on-disk names are transformers' v4 names, which from_pretrained maps to the live ones
    return key.startswith(("student.backbone.", "teacher.backbone."))


@pytest.mark.parametrize("case", list(CASES))
def test_an_old_save_pretrained_folder_loads_with_identical_tensors_and_losses(case, tmp_path):
    folder = FIXTURES / case
    assert json.loads((folder / "config.json").read_text())["model_type"] == "selfpatch_vit"
    config = AutoConfig.from_pretrained(folder)
    assert type(config) is SelfPatchConfig and config.model_type == "selfpatch"
    direct = SelfPatchConfig.from_pretrained(folder)
    assert direct.model_type == "selfpatch"
    assert {**direct.to_dict(), "_name_or_path": None} == {**config.to_dict(), "_name_or_path": None}
    model, info = AutoModelForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert type(model) is SelfPatchForPretraining
    # nothing was left to a random initialisation, nothing was dropped
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    for key, tensor in saved.items():
        if not backbone_key(key):
            assert torch.equal(state[current_name(key)], tensor), key
    assert set(objective_state(model)) == {key for key in saved if key in LEGACY_STATE_NAMES}
    assert not any(p.requires_grad for p in model.teacher.parameters())

    # the old code's losses on this folder, and its state after a training-mode call. Tolerance: loaded tensors may
    # sit at other memory alignments and another CPU picks other kernels, which changes the last bits (seen: up to
    # 2.2e-6 in the unit-norm MoBY queue keys after one training step on another CPU); a changed computation moves these
    # values by 1e-3 or more.
    expected = load_file(FIXTURES / "expected.safetensors")
    got = record(model, case)
    assert set(got) == {key for key in expected if key.startswith(f"{case}.")}
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=5e-6, msg=key)

    # saved again: today's model type, and the same names on disk (the objective's state keeps its former names
    # there, as the backbones keep transformers' v4 names), so it loads to the same tensors
    model.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["model_type"] == "selfpatch"
    resaved = load_file(tmp_path / "resaved" / "model.safetensors")
    assert resaved.keys() == saved.keys()
    reloaded = SelfPatchForPretraining.from_pretrained(tmp_path / "resaved")
    state = model.state_dict()
    assert reloaded.state_dict().keys() == state.keys()
    assert all(torch.equal(tensor, state[key]) for key, tensor in reloaded.state_dict().items())


@pytest.mark.parametrize("case", ACCELERATE_CASES)
def test_an_old_accelerate_checkpoint_loads_with_identical_tensors(case):
    """What a training run resumes: `Accelerator.load_state` (a `load_state_dict` under the hood) of an old
    checkpoint into a freshly built model. The old `save_pretrained` folder of the same model agrees with it."""
    from accelerate import Accelerator

    preset, kwargs = current_config_kwargs(case)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(SelfPatchForPretraining(SelfPatchConfig.from_preset(preset, **kwargs)))
    accelerator.load_state(FIXTURES / "accelerate" / case)
    saved = load_file(FIXTURES / "accelerate" / case / "model.safetensors")
    state = accelerator.unwrap_model(model).state_dict()
    assert set(state) == {current_name(key) for key in saved}
    for key, tensor in saved.items():
        assert torch.equal(state[current_name(key)], tensor), key
    from_folder = SelfPatchForPretraining.from_pretrained(FIXTURES / case).state_dict()
    assert all(torch.equal(from_folder[key], tensor) for key, tensor in state.items())
    # load_state_dict itself, strict, with the old names
    fresh = SelfPatchForPretraining(SelfPatchConfig.from_preset(preset, **kwargs))
    fresh.load_state_dict(saved)
    assert all(torch.equal(fresh.state_dict()[key], tensor) for key, tensor in state.items())


def test_an_old_training_checkpoint_passes_the_resume_check_and_a_changed_setting_does_not():
    """A training checkpoint's trainer_state.json records the model config, with the old model type."""
    from selfpatch_hf.cli.errors import UsageError
    from selfpatch_hf.training.resume import check_resumable, config_snapshot

    config = SelfPatchConfig.from_pretrained(FIXTURES / "dino_vit_selfpatch")
    saved = {**config_snapshot(config), "model_type": "selfpatch_vit"}
    trainer_state = {"global_batch_size": 4, "arguments": {}, "model_config": saved}
    check_resumable(
        trainer_state, "checkpoint-1", global_batch_size=4, arguments={}, model_config=config_snapshot(config)
    )
    changed = SelfPatchConfig.from_pretrained(FIXTURES / "dino_vit_selfpatch", num_positives=2)
    with pytest.raises(UsageError, match="num_positives: saved 3, now 2"):
        check_resumable(
            trainer_state,
            "checkpoint-1",
            global_batch_size=4,
            arguments={},
            model_config=config_snapshot(changed),
        )
