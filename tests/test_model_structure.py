"""The pretraining model's structure: one objective per image-level method and its forward protocol, the backbones'
stochastic depth and Swin windows through subclasses (plain transformers weights and names), the objective's
state under `objective.`, and compilation through the public API."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_moby_swin import tiny
from tiny_models import tiny_config, tiny_dino_config
from transformers import SwinModel, ViTModel
from transformers.models.swin.modeling_swin import SwinLayer
from transformers.models.vit.modeling_vit import ViTLayer

from selfpatch_hf import SelfPatchForPretraining
from selfpatch_hf.models.selfpatch.backbone import StochasticDepthViTLayer, WindowKeepingSwinLayer
from selfpatch_hf.models.selfpatch.objectives import (
    OBJECTIVES,
    DINOObjective,
    ImageObjective,
    MoBYObjective,
    ObjectiveInputError,
    image_objective_class,
)
from selfpatch_hf.training.compilation import compile_for_training, compiled_modules, is_compiled


def build(config, seed: int = 0) -> SelfPatchForPretraining:
    torch.manual_seed(seed)
    return SelfPatchForPretraining(config).train()


# ----------------------------------------------------------------------------- one objective, its protocol


def test_the_config_chooses_one_objective_which_owns_heads_criteria_and_state():
    dino = build(tiny_config())
    assert type(dino.objective) is DINOObjective and image_objective_class("dino") is DINOObjective
    assert {name for name, _ in dino.objective.named_buffers()} == {"image_center", "patch_center"}
    assert dino.student.head_names == ("image_head", "patch_head") == dino.teacher.head_names
    moby = build(tiny("vit", "moby"))
    assert type(moby.objective) is MoBYObjective and set(OBJECTIVES) == {"dino", "moby"}
    assert {name for name, _ in moby.objective.named_buffers()} == {"queue1", "queue2", "queue_ptr"}
    assert set(moby.student.heads()) == {"projector", "predictor", "patch_projector", "patch_predictor"}
    assert set(moby.teacher.heads()) == {"projector", "patch_projector"}  # the target has no predictors
    # the model has no state of its own: every buffer belongs to the objective or to a network
    for model in (dino, moby):
        assert not list(model.buffers(recurse=False)) and not list(model.parameters(recurse=False))
        assert all(n.startswith(("objective.", "student.", "teacher.")) for n in model.state_dict())
    with pytest.raises(ValueError, match=r"image_objective must be one of \('dino', 'moby'\), got 'byol'"):
        image_objective_class("byol")


def test_the_objectives_declare_what_the_training_loop_needs():
    assert DINOObjective.step_inputs == ("teacher_temperature",) and DINOObjective.accepted_inputs == (
        "teacher_temperature",
    )
    assert not DINOObjective.moves_teacher_in_forward and DINOObjective.uses_local_crops
    assert MoBYObjective.step_inputs == () and MoBYObjective.accepted_inputs == ("teacher_momentum",)
    assert MoBYObjective.moves_teacher_in_forward and not MoBYObjective.uses_local_crops
    # DINO's last layers (frozen in the first epoch) are the heads' trainable weight-norm directions; MoBY has none
    dino = build(tiny_config())
    last = dino.get_last_layer_parameters()
    expected = [dino.student.image_head, dino.student.patch_head]
    assert [id(p) for p in last] == [id(h.last_layer.parametrizations.weight.original1) for h in expected]
    assert build(tiny("vit", "moby")).get_last_layer_parameters() == []


def test_an_objective_whose_step_inputs_its_forward_does_not_take_is_refused_at_definition():
    with pytest.raises(TypeError, match=r"step_inputs names \['teacher_temperature'\]"):

        class Broken(ImageObjective):
            step_inputs = ("teacher_temperature",)

            def forward(self, student, teacher, global_groups, local_groups, *, update_state, momentum=None):
                raise NotImplementedError


@pytest.mark.parametrize(
    ("objective", "inputs", "message"),
    [
        (
            "dino",
            {"teacher_momentum": 0.99},
            r"^DINO takes teacher_temperature, not teacher_momentum\. DINO moves the teacher after the optimiser "
            r"step: call model\.update_teacher\(momentum\)",
        ),
        ("dino", {"temperature": 0.04}, r"^DINO takes teacher_temperature, not temperature\.$"),
        (
            "moby",
            {"teacher_temperature": 0.04},
            r"^MoBY takes teacher_momentum, not teacher_temperature\. MoBY's temperature is the config's "
            r"moby_temperature",
        ),
    ],
)
def test_inputs_the_objective_does_not_take_are_refused_in_one_line(objective, inputs, message):
    config = tiny_config() if objective == "dino" else tiny("vit", "moby")
    model = build(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ObjectiveInputError, match=message) as error:
        model(torch.randn(2, 2, 3, 32, 32), **inputs)
    assert isinstance(error.value, TypeError) and isinstance(error.value, ValueError)
    assert "\n" not in str(error.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # refused before anything ran


def test_update_centers_is_a_deprecated_alias_of_update_state():
    model = build(tiny_dino_config(drop_path_rate=0.0))
    crops = torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 3, 16, 16)
    center = model.objective.image_center.clone()
    with pytest.warns(FutureWarning, match="update_centers is deprecated: pass update_state"):
        old = model(*crops, update_centers=False)
    assert torch.equal(center, model.objective.image_center)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = model(*crops, update_state=False)
    assert torch.equal(old.loss, new.loss) and torch.equal(center, model.objective.image_center)
    with pytest.raises(ValueError, match="update_state=True and update_centers=False disagree"):
        with pytest.warns(FutureWarning):
            model(*crops, update_state=True, update_centers=False)


def test_moby_target_moves_in_the_forward_only_when_given_a_momentum():
    model = build(tiny("vit", "moby", drop_path_rate=0.0))
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.1)
    views = torch.randn(2, 2, 3, 32, 32)
    before = [p.clone() for p in model.teacher.parameters()]
    model(views, None)  # a later micro-batch of an accumulated step: no momentum, no step
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))
    model(views, None, teacher_momentum=0.5)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))


# ----------------------------------------------------------------------------- backbones: subclasses, plain weights


def test_stochastic_depth_vit_layers_hold_exactly_a_vit_models_weights_and_names():
    config = tiny_config(drop_path_rate=0.4)
    model = build(config)
    student, teacher = model.student.backbone, model.teacher.backbone
    assert type(student) is ViTModel and type(teacher) is ViTModel
    assert all(type(layer) is StochasticDepthViTLayer for layer in student.layers)
    assert all(type(layer) is ViTLayer for layer in teacher.layers)
    plain = ViTModel(config.backbone_config, add_pooling_layer=False)
    assert student.state_dict().keys() == plain.state_dict().keys() == teacher.state_dict().keys()
    assert not plain.load_state_dict(student.state_dict(), strict=True).missing_keys
    # the same weights as a model built without stochastic depth from the same seed (same random draws)
    same_seed = build(tiny_config(drop_path_rate=0.0))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, same_seed.state_dict()[name]), name


def test_stochastic_depth_matches_the_formula_and_is_off_in_eval_mode():
    model = build(tiny_config(drop_path_rate=0.5))
    layer = model.student.backbone.layers[1]  # rate 0.5
    hidden = torch.randn(6, 5, 32)
    with torch.no_grad():
        layer.eval()
        attention = layer.attention(layer.layernorm_before(hidden))[0]
        middle = hidden + attention
        expected_eval = middle + layer.mlp(layer.layernorm_after(middle))
        torch.testing.assert_close(layer(hidden), expected_eval, rtol=0, atol=0)
        layer.train()
        torch.manual_seed(3)
        out = layer(hidden)
        torch.manual_seed(3)  # the same two per-sample masks, drawn as DropPath draws them
        keep = [torch.empty(6, 1, 1).bernoulli_(0.5) for _ in range(2)]
        middle = hidden + attention * keep[0] / 0.5
        expected = middle + layer.mlp(layer.layernorm_after(middle)) * keep[1] / 0.5
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    kept = [bool(k.flatten()[i]) for k in keep for i in range(6)]
    assert 0 < sum(kept) < 12  # some samples dropped a branch, some kept it


def test_swin_blocks_keep_their_window_and_the_weights_of_a_plain_swin_model():
    config = tiny("swin", "dino", window_size=4, num_positives=3)
    model = build(config).eval()
    backbone = model.teacher.backbone
    blocks = [block for stage in backbone.encoder.layers for block in stage.blocks]
    assert all(type(block) is WindowKeepingSwinLayer and isinstance(block, SwinLayer) for block in blocks)
    assert (
        backbone.state_dict().keys()
        == SwinModel(config.backbone_config, add_pooling_layer=False).state_dict().keys()
    )

    def plain_swin(pixels: torch.Tensor) -> torch.Tensor:
        # a fresh SwinModel each time: transformers' own blocks keep a window they shrank for a smaller input
        plain = SwinModel(config.backbone_config, add_pooling_layer=False).eval()
        plain.load_state_dict(backbone.state_dict())
        return plain(pixels).last_hidden_state

    configured = [(block.window_size, block.shift_size) for block in blocks]
    assert configured == [(4, 0), (4, 0), (4, 0), (4, 2)]  # the second block of a stage is shifted
    with torch.no_grad():
        model.teacher.encode(
            torch.randn(1, 3, 16, 16)
        )  # stage grids 8, 4, 2: the last padded into the window
        assert [(b.window_size, b.shift_size) for b in blocks] == [(4, 0)] * 4
        for size in (32, 48):  # grids 16, 8, 4 (one window: no shift) and 24, 12, 6 (shifted again)
            pixels = torch.randn(1, 3, size, size)
            torch.testing.assert_close(model.teacher.encode(pixels)[1], plain_swin(pixels), rtol=0, atol=1e-6)
        assert [(b.window_size, b.shift_size) for b in blocks] == configured


def test_swin_activation_checkpointing_recomputes_each_crop_size_with_its_own_windows():
    """The window and shift are set inside each block's forward, so the backward pass's recomputation of an earlier
    crop size uses that size's shift, not the one the last crop size left behind."""

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = build(tiny("swin", "dino", num_positives=3, drop_path_rate=0.0))
        if checkpointing:
            model.student.backbone.activation_checkpointing_enable()
        generator = torch.Generator().manual_seed(1)
        global_crops = torch.randn(2, 2, 3, 32, 32, generator=generator)  # last stage 4x4 > window 2: shifted
        local_crops = [torch.randn(2, 3, 16, 16, generator=generator)]  # 2x2: no shift
        model(global_crops, local_crops).loss.backward()
        return {n: p.grad for n, p in model.student.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- compilation through the public API


def test_compilation_is_recorded_without_touching_the_modules():
    model = build(tiny("vit", "moby"))
    modules = compile_for_training(model, backend="aot_eager")
    assert modules == compiled_modules(model) and all(is_compiled(m) for m in modules)
    names = {id(m) for m in modules}
    heads = [h for network in (model.student, model.teacher) for h in network.heads().values()]
    assert names == {id(m) for m in [model.student.backbone, model.teacher.backbone, *heads]}
    assert not is_compiled(model.student.aggregation) and not is_compiled(
        build(tiny("vit", "moby")).student.backbone
    )
