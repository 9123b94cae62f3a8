"""Building blocks of the pretraining script, in-process: optimiser groups and clipping, checkpoint files, stop
signals, background Hub uploads, argument parsing and early argument errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hub_server import closed_port, stalled_endpoint
from tiny_models import tiny_config, tiny_dino_config
from training_runs import TINY_PRESET, prepared_model, tiny_arguments, train_a_bit

from selfpatch_hf import SelfPatchForPretraining
from selfpatch_hf.hub.uploads import AsyncHubUploader
from selfpatch_hf.training.checkpointing import (
    COMPLETE_MARKER,
    CheckpointManager,
    checkpoint_step,
    list_checkpoints,
    resolve_checkpoint,
)
from selfpatch_hf.training.optimization import (
    apply_schedule,
    build_optimizer,
    build_param_groups,
    cancel_gradients,
    clip_gradients,
    clip_gradients_per_parameter,
)
from selfpatch_hf.training.preemption import StopRequest
from selfpatch_hf.training.schedules import PretrainingSchedule

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain", REPO_ROOT / "training" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain"] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------------ optimiser
def test_param_groups_follow_dino():
    model = SelfPatchForPretraining(tiny_config())
    decayed, not_decayed = build_param_groups(model.student)
    names = {id(p): n for n, p in model.student.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    not_decayed_names = {names[id(p)] for p in not_decayed["params"]}
    expected_not_decayed = {
        n
        for n, p in model.student.named_parameters()
        if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)
    }
    assert not_decayed_names == expected_not_decayed
    assert decayed_names | not_decayed_names == {
        n for n, p in model.student.named_parameters() if p.requires_grad
    }
    assert not decayed_names & not_decayed_names
    # DINO: tokens and position embeddings (not 1-D) and the heads' directions are decayed; norms and biases not
    assert "backbone.embeddings.cls_token" in decayed_names
    assert "backbone.embeddings.position_embeddings" in decayed_names
    assert "aggregation.cls_token" in decayed_names
    assert "image_head.last_layer.parametrizations.weight.original1" in decayed_names
    assert "backbone.layernorm.weight" in not_decayed_names
    # the frozen weight-norm magnitude and the teacher are not optimised
    all_params = {id(p) for group in (decayed, not_decayed) for p in group["params"]}
    assert id(model.student.image_head.last_layer.parametrizations.weight.original0) not in all_params
    assert not all_params & {id(p) for p in model.teacher.parameters()}


def test_apply_schedule_sets_lr_everywhere_and_weight_decay_on_the_decayed_group_only():
    model = SelfPatchForPretraining(tiny_dino_config())
    optimizer = build_optimizer(model.student)
    schedule = PretrainingSchedule.from_epochs(
        steps_per_epoch=10, total_steps=100, base_learning_rate=5e-4, global_batch_size=256, warmup_epochs=2
    )
    values = schedule.at(37)
    apply_schedule(optimizer, values)
    assert [g["lr"] for g in optimizer.param_groups] == [values.learning_rate] * 2
    assert optimizer.param_groups[0]["weight_decay"] == values.weight_decay
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_per_parameter_clipping_matches_dino_clip_gradients():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(7, 5), (11,), (3, 3, 2), (4,)]]
    scales = [10.0, 0.01, 3.0, 1e-4]
    for p, scale in zip(params, scales):
        p.grad = torch.randn_like(p) * scale
    p_none = torch.nn.Parameter(torch.randn(3))  # no gradient: ignored
    expected = []
    for p in params:  # DINO's utils.clip_gradients
        grad = p.grad.clone()
        norm = grad.norm(2)
        coef = 3.0 / (norm + 1e-6)
        if coef < 1:
            grad.mul_(coef)
        expected.append(grad)
    untouched = [p.grad.clone() for p in params]
    norms = clip_gradients_per_parameter([*params, p_none], 3.0)
    for p, reference, before in zip(params, expected, untouched):
        torch.testing.assert_close(p.grad, reference, rtol=1e-6, atol=0)
        if before.norm() <= 3.0:
            assert torch.equal(p.grad, before)  # untouched tensors stay bit-identical
        else:
            assert p.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(norms, torch.stack([b.norm() for b in untouched]))
    assert p_none.grad is None


@pytest.mark.parametrize("mode", ["per_parameter", "global", "none"])
def test_clip_gradients_returns_the_norm_before_clipping(mode):
    """The training step's clip reports the total gradient norm the divergence check reads: the norm of all
    gradients before clipping, whichever clip runs (frozen parameters are left out)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(7, 5), (11,), (3, 3, 2)]]
    for p, scale in zip(params, [10.0, 0.01, 3.0]):
        p.grad = torch.randn_like(p) * scale
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    before = [p.grad.clone() for p in params]
    expected = math.sqrt(sum(float(g.double().pow(2).sum()) for g in before))
    max_norm = 0.0 if mode == "none" else 2.0
    total = clip_gradients([*params, frozen], max_norm, "per_parameter" if mode == "none" else mode)
    assert total == pytest.approx(expected, rel=1e-6)
    after = [p.grad for p in params]
    if mode == "none":
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    elif mode == "global":
        assert math.sqrt(sum(float(g.pow(2).sum()) for g in after)) == pytest.approx(2.0, rel=1e-5)
    else:
        assert max(g.norm().item() for g in after) == pytest.approx(2.0, rel=1e-5)
    with pytest.raises(ValueError, match="mode"):
        clip_gradients(params, 1.0, "layerwise")


