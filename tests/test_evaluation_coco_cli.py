"""`selfpatch eval coco` and the instance part of `selfpatch eval make-offline-data`: the command scores a saved model
as `evaluate_coco` does, bad arguments exit 2 and failed steps 1 with one line, `--help` loads no heavy library."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from transformers import ViTConfig, ViTModel
from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

from selfpatch_hf.data.detection.sources import load_detection_source
from selfpatch_hf.data.samples.instance_scenes import make_instance_dataset
from selfpatch_hf.evaluation.cli import main
from selfpatch_hf.evaluation.detection import CocoEvalConfig, _segments, evaluate_coco
from selfpatch_hf.models.dense.detection import build_instance_segmentation_image_processor, build_mask2former


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco-cli")
    make_instance_dataset(
        root / "instances", num_train=1, num_eval=3, image_size=(64, 96), seed=2, coco_json=True
    )
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=16,
                  image_size=64),
        add_pooling_layer=False,
    )  # fmt: skip
    names = load_detection_source(root / "instances", "validation").label_names
    model = build_mask2former(
        vit, names, num_queries=6, hidden_dim=32, feature_size=32, encoder_layers=1, decoder_layers=2,
        dim_feedforward=64, encoder_feedforward_dim=64, num_attention_heads=2,
    )  # fmt: skip
    model.save_pretrained(root / "model")
    build_instance_segmentation_image_processor(64, 96).save_pretrained(root / "model")
    return root


def test_the_command_scores_as_the_library_does(scene, capsys):
    out = scene / "scores.json"
    assert main(["coco", "--model", str(scene / "model"), "--dataset", str(scene / "instances"),
                 "--output-json", str(out), "--threshold", "0.01"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| mask |" in printed and "| box |" in printed and "3 images" in printed
    saved = json.loads(out.read_text())
    expected = evaluate_coco(scene / "model", load_detection_source(scene / "instances", "validation"),
                             CocoEvalConfig(threshold=0.01))  # fmt: skip
    # the JSON holds percentages, as every evaluation command writes them (-1: no ground truth of that size)
    assert saved["task"] == "instance_segmentation" and saved["scores"].keys() == expected.scores.keys()
    for iou_type, values in expected.scores.items():
        for name, value in values.items():
            if name == "per_category":
                assert saved["scores"][iou_type][name] == pytest.approx(
                    {label: 100 * ap if ap >= 0 else ap for label, ap in value.items()}
                )
            else:
                assert saved["scores"][iou_type][name] == pytest.approx(100 * value if value >= 0 else value)
    # the same split read from the COCO json gives the same scores
    coco_json = scene / "instances/coco/annotations/instances_validation.json"
    out_json = scene / "scores-json.json"
    assert main(["coco", "--model", str(scene / "model"), "--dataset", str(coco_json), "--output-json",
                 str(out_json), "--threshold", "0.01"]) == 0  # fmt: skip
    assert json.loads(out_json.read_text())["scores"] == saved["scores"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--threshold", "1.5"], "--threshold must lie in [0, 1]"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--image-dir", "/nonexistent/images"], "--image-dir /nonexistent/images: no such folder"),
        (["--max-samples", "-3"], "--max-samples must be >= 1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(scene, capsys, arguments, message):
    code = main(["coco", "--model", str(scene / "model"), "--dataset", str(scene / "instances"), *arguments])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and message in error[0], error


def test_failures_exit_1_with_one_line(scene, tmp_path, capsys):
    assert main(["coco", "--model", str(tmp_path / "nothing"), "--dataset", str(scene / "instances")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    # a model trained on other categories: refused, naming both label sets
    config = json.loads((scene / "model" / "config.json").read_text())
    config["id2label"] = {str(i): f"class-{i}" for i in range(len(config["id2label"]))}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for file in (scene / "model").iterdir():
        (renamed / file.name).write_bytes(file.read_bytes())
    (renamed / "config.json").write_text(json.dumps(config))
    code = main(["coco", "--model", str(renamed), "--dataset", str(scene / "instances")])
    error = [
        line for line in capsys.readouterr().err.splitlines() if "error:" in line
    ]  # not the progress bars
    assert code == 1 and len(error) == 1 and "differ from the data's" in error[0], error


def test_help_loads_no_heavy_library():
    probe = (
        "import sys\nfrom selfpatch_hf.evaluation.cli import main\ntry:\n    main(['coco', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(' '.join(m for m in ('torch', 'transformers', 'datasets', 'huggingface_hub') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "usage:" in done.stdout and done.stdout.splitlines()[-1] == "", done.stdout + done.stderr


def test_make_offline_data_writes_the_instance_set(tmp_path, capsys):
    code = main(["make-offline-data", "--output-dir", str(tmp_path), "--num-sequences", "1", "--num-frames", "3",
                 "--frame-size", "32,48", "--num-train", "1", "--num-eval", "1", "--image-size", "32",
                 "--num-instance-train", "2", "--num-instance-eval", "1", "--instance-size", "64,96",
                 "--coco-json"])  # fmt: skip
    assert code == 0 and "instance set" in capsys.readouterr().out
    assert (tmp_path / "instances/data/train-00000-of-00001.parquet").is_file()
    assert (tmp_path / "instances/coco/annotations/instances_validation.json").is_file()
    assert "instances/" in (tmp_path / "README.md").read_text()
    assert main(["make-offline-data", "--output-dir", str(tmp_path / "x"), "--max-instances", "0"]) == 2
    assert "--max-instances must be between 1 and 20" in capsys.readouterr().err


def test_mask_logits_are_cropped_to_the_image_before_resizing():
    """The processor pads to multiples of 32; transformers' post-processing would stretch the padded logits over the
    image. A mask covering the left half of the real image must come back as the left half of the image."""
    pad_h, pad_w, valid_w = 64, 128, 96  # the image fills 96 of the 128 padded columns
    logits = torch.full((1, 1, pad_h // 4, pad_w // 4), -20.0)
    logits[..., : valid_w // 8] = 20.0  # the left half of the real image (48 of 96 columns, at stride 4)
    outputs = Mask2FormerForUniversalSegmentationOutput(
        class_queries_logits=torch.tensor([[[10.0, -10.0]]]), masks_queries_logits=logits
    )
    pixel_mask = torch.zeros(1, pad_h, pad_w, dtype=torch.long)
    pixel_mask[:, :, :valid_w] = 1
    config = CocoEvalConfig()
    (prediction,) = _segments(build_instance_segmentation_image_processor(64, 128), outputs, pixel_mask,
                              [(32, 48)], {0: 0}, config)  # fmt: skip
    mask = mask_utils.decode(prediction["masks"][0])
    assert mask.shape == (32, 48)
    assert mask[:, :24].all() and not mask[:, 24:].any()  # not stretched: exactly the left half
    np.testing.assert_array_equal(prediction["boxes"][0], [0, 0, 24, 32])
