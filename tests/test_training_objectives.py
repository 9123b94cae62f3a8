"""training/pretrain.py on every image objective x backbone x patch objective: 2 optimiser steps, a checkpoint after
the first, a second run resumed from it that ends bit-identical (weights, centres, MoBY's queues and pointer), and
the exported backbone. Runs in-process with tiny models (a few seconds per combination); the objective's own
training defaults are checked too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training_components import load_pretrain_script
from tiny_images import write_parquet_images
from tiny_models import TINY_BACKBONE, TINY_METHOD
from training_runs import TINY_CROPS
from transformers import AutoModel, SwinModel, ViTModel

from selfpatch_hf.models.selfpatch.recipes import OBJECTIVE_RECIPES
from selfpatch_hf.training.arguments.pretraining import apply_objective_defaults

# the tiny recipe's model (tests/training_runs.py), as config overrides; a Swin of the same scale
TINY_VIT = [f"{k}={v}" for k, v in TINY_BACKBONE.items() if k != "image_size"]
TINY_SWIN = ["embed_dim=8", "depths=[1,1,2]", "num_heads=[1,2,4]", "patch_size=2", "window_size=2"]
TINY_DINO = [f"{k}={v}" for k, v in TINY_METHOD.items()]
TINY_MOBY = ["moby_projection_dim=8", "moby_projector_hidden_dim=16", "moby_predictor_hidden_dim=12"]
TINY_MOBY += ["moby_queue_size=12"]
COMBINATIONS = [
    (objective, backbone, patch)
    for objective in ("dino", "moby")
    for backbone in ("vit", "swin")
    for patch in (False, True)
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_parquet_images(tmp_path_factory.mktemp("images") / "data", num_images=14, num_shards=2)


@pytest.fixture(scope="module")
def pretrain():
    return load_pretrain_script()


def _overrides(objective: str, backbone: str, patch: bool) -> list[str]:
    overrides = [f"image_objective={objective}"]
    overrides += TINY_SWIN if backbone == "swin" else TINY_VIT
    overrides += TINY_MOBY if objective == "moby" else TINY_DINO
    if not patch:
        representation = "average_pool" if backbone == "swin" else "cls"
        overrides += ["patch_loss_weight=0", f"image_representation={representation}"]
    return overrides


def _run(pretrain, data: Path, output_dir: Path, overrides: list[str], *extra: str):
    from accelerate.state import AcceleratorState

    preset = "swin-tiny-patch4-window7" if "window_size=2" in overrides else "vit-tiny-patch16"
    crops = {"global_crop_size": TINY_CROPS["global_crop_size"]}
    if "image_objective=dino" in overrides:
        crops.update(TINY_CROPS)
    argv = [
        "--preset", preset, *(token for k, v in crops.items() for token in (f"--{k}", str(v))),
        "--config_overrides", *overrides, "--dataset_name", str(data),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "3", "--samples_per_epoch", "12",
        "--max_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--num_workers", "0",
        "--shuffle_buffer_size", "0", "--logging_steps", "1", "--learning_rate", "0.05", "--cpu", *extra,
    ]  # fmt: skip
    try:
        result = pretrain.train(*pretrain.parse_arguments(argv))
        state = {name: value.detach().clone() for name, value in result.model.state_dict().items()}
        return result, state
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "objective, backbone, patch",
    COMBINATIONS,
    ids=[f"{o}-{b}-{'selfpatch' if p else 'plain'}" for o, b, p in COMBINATIONS],
)
def test_every_combination_trains_checkpoints_resumes_exactly_and_exports(
    tmp_path, data, pretrain, objective, backbone, patch
):
    overrides = _overrides(objective, backbone, patch)
    reference, reference_state = _run(pretrain, data, tmp_path / "reference", overrides)
    assert reference.global_step == 2 and reference.stopped_by is None
    model = reference.model
    assert model.config.image_objective == objective and model.config.use_patch_objective == patch
    assert model.config.backbone_type == backbone

    checkpoint = tmp_path / "reference" / "checkpoints" / "checkpoint-1"
    resumed, resumed_state = _run(
        pretrain, data, tmp_path / "resumed", overrides, "--resume_from_checkpoint", str(checkpoint)
    )
    assert resumed.global_step == 2
    assert resumed_state.keys() == reference_state.keys()
    different = [k for k, v in reference_state.items() if not torch.equal(v, resumed_state[k])]
    assert not different, f"resumed run differs in {different}"

    # the run trained: the student moved away from the teacher (DINO) / the queues hold this run's keys (MoBY)
    if objective == "moby":
        assert reference_state["objective.queue_ptr"].item() == 2 * 3  # 2 steps of 3 images, queue of 12
        written = reference_state["objective.queue1"][:, :6]
        torch.testing.assert_close(written.norm(dim=0), torch.ones(6))  # L2-normalised keys
        assert not torch.equal(reference_state["objective.queue1"], reference_state["objective.queue2"])
    student = {
        k[len("student.") :]: v for k, v in reference_state.items() if k.startswith("student.backbone.")
    }
    teacher = {
        k[len("teacher.") :]: v for k, v in reference_state.items() if k.startswith("teacher.backbone.")
    }
    assert student.keys() == teacher.keys() and any(not torch.equal(student[k], teacher[k]) for k in student)

    backbone_dir = tmp_path / "reference" / "backbone"
    exported = AutoModel.from_pretrained(backbone_dir).eval()
    assert type(exported) is (SwinModel if backbone == "swin" else ViTModel)
    with torch.no_grad():
        tokens = exported(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state
    assert tokens.shape == (
        (1, 16, 32) if backbone == "swin" else (1, 17, 32)
    )  # Swin: stride 8; ViT: CLS + 4x4


@pytest.mark.parametrize("objective", ["dino", "moby"])
def test_unset_training_options_take_the_objectives_defaults(pretrain, objective, tmp_path):
    argv = ["--config_overrides", f"image_objective={objective}", "--output_dir", str(tmp_path)]
    model_args, data_args, training_args, overrides = pretrain.parse_arguments(argv)
    assert (
        training_args.clip_grad is None
        and training_args.weight_decay is None
        and data_args.num_local_crops is None
    )
    config, crops = pretrain.build_config(model_args, data_args, training_args, overrides)
    # the reference values (DINO's main_dino.py / SelfPatch's; MoBY's Transformer-SSL config.py and moby_*.yaml,
    # its learning rates per 512 images written per 256)
    expected = {
        "dino": (3.0, "per_parameter", 0.04, 0.4, 10, 0.996, 1e-6, 0.0, "peak"),
        "moby": (5.0, "global", 0.05, 0.05, 5, 0.99, 5e-6 / 2, 5e-7 / 2, "all"),
    }[objective]
    assert (
        training_args.clip_grad,
        training_args.clip_grad_mode,
        training_args.weight_decay,
        training_args.weight_decay_end,
        training_args.warmup_epochs,
        training_args.teacher_momentum,
        training_args.min_learning_rate,
        training_args.warmup_learning_rate,
        training_args.learning_rate_scaling,
    ) == expected
    assert (crops.num_local_crops, crops.global_crops_scale, crops.interpolation, config.drop_path_rate) == {
        "dino": (8, (0.25, 1.0), "bicubic", 0.1),
        "moby": (0, (0.08, 1.0), "bilinear", 0.2),
    }[objective]
    assert crops.global_crop_size == 224 and config.backbone_config.image_size == 224
    # MoBY's 1e-3 per 512 images is the script's 5e-4 per 256 (the linear scaling rule), momentum cosine to 1
    assert training_args.learning_rate == 5e-4 and training_args.teacher_momentum_end == 1.0

    # an option given explicitly wins over the objective's default
    model_args, data_args, training_args, overrides = pretrain.parse_arguments(
        [*argv, "--clip_grad", "1.5", "--num_local_crops", "0"]
    )
    apply_objective_defaults(objective, data_args, training_args)
    assert training_args.clip_grad == 1.5 and data_args.num_local_crops == 0


def test_options_with_a_plain_default_agree_across_the_objectives_recipes(pretrain):
    """An option shows one default in --help only when every objective's recipe has that value; the others are
    unset until the objective is known (apply_objective_defaults)."""
    import dataclasses

    defaults = {name: recipe.option_defaults() for name, recipe in OBJECTIVE_RECIPES.items()}
    fields = {
        f.name: f
        for group in (pretrain.DataArguments, pretrain.PretrainingArguments)
        for f in dataclasses.fields(group)
    }
    assert set(defaults["dino"]) <= set(fields)
    for name, dino_value in defaults["dino"].items():
        if fields[name].default is not None:
            assert fields[name].default == dino_value == defaults["moby"][name], name


def test_moby_step_clips_the_global_norm_and_moves_the_target_once(pretrain, monkeypatch):
    """train_step with MoBY and 2 micro-batches: the target's momentum step happens once per optimiser step (inside
    the first micro-batch's forward; the second passes no momentum and there is no EMA after the step), and the
    gradient is clipped to one norm over all trained parameters."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining
    from selfpatch_hf.training.loop import train_step
    from selfpatch_hf.training.optimization import build_optimizer
    from selfpatch_hf.training.schedules import PretrainingSchedule, ScheduleRecipe

    tiny = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2}
    tiny.update(patch_size=8, image_size=32, moby_projection_dim=8, moby_projector_hidden_dim=16)
    tiny.update(moby_predictor_hidden_dim=12, moby_queue_size=12)
    config = SelfPatchConfig.from_preset("vit-tiny-patch16", image_objective="moby", **tiny)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    try:
        model = SelfPatchForPretraining(config)
        with torch.no_grad():  # teacher != student, so that a momentum step shows
            for parameter in model.teacher.parameters():
                parameter.add_(torch.randn_like(parameter))
        optimizer = build_optimizer(
            model.student
        )  # learning rate 0 until a schedule sets it: the student stays
        model, optimizer = accelerator.prepare(model, optimizer)
        unwrapped = accelerator.unwrap_model(model)
        teacher_before = {n: p.detach().clone() for n, p in unwrapped.teacher.named_parameters()}
        student = {n: p.detach().clone() for n, p in unwrapped.student.named_parameters()}
        schedule = PretrainingSchedule.from_recipe(
            ScheduleRecipe(teacher_momentum=0.5), steps_per_epoch=1, total_steps=2, global_batch_size=6
        )
        clipped = {}
        original = torch.nn.utils.clip_grad_norm_

        def recording(parameters, max_norm, *args, **kwargs):
            parameters = list(parameters)
            clipped.update(count=len(parameters), max_norm=max_norm)
            clipped["before"] = original(parameters, max_norm, *args, **kwargs).item()
            clipped["after"] = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in parameters])
            ).item()
            return torch.tensor(clipped["before"])

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
        batches = [(torch.randn(3, 2, 3, 32, 32), torch.empty(3, 0, 3, 16, 16)) for _ in range(2)]
        result = train_step(
            accelerator, model, optimizer, batches, schedule.at(0), 1e-3, clip_grad_mode="global"
        )

        assert result.patch_loss is not None and result.loss > 0
        trained = [p for p in unwrapped.student.parameters() if p.requires_grad]
        assert clipped["count"] == len(trained) and clipped["max_norm"] == 1e-3
        assert clipped["before"] > 1e-3 and clipped["after"] == pytest.approx(1e-3, rel=1e-3)
        for name, target in unwrapped.teacher.named_parameters():
            torch.testing.assert_close(target.detach(), 0.5 * teacher_before[name] + 0.5 * student[name])
        assert unwrapped.objective.queue_ptr.item() == 6  # both micro-batches enqueued their 3 keys
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


