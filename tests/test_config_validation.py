"""SelfPatchConfig refuses bad values at construction, with errors that `except ValueError` catches."""

from __future__ import annotations

import json

import pytest
from huggingface_hub.errors import StrictDataclassError
from tiny_models import tiny_config

from selfpatch_hf import SelfPatchConfig
from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfigError

NAN = float("nan")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"student_temperature": NAN}, "student_temperature must be a finite number, got nan"),
        ({"patch_loss_weight": NAN}, "patch_loss_weight must be a finite number, got nan"),
        ({"center_momentum": float("inf")}, "center_momentum must be a finite number"),
        ({"aggregation_mlp_ratio": NAN}, "aggregation_mlp_ratio must be a finite number"),
        ({"num_positives": 2.5}, r"num_positives must be a whole number, got 2\.5"),
        ({"num_positives": True}, "num_positives must be a whole number, got True"),
        ({"moby_queue_size": "8"}, "moby_queue_size must be a whole number, got '8'"),
        ({"num_positives": 0}, r"num_positives \(k=0\) must be between 1 and the 8 neighbours"),
        ({"image_representation": "mean"}, "image_representation must be one of"),
        ({"norm_last_layer": "yes"}, "norm_last_layer must be True or False"),
    ],
)
def test_bad_values_are_refused_as_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        SelfPatchConfig(**overrides)
    assert isinstance(error.value, SelfPatchConfigError)
    assert isinstance(error.value, StrictDataclassError)  # what code written against @strict catches
    assert "\n" not in str(error.value)  # the validator's own message, not strict's two-line wrapper


def test_a_dict_backbone_config_needs_its_model_type():
    with pytest.raises(ValueError, match=r'backbone_config given as a dict needs its "model_type"'):
        SelfPatchConfig(backbone_config={"hidden_size": 64, "num_attention_heads": 2})
    config = SelfPatchConfig(
        backbone_config={
            "model_type": "vit",
            "hidden_size": 64,
            "num_attention_heads": 2,
            "intermediate_size": 128,
        }
    )
    assert type(config.backbone_config).__name__ == "ViTConfig" and config.hidden_size == 64


def test_bad_values_are_refused_on_save_and_load(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path / "good")
    assert SelfPatchConfig.from_pretrained(tmp_path / "good").num_positives == config.num_positives
    config.student_temperature = NAN
    with pytest.raises(ValueError, match="student_temperature must be a finite number"):
        config.save_pretrained(tmp_path / "bad")
    data = json.loads((tmp_path / "good" / "config.json").read_text())
    data["num_positives"] = 3.5
    (tmp_path / "good" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="num_positives must be a whole number, got 3.5"):
        SelfPatchConfig.from_pretrained(tmp_path / "good")