def test_cancelled_last_layer_gets_no_update():
    model = SelfPatchForPretraining(tiny_config())
    optimizer = build_optimizer(model.student, weight_decay=0.1)
    apply_schedule(
        optimizer,
        PretrainingSchedule.from_epochs(
            steps_per_epoch=5, total_steps=10, base_learning_rate=0.05, global_batch_size=256, warmup_epochs=0
        ).at(0),
    )
    last = model.get_last_layer_parameters()
    assert len(last) == 2  # image and patch heads' directions (the magnitudes are frozen)
    before = {id(p): p.detach().clone() for p in model.student.parameters()}
    out = model(torch.randn(2, 2, 3, 32, 32), torch.randn(2, 4, 3, 16, 16))
    out.loss.backward()
    cancel_gradients(last)
    optimizer.step()
    for p in model.student.parameters():
        if not p.requires_grad:
            continue
        changed = not torch.equal(p.detach(), before[id(p)])
        assert changed == all(p is not q for q in last), "only the last layers stay frozen"


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_rotate_and_round_trip(tmp_path, accelerator):
    model, optimizer = prepared_model(accelerator)
    manager = CheckpointManager(accelerator, tmp_path, total_limit=2)
    for step in (1, 2, 3):
        train_a_bit(model, optimizer)
        manager.save(step, {"global_batch_size": 5, "num_processes": 1}, {"data": {"position": step}})
    assert [checkpoint_step(p) for p in list_checkpoints(manager.directory)] == [2, 3]
    assert sorted(p.name for p in manager.directory.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    latest = manager.latest()
    assert latest.name == "checkpoint-3"
    saved = model.weight.detach().clone()
    rng_after_save = torch.rand(3)

    train_a_bit(model, optimizer)  # move away, then come back
    trainer_state, rank_state = manager.load(latest)
    assert torch.equal(model.weight, saved)
    assert trainer_state["step"] == 3 and rank_state == {"data": {"position": 3}}
    assert torch.equal(torch.rand(3), rng_after_save)  # RNG restored too


def test_a_checkpoint_of_another_model_is_rejected_naming_the_mismatches(tmp_path, accelerator):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    prepared_model(accelerator)  # Linear(4, 3)
    path = CheckpointManager(accelerator, tmp_path).save(1, {"num_processes": 1}, {})
    AcceleratorState._reset_state(reset_partial_state=True)
    other = Accelerator(cpu=True)
    wider = torch.nn.Linear(4, 5)
    other.prepare(wider, torch.optim.AdamW(wider.parameters()))
    with pytest.raises(ValueError, match=r"does not fit this model(.|\n)*size mismatch for weight") as error:
        CheckpointManager(other, tmp_path).load(path)
    assert "trainer_state.json records them" in str(error.value)


def test_a_half_written_checkpoint_is_never_picked(tmp_path, accelerator):
    model, optimizer = prepared_model(accelerator)
    manager = CheckpointManager(accelerator, tmp_path, total_limit=3)
    manager.save(10, {}, {})

    def crash(staging):
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        manager.save(20, {}, {}, before_rename=crash)
    assert (manager.directory / ".tmp-checkpoint-20").is_dir()  # what a killed run leaves behind
    assert manager.latest().name == "checkpoint-10"
    # a folder with a checkpoint's name but no COMPLETE marker (e.g. copied by hand, interrupted)
    fake = manager.directory / "checkpoint-30"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"partial")
    assert manager.latest().name == "checkpoint-10"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_checkpoint(manager.directory, str(fake))
    with pytest.raises(FileNotFoundError, match="No checkpoint folder"):
        resolve_checkpoint(manager.directory, str(tmp_path / "nope"))
    # the next save cleans the leftovers of the crashed one
    manager.save(40, {}, {})
    assert not (manager.directory / ".tmp-checkpoint-20").exists()
    assert manager.latest().name == "checkpoint-40" and (manager.latest() / COMPLETE_MARKER).is_file()
    assert resolve_checkpoint(tmp_path / "empty", "latest") is None


