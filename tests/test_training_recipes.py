"""The objectives' recipe table (selfpatch_hf.models.selfpatch.recipes) and the crop recipe's move from the model
configuration to the training side: one table that the config, the training options and the augmentation read,
checks that name the setting, and configurations, pretraining folders and checkpoints of earlier versions (which
kept the crop recipe and MoBY's momentum in config.json) that still load, export and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import TINY_CROP_RECIPE, tiny_config
from transformers import AutoImageProcessor

from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining, export_backbone
from selfpatch_hf.cli.errors import UsageError
from selfpatch_hf.data.augmentation import AUGMENTATION_RECIPES, MultiCropAugmentation
from selfpatch_hf.models.selfpatch.recipes import (
    CROP_RECIPES,
    MOVED_TO_TRAINING,
    NUM_GLOBAL_CROPS,
    OBJECTIVE_RECIPES,
    CropRecipe,
)
from selfpatch_hf.training.arguments.pretraining import build_config, parse_pretraining_arguments
from selfpatch_hf.training.resume import check_resumable, config_snapshot

# what a config.json of the previous version held besides today's fields (the values it had for the tiny model)
LEGACY_FIELDS = {
    "global_crop_size": 32,
    "local_crop_size": 16,
    "num_local_crops": 2,
    "global_crops_scale": [0.25, 1.0],
    "local_crops_scale": [0.05, 0.25],
    "moby_momentum": 0.99,
}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_local_crops": -1}, "num_local_crops must be a whole number >= 0, got -1."),
        ({"num_local_crops": "8"}, "num_local_crops must be a whole number >= 0, got '8'."),
        ({"num_local_crops": 2.5}, "num_local_crops must be a whole number >= 0"),
        ({"global_crops_scale": (0.5, 0.2)}, "global_crops_scale must be a pair (min, max)"),
        ({"local_crops_scale": (0.0, 0.2)}, "local_crops_scale must be a pair (min, max)"),
        ({"global_crops_scale": (0.2, float("nan"))}, "global_crops_scale must be a pair"),
        ({"global_crop_size": 0}, "global_crop_size must be positive"),
        ({"global_crop_size": (32, 32, 3)}, "global_crop_size is a number of pixels or (height, width)"),
        ({"interpolation": "nearest"}, "interpolation must be one of ('bicubic', 'bilinear')"),
    ],
)
def test_a_wrong_crop_recipe_is_refused_naming_the_setting(changes, message):
    with pytest.raises(ValueError) as error:
        CropRecipe(**changes)
    assert message in str(error.value)


def test_crop_sides_must_fit_the_patch_grid_and_local_sizes_matter_only_with_local_crops():
    CropRecipe(global_crop_size=32, local_crop_size=16).check_patch_grid(8)
    with pytest.raises(
        ValueError, match=r"global_crop_size=\(32, 36\) is not a positive multiple of the patch size 8"
    ):
        CropRecipe(global_crop_size=[32, 36]).check_patch_grid(8)
    with pytest.raises(
        ValueError,
        match="local_crop_size=20 is not a positive multiple of the patch size 8: the patch grid would drop pixels. Use e.g. 16",
    ):
        CropRecipe(local_crop_size=20).check_patch_grid(8)
    CropRecipe(local_crop_size=20, num_local_crops=0).check_patch_grid(
        8
    )  # no local crops: their size is unused
    assert CropRecipe(global_crop_size=[224]).global_crop_size == 224  # one value: a square side
    assert CropRecipe(global_crop_size=[224, 160]).square_global_side is None


def test_the_augmentation_reads_the_table():
    """Its constructor defaults and named recipes are the table's; `from_recipe` takes an objective's recipe."""
    default = MultiCropAugmentation()
    selfpatch = CROP_RECIPES["selfpatch"]
    assert selfpatch == OBJECTIVE_RECIPES["dino"].crops and AUGMENTATION_RECIPES is CROP_RECIPES
    assert default.global_crop_size == (selfpatch.global_crop_size,) * 2
    assert default.local_crop_size == (selfpatch.local_crop_size,) * 2
    assert (default.num_local_crops, default.global_crops_scale, default.local_crops_scale) == (
        selfpatch.num_local_crops,
        selfpatch.global_crops_scale,
        selfpatch.local_crops_scale,
    )
    assert default.interpolation == selfpatch.interpolation and default.num_global_crops == NUM_GLOBAL_CROPS
    moby = MultiCropAugmentation.from_recipe(OBJECTIVE_RECIPES["moby"].crops.replace(global_crop_size=32))
    assert (moby.num_local_crops, moby.interpolation, moby.global_crops_scale) == (0, "bilinear", (0.08, 1.0))
    image = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    global_crops, local_crops = MultiCropAugmentation.from_recipe(TINY_CROP_RECIPE)(image, rng=0)
    assert global_crops.shape == (NUM_GLOBAL_CROPS, 3, 32, 32)
    assert local_crops.shape == (TINY_CROP_RECIPE.num_local_crops, 3, 16, 16)


def test_the_model_configuration_takes_the_objectives_drop_path_and_holds_no_training_setting():
    assert SelfPatchConfig().drop_path_rate == OBJECTIVE_RECIPES["dino"].drop_path_rate
    moby = SelfPatchConfig.from_preset("vit-tiny-patch16", image_objective="moby")
    assert moby.drop_path_rate == OBJECTIVE_RECIPES["moby"].drop_path_rate
    assert not set(MOVED_TO_TRAINING) & set(SelfPatchConfig().to_dict())
    for name, option in MOVED_TO_TRAINING.items():
        with pytest.raises(ValueError, match=f"{name} is no SelfPatchConfig field any more.*{option}"):
            SelfPatchConfig.from_preset("vit-tiny-patch16", **{name: LEGACY_FIELDS[name]})


def test_the_position_grid_follows_square_global_crops(tmp_path):
    def config_of(*argv: str):
        model_args, data_args, training_args, overrides = parse_pretraining_arguments(
            ["--output_dir", str(tmp_path), "--preset", "vit-tiny-patch16", *argv]
        )
        return build_config(model_args, data_args, training_args, overrides)

    config, crops = config_of("--global_crop_size", "96")
    assert config.backbone_config.image_size == 96 and crops.global_crop_size == 96
    config, crops = config_of(
        "--global_crop_size", "224", "160"
    )  # not square: the preset's grid, interpolated
    assert config.backbone_config.image_size == 224 and crops.global_crop_size == (224, 160)
    config, _ = config_of(
        "--global_crop_size", "96", "--config_overrides", "image_size=128"
    )  # set explicitly
    assert config.backbone_config.image_size == 128
    with pytest.raises(
        UsageError, match="global_crop_size=100 is not a positive multiple of the patch size 16"
    ):
        config_of("--global_crop_size", "100")


def test_a_config_json_and_pretraining_folder_of_the_previous_version_still_load_and_export(tmp_path):
    """A pretraining folder saved before the crop recipe moved: config.json carries the crop recipe and MoBY's
    momentum. It loads (the values are dropped), its exported backbone's image processor has the global crop size
    (the position grid's size, what earlier versions wrote), and re-saving writes no training setting."""
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config())
    model.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **LEGACY_FIELDS}))

    loaded = SelfPatchForPretraining.from_pretrained(tmp_path / "old")
    assert not any(hasattr(loaded.config, name) for name in MOVED_TO_TRAINING)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    processor = AutoImageProcessor.from_pretrained(export_backbone(loaded, tmp_path / "backbone"))
    assert processor.size["height"] == processor.size["width"] == LEGACY_FIELDS["global_crop_size"]
    loaded.save_pretrained(tmp_path / "resaved")
    assert not set(MOVED_TO_TRAINING) & set(json.loads((tmp_path / "resaved" / "config.json").read_text()))


