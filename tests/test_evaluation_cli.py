"""`python -m selfpatch_hf.evaluation`: every subcommand end to end on offline data and tiny backbones."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from selfpatch_hf.evaluation.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
        ViTModel(config, add_pooling_layer=False).save_pretrained(root / f"vit{seed}")
        ViTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(
            root / f"vit{seed}"
        )
    code = main(
        [
            "make-offline-data",
            "--output-dir", str(root / "data"),
            "--num-sequences", "2",
            "--num-frames", "4",
            "--frame-size", "48,64",
            "--num-train", "6",
            "--num-eval", "3",
            "--image-size", "32",
        ]
    )  # fmt: skip
    assert code == 0
    return root


def test_davis_command_compares_models(workspace, capsys):
    out = workspace / "davis_out"
    args = ["davis", "--davis-root", str(workspace / "data/davis"), "--output-dir", str(out)]
    args += ["--model", f"a={workspace / 'vit0'}", "--model", f"b={workspace / 'vit1'}"]
    args += ["--short-side", "48", "--size-multiple", "16", "--n-last-frames", "2", "--topk", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| Model | J&F | J | F |" in printed and "| a |" in printed and "| b |" in printed
    scores = json.loads((out / "a" / "scores.json").read_text())
    assert 0.0 <= scores["J&F-Mean"] <= 1.0
    sequences = (workspace / "data/davis/ImageSets/2017/val.txt").read_text().split()
    assert sorted(p.name for p in (out / "b" / sequences[0]).glob("*.png")) == [
        f"{t:05d}.png" for t in range(4)
    ]
    # Scoring existing predictions needs no model and gives the same numbers.
    assert main(["davis", "--davis-root", str(workspace / "data/davis"), "--output-dir", str(out / "a"),
                 "--evaluate-only"]) == 0  # fmt: skip
    again = json.loads((out / "a" / "scores.json").read_text())
    assert again["J&F-Mean"] == pytest.approx(scores["J&F-Mean"])


def test_linear_probe_and_knn_commands(workspace, capsys):
    data = str(workspace / "data/segmentation")
    probe_json = workspace / "probe.json"
    args = ["linear-probe", "--model", str(workspace / "vit0"), "--dataset", data, "--image-size", "32"]
    assert main(args + ["--epochs", "2", "--output-json", str(probe_json)]) == 0
    probe = json.loads(probe_json.read_text())
    assert probe["num_train"] == 6 and probe["num_eval"] == 3 and 0.0 <= probe["mean_iou"] <= 1.0
    assert "| mIoU | mAcc | aAcc |" in capsys.readouterr().out
    knn_json = workspace / "knn.json"
    args = ["knn", "--model", str(workspace / "vit0"), "--dataset", data, "--resize", "32", "--crop", "32"]
    assert main(args + ["--k", "3", "--output-json", str(knn_json)]) == 0
    knn = json.loads(knn_json.read_text())
    assert knn["num_train"] == 6 and 0.0 <= knn["top1"] <= knn["top5"] <= 100.0


def test_visualize_command(workspace, tmp_path):
    out = tmp_path / "attention.png"
    args = [
        "visualize",
        "--model",
        f"dino={workspace / 'vit0'}",
        "--model",
        f"selfpatch={workspace / 'vit1'}",
    ]
    args += ["--image", "skimage:chelsea", "--query", "0.5,0.5", "--query", "10", "--image-size", "64,96"]
    assert main(args + ["--output", str(out)]) == 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (3 * 96, 18 + 2 * 64)
    positives = np.tile(np.arange(4), (6 * 8, 1))
    np.save(tmp_path / "positives.npy", positives)
    args = [
        "visualize",
        "--image",
        str(tmp_path / "attention.png"),
        "--positives",
        str(tmp_path / "positives.npy"),
    ]
    assert main(args + ["--grid", "6,8", "--query", "9", "--output", str(tmp_path / "pos.png")]) == 0
    with Image.open(tmp_path / "pos.png") as png:
        assert png.size[0] == 3 * 96  # drawn on the given image at its own size


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "selfpatch_hf.evaluation", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for command in ("davis", "linear-probe", "knn", "visualize", "make-offline-data"):
        assert command in result.stdout