# ---------------------------------------------------------------------------------------------------- signals
def test_sigterm_and_sigint_become_a_stop_request():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second SIGINT aborts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is previous


# ------------------------------------------------------------------------------------------------- hub uploads
def _export_folder(path: Path, content: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(content)
    (path / "config.json").write_text('{"model_type": "vit"}')
    return path


def test_upload_to_a_loopback_hub_is_asynchronous_and_succeeds(tmp_path, hub_server):
    uploader = AsyncHubUploader(
        "loopback-user/tiny", tmp_path / "staging", endpoint=hub_server.endpoint, token=hub_server.token
    )
    export = _export_folder(tmp_path / "backbone", b"weights-1")
    outcome = uploader.submit(export, step=5)
    assert outcome.status == "pending"
    export_2 = tmp_path / "backbone-2"
    _export_folder(export_2, b"weights-2")
    uploader.submit(export_2, step=10)
    outcomes = uploader.wait(timeout=60)
    assert [o.status for o in outcomes] == ["uploaded", "uploaded"]
    assert all(o.attempts == 1 and o.commit_url for o in outcomes)
    files = hub_server.files("loopback-user/tiny")
    assert files["model.safetensors"] == b"weights-2" and files["config.json"] == b'{"model_type": "vit"}'
    assert not any((tmp_path / "staging").iterdir())  # snapshots removed once uploaded
    assert (export / "model.safetensors").read_bytes() == b"weights-1"  # the local exports are untouched
    assert "uploaded to loopback-user/tiny" in uploader.report()[1]


def test_upload_to_a_dead_endpoint_is_retried_reported_and_keeps_the_local_copy(tmp_path):
    uploader = AsyncHubUploader(
        "me/tiny",
        tmp_path / "staging",
        endpoint=f"http://127.0.0.1:{closed_port()}",
        token="hf_x",
        max_attempts=2,
        retry_delay=0.05,
    )
    export = _export_folder(tmp_path / "backbone", b"weights")
    uploader.submit(export, step=3)
    started = time.monotonic()
    uploader.poll()  # never raises, never blocks
    assert time.monotonic() - started < 1.0
    (outcome,) = uploader.wait(timeout=60)
    assert outcome.status == "failed" and outcome.attempts == 2 and len(outcome.errors) == 2
    assert (outcome.folder / "model.safetensors").read_bytes() == b"weights"  # kept for a later push
    assert (export / "model.safetensors").read_bytes() == b"weights"
    (line,) = uploader.report()
    assert "FAILED after 2 attempt(s)" in line and str(outcome.folder) in line


def test_a_stalled_endpoint_never_blocks_the_caller(tmp_path):
    """A server that accepts connections and never answers: submit and poll return at once."""
    with (
        stalled_endpoint() as endpoint
    ):  # closed at the end: the pending request fails, the upload thread ends
        uploader = AsyncHubUploader(
            "me/tiny", tmp_path / "staging", endpoint=endpoint, token="hf_x", max_attempts=1
        )
        started = time.monotonic()
        uploader.submit(_export_folder(tmp_path / "backbone", b"w"), step=1)
        for _ in range(5):
            assert uploader.poll() == []
        assert time.monotonic() - started < 1.0
        assert uploader.pending and "still uploading" in uploader.report()[0]
    (outcome,) = uploader.wait(timeout=60)
    assert outcome.status == "failed"


# ------------------------------------------------------------------------------------------- arguments and errors
def test_recipe_file_and_command_line_merge(tmp_path):
    pretrain = load_pretrain_script()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "preset: vit-tiny-patch16\nlearning_rate: 1e-3\npush_to_hub: true\nglobal_crops_scale: [0.4, 1.0]\n"
        "config_overrides:\n  num_hidden_layers: 4\n  patch_loss_weight: 0.5\n"
    )
    model_args, data_args, training_args, overrides = pretrain.parse_arguments(
        [
            str(recipe),
            "--learning_rate",
            "2e-3",
            "--config_overrides",
            "patch_loss_weight=0",
            "neighborhood_size=all",
        ]
    )
    assert model_args.preset == "vit-tiny-patch16"
    assert (
        training_args.learning_rate == 2e-3
    )  # the command line wins (and "1e-3" in YAML is read as a float)
    assert training_args.push_to_hub is True
    assert overrides == {"num_hidden_layers": 4, "patch_loss_weight": 0, "neighborhood_size": "all"}
    config, crops = pretrain.build_config(model_args, data_args, training_args, overrides)
    assert config.backbone_config.num_hidden_layers == 4 and config.neighborhood_size == "all"
    assert crops.global_crops_scale == (0.4, 1.0)  # the crop recipe is the training's, not the model's
    assert "global_crops_scale" not in config.to_dict()

    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1\n")
    with pytest.raises(pretrain.UsageError, match="unknown option"):
        pretrain.parse_arguments([str(bad)])


