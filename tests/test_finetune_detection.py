"""training/finetune_detection.py on a tiny ViT backbone and a tiny offline instance set: each head's loss falls,
resuming is exact, the saved folder loads through the Auto classes and the pipelines in a process without this
package and scores there what its card says, and bad inputs get one line."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_detection_heads import _pipeline_predictions, _references, _run_pipelines_elsewhere
from tiny_models import tiny_config

from selfpatch_hf import SelfPatchForPretraining, export_backbone
from selfpatch_hf.cli.errors import UsageError
from selfpatch_hf.data.detection.sources import HubDetectionSource
from selfpatch_hf.data.samples.instance_scenes import make_instance_dataset
from selfpatch_hf.evaluation.detection_metrics import coco_scores
from selfpatch_hf.hub.cards.detection import read_card_scores

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "finetune_detection.py"
HEADS = {
    "deformable-detr": ["--num_queries", "12"],
    "mask2former": ["--num_queries", "8", "--train_num_points", "256"],
}


def _script():
    spec = importlib.util.spec_from_file_location("finetune_detection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 4-block ViT export (width 32, 16-pixel patches) and 8 + 4 offline instance scenes of 96 x 128."""
    root = tmp_path_factory.mktemp("detection_inputs")
    torch.manual_seed(0)
    backbone = export_backbone(
        SelfPatchForPretraining(tiny_config(num_hidden_layers=4, patch_size=16, image_size=64)),
        root / "backbone",
    )
    make_instance_dataset(
        root / "instances", num_train=8, num_eval=4, image_size=(96, 128), max_objects=3, seed=1
    )
    return {"backbone": backbone, "data": root / "instances"}


def _arguments(inputs, output_dir, head, *extra: str) -> list[str]:
    return [
        "--head", head, "--backbone", str(inputs["backbone"]), "--dataset_name", str(inputs["data"]),
        "--hidden_size", "32", "--encoder_layers", "1", "--decoder_layers", "2", "--feedforward_size", "64",
        "--attention_heads", "2", "--short_side", "96", "--eval_scale", "96", "128", "--eval_batch_size", "1",
        "--per_device_train_batch_size", "4", "--learning_rate", "2e-3", "--warmup_steps", "1", "--max_steps", "8",
        "--lr_decay_steps", "100", "--num_workers", "0", "--logging_steps", "1", "--checkpointing_steps", "4",
        "--seed", "0", "--output_dir", str(output_dir), *HEADS[head], *extra,
    ]  # fmt: skip


def _run(arguments: list[str]):
    script = _script()
    result = script.train(*script.parse_detection_arguments(arguments))
    result.accelerator.end_training()
    return result


def _losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