def test_a_checkpoint_of_the_previous_version_resumes_with_its_crop_recipe_and_refuses_another():
    """Earlier checkpoints recorded the crop recipe inside `model_config`: resuming compares it with the crop
    options (the same recipe resumes; another is refused naming the setting) and the model settings without it."""
    config = tiny_config()
    saved = {**config_snapshot(config), **LEGACY_FIELDS}
    trainer_state = {"global_batch_size": 6, "arguments": {}, "model_config": saved}
    same = TINY_CROP_RECIPE.to_dict()
    check_resumable(
        trainer_state,
        "checkpoint-3",
        global_batch_size=6,
        arguments={},
        model_config=config_snapshot(config),
        crop_recipe=same,
    )
    other = TINY_CROP_RECIPE.replace(num_local_crops=4).to_dict()
    with pytest.raises(UsageError, match=r"another crop recipe \(num_local_crops: saved 2, now 4\)"):
        check_resumable(
            trainer_state,
            "checkpoint-3",
            global_batch_size=6,
            arguments={},
            model_config=config_snapshot(config),
            crop_recipe=other,
        )
    # today's checkpoints record it on its own
    trainer_state = {"global_batch_size": 6, "model_config": config_snapshot(config), "crop_recipe": same}
    with pytest.raises(UsageError, match="num_local_crops: saved 2, now 4"):
        check_resumable(
            trainer_state,
            "checkpoint-3",
            global_batch_size=6,
            arguments={},
            model_config=config_snapshot(config),
            crop_recipe=other,
        )