def test_help_documents_every_option(capsys):
    pretrain = load_pretrain_script()
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    import dataclasses

    for group in (pretrain.ModelArguments, pretrain.DataArguments, pretrain.PretrainingArguments):
        for item in dataclasses.fields(group):
            assert f"--{item.name}" in text
            assert item.metadata.get("help"), f"{item.name} has no help text"


def _parquet(path: Path, with_images: bool = True) -> Path:
    import datasets
    import numpy as np
    from PIL import Image

    path.mkdir(parents=True)
    if with_images:
        images = [Image.fromarray(np.full((40, 40, 3), 10 * i, dtype=np.uint8)) for i in range(4)]
        ds = datasets.Dataset.from_dict(
            {"image": images}, features=datasets.Features({"image": datasets.Image()})
        )
    else:
        ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    ds.to_parquet(str(path / "train-00000-of-00001.parquet"))
    return path


TINY_ARGS = tiny_arguments()  # `--config_overrides` last: more key=value pairs may follow


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--global_crop_size", "36", "--config_overrides", "num_hidden_layers=2"],
            "global_crop_size=36 is not a positive multiple of the patch size 16",
        ),
        (["--local_crop_size", "12"], "not a positive multiple of the patch size 8"),
        # an earlier version's config override of the crop recipe is that option now: both ways at once is refused
        (
            [*TINY_ARGS, "local_crop_size=12"],
            "config_overrides local_crop_size=12 and --local_crop_size 16 set the same thing: keep --local_crop_size",
        ),
        ([*TINY_ARGS, "moby_momentum=0.9"], "moby_momentum=0.9 is a MoBY setting, but the image objective"),
        (["--global_crops_scale", "0.5", "0.2"], "global_crops_scale must be a pair (min, max)"),
        (["--num_local_crops", "-1"], "num_local_crops must be a whole number >= 0, got -1."),
        (
            ["--config_overrides", "image_objective=moby"],  # the tiny recipe's local crops with MoBY
            "--num_local_crops --local_crop_size: MoBY trains on two views (the 2 global crops) without local crops",
        ),
        (["--min_learning_rate", "1"], "min_learning_rate must lie between 0 and the peak learning rate"),
        (["--preset", "vit-huge-patch3"], "Unknown preset 'vit-huge-patch3'"),
        (["--dataset_name", "/nonexistent/images"], "does not exist"),
        (["--dataset_name", "NOIMAGES"], "no Image column"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--max_steps", "0", "--epochs", "0"], "Give a training length"),
        (["--samples_per_epoch", "0"], "--samples_per_epoch must be >= 1"),
        (
            ["--samples_per_epoch", "12"],
            "samples_per_epoch is smaller than the global batch size. (samples_per_epoch 12, global batch 64 = 1 "
            "processes x 64 per device x 1 accumulation steps)",
        ),
        (["--warmup_epochs", "-1"], "warmup_epochs must be >= 0, got -1.0."),
        (["--learning_rate", "-1"], "learning_rate must be > 0, got -1.0."),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan."),
        (["--epochs", "inf"], "--epochs must be a finite number, got inf."),
        (["--clip_grad", "nan"], "--clip_grad must be a finite number, got nan."),
        (["--clip_grad", "-1"], "--clip_grad must be >= 0 (0: no clipping), got -1.0."),
        (["--min_image_size", "-3"], "--min_image_size must be >= 1 pixel, got -3."),
        (["--torch_compile", "--torch_compile_backend", "nope"], "'nope' is not a torch.compile backend"),
        (
            [*TINY_ARGS, "neighborhood_size=all", "num_positives=4"],
            "num_positives=4 exceeds the 3 other patches of a local_crop_size 16 crop (patch stride 8)",
        ),
        (
            ["--learning_rate", "fast"],
            "argument --learning_rate/--learning-rate: invalid float value: 'fast'",
        ),
        (["--dataset_name", ""], "--dataset_name is empty"),
        (["--checkpoints_total_limit", "0"], "checkpoints_total_limit must be >= 1"),
        (["--hub_upload_attempts", "0"], "--hub_upload_attempts must be >= 1, got 0."),
        (
            ["--push_to_hub", "--hub_model_id", "not a/valid/id"],
            "--hub_model_id 'not a/valid/id' is not a valid Hub repository id",
        ),
        (
            ["--config_overrides", "num_positives=[32,"],
            "--config_overrides: config_overrides 'num_positives=[32,'",
        ),
        (["--config_overrides", "=32"], "config_overrides entries are key=value pairs, got '=32'"),
        (["--config_overrides", "num_hidden_layers=two"], "Invalid model configuration"),
        (["--num_workers", "-1"], "num_workers must be >= 0, got -1."),
    ],
)
def test_wrong_arguments_fail_before_any_work(tmp_path, capsys, extra, message):
    pretrain = load_pretrain_script()
    images = _parquet(tmp_path / "images")
    no_images = _parquet(tmp_path / "text", with_images=False)
    extra = [str(no_images) if item == "NOIMAGES" else item for item in extra]
    argv = [*TINY_ARGS, "--dataset_name", str(images), "--output_dir", str(tmp_path / "out"), *extra]
    started = time.monotonic()
    assert pretrain.main(argv) == 2
    error = capsys.readouterr().err
    assert message in error, error
    assert error.strip().splitlines()[-1].startswith("pretrain.py: error: "), error
    assert time.monotonic() - started < 10
    assert not (tmp_path / "out").exists()  # nothing was written: no work done