@pytest.fixture(scope="module")
def detr_run(inputs, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("detr") / "run"
    return _run(_arguments(inputs, output_dir, "deformable-detr")), output_dir


def test_a_few_deformable_detr_steps_lower_the_loss(detr_run):
    result, output_dir = detr_run
    losses = _losses(output_dir)
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses
    assert set(result.scores) == {"bbox"} and 0 <= result.scores["bbox"]["AP"] <= 1
    card = (output_dir / "model" / "README.md").read_text()
    assert "pipeline_tag: object-detection" in card
    assert read_card_scores(card)["box_AP"] == round(100 * result.scores["bbox"]["AP"], 2)


@pytest.mark.slow
def test_a_few_mask2former_steps_lower_the_loss(inputs, tmp_path):
    result = _run(
        _arguments(inputs, tmp_path / "run", "mask2former", "--max_steps", "12", "--eval_split", "none")
    )
    losses = _losses(tmp_path / "run")
    assert len(losses) == 12 and result.scores is None
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses


def test_resuming_from_a_checkpoint_is_exact(inputs, detr_run, tmp_path):
    _, first = detr_run
    second = tmp_path / "resumed"
    (second / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "checkpoint-4", second / "checkpoints" / "checkpoint-4")
    result = _run(_arguments(inputs, second, "deformable-detr", "--resume_from_checkpoint", "latest"))
    assert result.global_step == 8
    # same images, augmentations, drop-path masks and optimiser state: the same losses and bit-identical weights
    assert _losses(second) == _losses(first)[4:]
    expected = load_file(first / "checkpoints" / "checkpoint-8" / "model.safetensors")
    resumed = load_file(second / "checkpoints" / "checkpoint-8" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


def _card_threshold(card_text: str) -> float:
    """The `threshold=` of the pipeline call the card's Usage section shows."""
    (value,) = re.findall(r"\(\"image\.jpg\".*threshold=([0-9.]+)\)", card_text)
    return float(value)


@pytest.mark.slow
def test_saved_folders_load_without_selfpatch_and_pipelines_score_what_the_cards_say(inputs, tmp_path):
    """Fitted to four training images (no flip or crop) and evaluated on them, so that the AP is well above zero;
    the pipelines, called as each card says in an interpreter that cannot import selfpatch_hf, score exactly the
    card's AP."""
    fit = ["--max_train_samples", "4", "--eval_split", "train", "--max_eval_samples", "4", "--flip_prob", "0"]
    fit += ["--crop_prob", "0", "--drop_path_rate", "0", "--max_grad_norm", "0", "--lr_decay_steps", "1000"]
    source = HubDetectionSource(
        datasets.load_dataset("parquet", data_dir=str(inputs["data"] / "data"), split="train").select(
            range(4)
        )
    )
    image_paths = []
    for index in range(4):
        path = tmp_path / f"image-{index}.png"
        source[index].image.save(path)
        image_paths.append(str(path))
    runs, jobs, thresholds = {}, {}, {}
    for head, steps in (("deformable-detr", "120"), ("mask2former", "120")):
        output_dir = tmp_path / head
        runs[head] = _run(_arguments(inputs, output_dir, head, "--max_steps", steps, *fit))
        card_text = (runs[head].model_dir / "README.md").read_text()
        thresholds[head] = _card_threshold(card_text)
        jobs[head] = {
            "kind": "detr" if head == "deformable-detr" else "mask2former",
            "folder": str(output_dir / "model"),
            "images": image_paths,
            "threshold": thresholds[head],
        }
    # the heads' defaults, stated on the cards
    assert thresholds == {"deformable-detr": 0.0, "mask2former": 0.5}
    results = _run_pipelines_elsewhere(jobs)
    references = _references(source)
    for head in ("mask2former", "deformable-detr"):
        card = read_card_scores((runs[head].model_dir / "README.md").read_text())
        piped = _pipeline_predictions(results[head]["predictions"], source.label_names)
        iou_types = ["bbox"] if head == "deformable-detr" else ["bbox", "segm"]
        from_pipeline = coco_scores(piped, references, len(source.label_names), iou_types, source.label_names)
        for iou_type in iou_types:
            kind = "box" if iou_type == "bbox" else "mask"
            assert card[f"{kind}_AP50"] > 20, (head, card)  # a fitted model, not an all-zero comparison
            for name in ("AP", "AP50", "AP75"):
                # the card rounds to hundredths of a percent
                assert card[f"{kind}_{name}"] == round(100 * from_pipeline[iou_type][name], 2), (head, name)


def test_bad_inputs_are_one_line(inputs, tmp_path):
    script = _script()
    arguments = _arguments(inputs, tmp_path / "run", "deformable-detr")
    with pytest.raises(UsageError, match=r"no objects column 'annotations'; the dataset's columns are"):
        script.train(*script.parse_detection_arguments([*arguments, "--objects_column", "annotations"]))
    # a copy of the data whose category feature is a plain integer, named by too short a --label_names
    plain = datasets.load_dataset("parquet", data_dir=str(inputs["data"] / "data"))
    features = plain["train"].features.copy()
    features["objects"]["category"] = datasets.List(datasets.Value("int64"))
    plain = plain.cast(features)
    plain.save_to_disk(tmp_path / "plain")
    bad = [*arguments, "--dataset_name", str(tmp_path / "plain"), "--label_names", "a", "b"]
    with pytest.raises(
        UsageError, match=r"row \d+ has category \d+, beyond the label map of 2 names"
    ) as caught:
        script.train(*script.parse_detection_arguments(bad))
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match=re.escape("--two_stage needs --with_box_refine")):
        script.parse_detection_arguments([*arguments, "--two_stage"])
    with pytest.raises(UsageError, match=re.escape("--eval_threshold must be in [0, 1], got 1.5")):
        script.parse_detection_arguments([*arguments, "--eval_threshold", "1.5"])
    small = [*arguments, "--max_train_samples", "3", "--per_device_train_batch_size", "4"]
    with pytest.raises(UsageError, match="split has 3 images, fewer than one global batch of 4"):
        script.train(*script.parse_detection_arguments(small))
    assert not (tmp_path / "run").exists()  # nothing written before the mistakes were found


DETECTION_RECIPES = sorted(
    path.stem
    for pattern in ("detection_*.yaml", "instance_segmentation_*.yaml", "coco_*.yaml")
    for path in (SCRIPT.parent / "configs").glob(pattern)
)


def test_every_detection_recipe_is_parsed_below():
    assert {"coco_vit_small_deformable_detr", "coco_vit_small_mask2former"} <= set(DETECTION_RECIPES)
    assert {"detection_offline", "instance_segmentation_offline"} <= set(DETECTION_RECIPES)


@pytest.mark.parametrize("recipe", DETECTION_RECIPES)
def test_shipped_detection_recipes_parse(recipe):
    model_args, data_args, training_args = _script().parse_arguments(
        [str(SCRIPT.parent / "configs" / f"{recipe}.yaml")]
    )
    assert training_args.output_dir
    masks = recipe.startswith("instance") or recipe.endswith("mask2former")
    assert model_args.head == ("mask2former" if masks else "deformable-detr")
    assert data_args.eval_threshold == (0.0 if model_args.head == "deformable-detr" else 0.5)
    if recipe.startswith("coco_"):  # the 1x: 12 epochs of COCO train2017's annotated images, 16 per step
        assert model_args.multi_scale and model_args.out_indices == [4, 6, 8, 12]
        assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * 8 == 16
        steps_per_epoch = 117_266 / 16
        assert training_args.max_steps == round(12 * steps_per_epoch)
        assert training_args.lr_decay_steps == [round(8 * steps_per_epoch), round(11 * steps_per_epoch)]
        assert training_args.lr_scheduler == "step" and 0 < training_args.warmup_steps < 1000
        assert 0 < training_args.layer_decay < 1 and training_args.weight_decay == 0.05
        assert (data_args.short_side, data_args.eval_scale) == (800, [800, 1333])
        assert data_args.crop_prob == 0.5 and data_args.flip_prob == 0.5
        assert data_args.dataset_name == (
            "detection-datasets/coco"
            if model_args.head == "deformable-detr"
            else "data/coco/annotations/instances_train2017.json"
        )