COCO_RECIPES = sorted((Path(__file__).resolve().parents[1] / "training" / "configs" / "coco").glob("*.yaml"))


@pytest.mark.parametrize("recipe", COCO_RECIPES, ids=lambda path: path.stem)
def test_coco_recipes_build_the_rows_they_name(pretrain, recipe, tmp_path):
    """training/configs/coco/{dino,moby}[_selfpatch[_no_negatives]]_{vit,swin}_tiny.yaml: the paper's COCO rows."""
    model_args, data_args, training_args, overrides = pretrain.parse_arguments([str(recipe)])
    stated = {name: getattr(training_args, name) for name in vars(training_args)}
    config, crops = pretrain.build_config(model_args, data_args, training_args, overrides)
    training_args.output_dir = str(tmp_path)
    pretrain.validate_arguments(data_args, training_args)
    name = recipe.stem
    objective = name.split("_")[0]
    assert config.image_objective == objective
    assert config.backbone_type == ("swin" if name.endswith("swin_tiny") else "vit")
    if config.backbone_type == "vit":
        assert (config.backbone_config.hidden_size, config.patch_size) == (192, 16)  # ViT-Ti/16
    else:
        assert (config.backbone_config.embed_dim, list(config.backbone_config.depths)) == (96, [2, 2, 6, 2])
    assert config.use_patch_objective == ("selfpatch" in name)
    if "selfpatch" in name:
        assert config.image_representation == "aggregation" and config.patch_loss_weight == 0.1
    if objective == "moby":
        assert (crops.num_local_crops, crops.global_crops_scale, crops.interpolation) == (
            0,
            (0.08, 1.0),
            "bilinear",
        )
        assert config.drop_path_rate == 0.2
        if "selfpatch" in name:
            assert config.patch_negatives == ("no_negatives" not in name)
    else:
        assert (crops.num_local_crops, crops.local_crop_size) == (8, 96)
    assert crops == OBJECTIVE_RECIPES[objective].crops
    assert data_args.samples_per_epoch == 118287 and training_args.epochs == 200
    # the recipe states the objective's schedule and clipping explicitly, and they are the objective's recipe
    defaults = OBJECTIVE_RECIPES[objective].option_defaults()
    schedule = {name: value for name, value in defaults.items() if hasattr(training_args, name)}
    assert {name: stated[name] for name in schedule} == schedule