def test_an_output_dir_with_checkpoints_needs_resume_or_overwrite(tmp_path, capsys):
    pretrain = load_pretrain_script()
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-7"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 7}))
    argv = [
        *TINY_ARGS,
        "--dataset_name",
        str(_parquet(tmp_path / "images")),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert pretrain.main(argv) == 2
    assert "--resume_from_checkpoint latest" in capsys.readouterr().err
    # a checkpoint that is not there: an error naming it and what to pass, not a traceback
    assert pretrain.main([*argv, "--resume_from_checkpoint", str(tmp_path / "nope")]) == 2
    assert f"Cannot resume: No checkpoint folder at '{tmp_path / 'nope'}'" in capsys.readouterr().err


PRETRAINING_RECIPES = sorted(
    path
    for path in (REPO_ROOT / "training" / "configs").glob("*.yaml")
    if not path.stem.startswith(("segmentation", "detection", "instance_segmentation", "coco_"))
)  # the others belong to training/finetune_segmentation.py and training/finetune_detection.py


@pytest.mark.parametrize("recipe", PRETRAINING_RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_parse_and_build_valid_configs(recipe, tmp_path):
    pretrain = load_pretrain_script()
    model_args, data_args, training_args, overrides = pretrain.parse_arguments([str(recipe)])
    assert training_args.output_dir
    config, crops = pretrain.build_config(model_args, data_args, training_args, overrides)
    training_args.output_dir = str(tmp_path)  # an earlier run's outputs must not matter here
    pretrain.validate_arguments(data_args, training_args)
    if "dino" in recipe.stem:
        assert config.image_representation == "cls" and not config.use_patch_objective
    else:
        assert config.image_representation == "aggregation" and config.patch_loss_weight == 0.1
    if "imagenet" in recipe.stem:  # the reference run of docs/method.md section 10
        assert config.backbone_config.hidden_size == 384 and config.patch_size == 16
        assert (crops.global_crop_size, crops.local_crop_size, crops.num_local_crops) == (224, 96, 8)
        assert config.backbone_config.image_size == 224
        assert (config.image_out_dim, config.drop_path_rate) == (65536, 0.1)
        assert (
            data_args.samples_per_epoch == 1_281_167 and training_args.per_device_train_batch_size * 8 == 1024
        )
        assert (
            training_args.learning_rate,
            training_args.min_learning_rate,
            training_args.warmup_epochs,
        ) == (
            5e-4,
            1e-6,
            10,
        )
        assert (training_args.weight_decay, training_args.weight_decay_end) == (0.04, 0.4)
        assert (
            training_args.teacher_momentum,
            training_args.clip_grad,
            training_args.freeze_last_layer_epochs,
        ) == (
            0.996,
            3.0,
            1,
        )
        assert training_args.mixed_precision == "fp16"


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate: 1e-3\npreset: [vit\n", "recipe.yaml is not valid YAML/JSON at line 3, column 1"),
        (
            '{"learning_rate": 1e-3,, "preset": "x"}',
            "recipe.yaml is not valid YAML/JSON at line 1, column 24",
        ),
        ("- learning_rate\n", "holds a list, not a mapping of option: value"),
        (
            "learning_rate: fast\n",
            "recipe.yaml: argument --learning_rate/--learning-rate: invalid float value: 'fast'",
        ),
        (
            "report_to: everything\n",
            "recipe.yaml: argument --report_to/--report-to: invalid choice: 'everything'",
        ),
        (
            "config_overrides: 3\n",
            "recipe.yaml: config_overrides is a mapping (key: value) or a list of key=value",
        ),
        (
            "config_overrides:\n  - [1, 2]\n",
            "recipe.yaml: config_overrides entries are key=value pairs, got [1, 2]",
        ),
        (
            "dataset_name: {a: 1}\n",
            "recipe.yaml: option 'dataset_name' takes a value or a list, not a mapping.",
        ),
    ],
)
def test_recipe_file_mistakes_name_the_file(tmp_path, capsys, text, message):
    pretrain = load_pretrain_script()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    assert pretrain.main([str(recipe), "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("pretrain.py: error: ") and len(error.splitlines()) == 1, error
    assert message in error, error
    assert not (tmp_path / "out").exists()


def test_config_overrides_of_the_crop_recipe_become_the_training_options(caplog):
    """Recipes of earlier versions set the crop recipe (and MoBY's momentum) in config_overrides: those are
    training options now, taken from there with one note each."""
    pretrain = load_pretrain_script()
    caplog.set_level("WARNING")
    overrides = [
        "image_objective=moby",
        "global_crop_size=48",
        "global_crops_scale=[0.2, 1]",
        "moby_momentum=0.9",
    ]
    parsed = pretrain.parse_arguments(["--config_overrides", *overrides])
    config, crops = pretrain.build_config(*parsed)
    _, data_args, training_args, _ = parsed
    assert config.image_objective == "moby" and config.backbone_config.image_size == 48
    assert (crops.global_crop_size, crops.global_crops_scale) == (48, (0.2, 1))
    assert (data_args.global_crop_size, training_args.teacher_momentum) == ([48], 0.9)
    notes = [r.getMessage() for r in caplog.records if "is the training option" in r.getMessage()]
    assert any("moby_momentum=0.9 is the training option --teacher_momentum" in note for note in notes)


def test_config_overrides_as_a_list_in_a_recipe(tmp_path):
    pretrain = load_pretrain_script()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("config_overrides:\n  - num_hidden_layers=3\n  - image_size=[224, 160]\n")
    *_, overrides = pretrain.parse_arguments([str(recipe), "--config_overrides", "num_positives=2"])
    assert overrides == {"num_hidden_layers": 3, "image_size": [224, 160], "num_positives": 2}


def test_exponent_floats_without_a_dot_are_numbers_in_recipes_and_overrides(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-30 as a string; YAML 1.2 and JSON read it as a number
    pretrain = load_pretrain_script()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1e-3\nconfig_overrides:\n  drop_path_rate: 1e-30\n")
    _, _, training_args, overrides = pretrain.parse_arguments(
        [str(recipe), "--config_overrides", "patch_loss_weight=1e38", "center_momentum=-9E-1"]
    )
    assert training_args.learning_rate == 1e-3
    assert overrides == {"drop_path_rate": 1e-30, "patch_loss_weight": 1e38, "center_momentum": -0.9}
    assert pretrain.parse_arguments(["--config_overrides", "run=1e3x"])[-1] == {"run": "1e3x"}


def test_a_moby_queue_smaller_than_a_step_s_keys_is_an_argument_mistake():
    from types import SimpleNamespace

    from selfpatch_hf import SelfPatchConfig
    from selfpatch_hf.cli.errors import UsageError

    pretrain = load_pretrain_script()
    config = SelfPatchConfig.from_preset(TINY_PRESET, image_objective="moby", moby_queue_size=16)
    accelerator = SimpleNamespace(num_processes=2)
    fits = SimpleNamespace(per_device_train_batch_size=8)  # 2 x 8 = 16 keys
    pretrain.check_moby_queue(config, accelerator, fits)
    with pytest.raises(UsageError, match="moby_queue_size=16 is smaller than the 18 keys each step writes"):
        pretrain.check_moby_queue(config, accelerator, SimpleNamespace(per_device_train_batch_size=9))


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    pretrain = load_pretrain_script()
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert pretrain.main([*TINY_ARGS, "--output_dir", str(taken)]) == 2
    assert f"--output_dir {taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"


def test_help_keeps_the_examples_and_states_each_default_once(capsys):
    pretrain = load_pretrain_script()
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    text = capsys.readouterr().out
    assert "RECIPE.yaml --output_dir runs/vits16 \\\n        --push_to_hub" in text  # line breaks kept
    assert "(default: None)" not in text
    options = text.split("\n  --")[1:]
    assert all(option.count("default") <= 1 for option in options), [
        o for o in options if o.count("default") > 1
    ]
    assert "(default: 0.0005)" in " ".join(text.split())  # the schedules' own default, shown once


# transformers' package (and the Hub client it brings) is imported for its public HfArgumentParser: about a second,
# without torch (BENCHMARKS.md, command-line help)
HEAVY_MODULES = ("torch", "datasets", "accelerate", "selfpatch_hf.models.selfpatch.modeling")


@pytest.mark.parametrize("script", ["pretrain.py", "finetune_segmentation.py"])
def test_help_and_argument_mistakes_answer_before_the_heavy_imports(tmp_path, script):
    """`--help` and a wrong option are answered before torch, datasets, accelerate or the model code are
    imported."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(REPO_ROOT / 'training' / script)!r}, *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exit:\n"
        f"    heavy = sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)\n"
        "    print('EXIT', exit.code, 'HEAVY', heavy)\n"
    )
    for argv, status in ((["--help"], 0), (["--learning_rate", "fast", "--output_dir", str(tmp_path)], 2)):
        result = subprocess.run(
            [sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
        )
        assert f"EXIT {status} HEAVY []" in result.stdout, (result.stdout[-2000:], result.stderr[-2000:])


def test_the_argument_parser_is_transformers_public_one():
    """The recipes' parser is transformers' public `HfArgumentParser` (no copy, no private module loading), and
    importing the recipes module does not import transformers (it is imported on first use)."""
    import transformers

    from selfpatch_hf.training.arguments.recipe_files import recipe_argument_parser_class

    assert recipe_argument_parser_class().__mro__[1] is transformers.HfArgumentParser
    probe = "import sys, selfpatch_hf.training.arguments.pretraining; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def test_resume_reports_a_finished_run_and_refuses_other_data_cuts_or_models(tmp_path, capsys, caplog):
    """The same command twice: the second run finds the first complete and exits 0 without training. Resuming with
    the same global batch cut into other micro-batches, or with another model setting, is refused by name."""
    from selfpatch_hf.training.metrics_log import read_metrics

    pretrain = load_pretrain_script()
    output = tmp_path / "out"
    rest = [
        "--dataset_name", str(_parquet(tmp_path / "images")), "--output_dir", str(output),
        "--per_device_train_batch_size", "2", "--samples_per_epoch", "4", "--num_workers", "0",
        "--shuffle_buffer_size", "0", "--max_steps", "2", "--checkpointing_steps", "1", "--logging_steps", "1",
        "--keep_freed_host_memory", "false", "--resume_from_checkpoint", "latest",
    ]  # fmt: skip
    assert pretrain.main([*TINY_ARGS, *rest]) == 0
    records = read_metrics(output / "metrics.jsonl")
    assert [r["step"] for r in records if "event" not in r] == [1, 2]
    mask = os.umask(0o022)
    os.umask(mask)
    for folder in (
        output / "checkpoints" / "checkpoint-2",
        output / "pretraining_model",
        output / "backbone",
    ):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
        assert {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()} == {
            path.name: 0o666 & ~mask for path in folder.iterdir()
        }

    caplog.clear()
    caplog.set_level("INFO")
    assert pretrain.main([*TINY_ARGS, *rest]) == 0
    assert "is already complete (optimiser step 2 of 2)" in caplog.text
    assert read_metrics(output / "metrics.jsonl") == records  # nothing trained, nothing logged

    other_cut = [
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--max_steps",
        "3",
    ]
    assert pretrain.main([*TINY_ARGS, *rest, *other_cut]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "checkpoint-2 saved each process's data position for --per_device_train_batch_size 2 (now 1)" in error
    )

    assert pretrain.main([*TINY_ARGS, "num_positives=3", *rest, "--max_steps", "3"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was trained with another model configuration (num_positives: saved 4, now 3)" in error

    assert pretrain.main([*TINY_ARGS, *rest, "--max_steps", "3"]) == 0  # a longer run continues
    assert [r["step"] for r in read_metrics(output / "metrics.jsonl") if "event" not in r] == [1, 2, 3]

    # --overwrite_output_dir starts afresh although the command says `--resume_from_checkpoint latest` (as a recipe
    # that always resumes does); with a checkpoint of the folder it would delete, it is refused
    inside = str(output / "checkpoints" / "checkpoint-3")
    assert (
        pretrain.main([*TINY_ARGS, *rest, "--overwrite_output_dir", "--resume_from_checkpoint", inside]) == 2
    )
    assert "--overwrite_output_dir deletes the checkpoints" in capsys.readouterr().err
    assert pretrain.main([*TINY_ARGS, *rest, "--overwrite_output_dir"]) == 0
    records = read_metrics(output / "metrics.jsonl")
    assert [r["step"] for r in records if "event" not in r] == [1, 2]
    assert not any(r.get("event") == "resumed" for r in records)
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_cpu_threads_leave_cores_to_data_workers_and_say_why_or_follow_cpu_threads(monkeypatch, caplog):
    """accelerate launch sets OMP_NUM_THREADS (2 on a 2-core machine); with 2 data workers the script uses 1 torch
    thread and says why once, naming the setting it overrides; --cpu_threads is followed as given."""
    from selfpatch_hf.training.runtime import set_cpu_threads

    previous = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    caplog.set_level("INFO")
    try:
        torch.set_num_threads(2)
        set_cpu_threads(num_processes=1, num_workers=2, requested=None)
        assert torch.get_num_threads() == 1
        (line,) = [r.getMessage() for r in caplog.records if "torch thread" in r.getMessage()]
        assert "instead of OMP_NUM_THREADS=2" in line and "--cpu_threads" in line
        set_cpu_threads(num_processes=1, num_workers=2, requested=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
