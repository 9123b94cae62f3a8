"""Dense evaluation on Swin backbones: the chosen stage's token map, its stride, and the evaluation commands."""

from __future__ import annotations

import json

import pytest
import torch
from reference_moby import random_swin
from transformers import AutoModel, SwinConfig, SwinModel, ViTConfig, ViTImageProcessor, ViTModel

from selfpatch_hf.conversion.swin import infer_swin_architecture, swin_backbone_to_hf
from selfpatch_hf.evaluation.cli import main
from selfpatch_hf.evaluation.features import FrozenBackbone

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def swin_folder(tmp_path_factory):
    """A random Swin (32 px, patch 2, window 4, stage grids 16/8/4) saved as a plain SwinModel folder, with the
    independent reference module that holds the same weights."""
    folder = tmp_path_factory.mktemp("swin")
    reference = random_swin(seed=3)
    state = reference.state_dict()
    model = swin_backbone_to_hf(state, infer_swin_architecture(state, "tiny swin"))
    model.save_pretrained(folder)
    ViTImageProcessor(image_mean=list(MEAN), image_std=list(STD)).save_pretrained(folder)
    return folder, reference


@pytest.mark.parametrize("stage, stride, width", [(None, 8, 32), (3, 8, 32), (2, 4, 16), (1, 2, 8)])
def test_each_stage_is_the_reference_token_map(swin_folder, stage, stride, width):
    folder, reference = swin_folder
    backbone = FrozenBackbone.from_pretrained(str(folder), stage=stage)
    assert backbone.patch_size == stride and backbone.hidden_size == width
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = backbone(images)
    grid = 32 // stride
    assert features.shape == (2, grid, grid, width)

    normalised = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        stages = reference.stages(normalised)
        index = (stage or 3) - 1
        expected = stages[index]
        if index == 2:  # the last stage is read after the final norm (what SelfPatch trains on a Swin)
            expected = reference.norm(expected)
    torch.testing.assert_close(features, expected.reshape(2, grid, grid, width), atol=1e-4, rtol=1e-4)
    # no CLS token: the image representation is the average of the map (Swin's own pool at the last stage)
    torch.testing.assert_close(backbone.image_embedding(images), features.flatten(1, 2).mean(1))
    with pytest.raises(ValueError, match="no CLS token"):
        backbone.image_embedding(images, "cls")


def test_non_square_images_and_size_errors(swin_folder):
    folder, _ = swin_folder
    model = AutoModel.from_pretrained(folder).eval()
    backbone = FrozenBackbone(model, MEAN, STD, stage=2)
    images = torch.rand(1, 3, 32, 48)
    features = backbone(images)
    assert features.shape == (1, 8, 12, 16)
    with torch.no_grad():
        direct = model(
            pixel_values=(images - backbone.image_mean) / backbone.image_std,
            output_hidden_states=True,
            output_hidden_states_before_downsampling=True,
        )
    torch.testing.assert_close(features, direct.reshaped_hidden_states[2].permute(0, 2, 3, 1))

    with pytest.raises(ValueError, match=r"not a multiple of the patch size 4"):
        backbone(torch.rand(1, 3, 32, 30))
    # 16 px: the last stage would be 2x2, smaller than the 4-token window
    with pytest.raises(
        ValueError, match=r"stage 3 a grid 2 tokens wide, smaller than its window \(4\).*32 px"
    ):
        backbone(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="per \\(shifted\\) local window"):
        backbone.forward_features(images, output_attentions=True)
    with pytest.raises(ValueError, match=r"stages 1\.\.3 \(strides 2, 4, 8\)"):
        FrozenBackbone(model, stage=4)

    vit = ViTModel(
        ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    assert FrozenBackbone(vit, stage=1).patch_size == 8
    with pytest.raises(ValueError, match="single token map"):
        FrozenBackbone(vit, stage=2)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("swin_cli")
    torch.manual_seed(0)
    # window 2: every stage of 32-64 px inputs is at least one window wide
    config = SwinConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 2, 2], window_size=2
    )
    SwinModel(config).save_pretrained(root / "swin")
    ViTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(
        root / "swin"
    )
    args = [
        "make-offline-data",
        "--output-dir",
        str(root / "data"),
        "--num-sequences",
        "1",
        "--num-frames",
        "3",
    ]
    args += ["--frame-size", "48,64", "--num-train", "4", "--num-eval", "2", "--image-size", "32"]
    assert main(args) == 0
    return root


def test_evaluation_commands_take_a_swin_stage(workspace, capsys):
    swin = str(workspace / "swin")
    out = workspace / "davis_out"
    args = ["davis", "--davis-root", str(workspace / "data/davis"), "--output-dir", str(out), "--model", swin]
    args += [
        "--short-side",
        "48",
        "--size-multiple",
        "16",
        "--n-last-frames",
        "2",
        "--topk",
        "3",
        "--stage",
        "2",
    ]
    assert main(args) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert 0.0 <= scores["J&F-Mean"] <= 100.0  # percent
    sequence = (workspace / "data/davis/ImageSets/2017/val.txt").read_text().split()[0]
    assert len(list((out / sequence).glob("*.png"))) == 3

    data = str(workspace / "data/segmentation")
    probe_json = workspace / "probe.json"
    args = ["linear-probe", "--model", swin, "--dataset", data, "--image-size", "32", "--epochs", "1"]
    assert main(args + ["--stage", "2", "--output-json", str(probe_json)]) == 0
    assert json.loads(probe_json.read_text())["num_eval"] == 2
    knn_json = workspace / "knn.json"
    args = ["knn", "--model", swin, "--dataset", data, "--resize", "32", "--crop", "32", "--k", "2"]
    assert main(args + ["--output-json", str(knn_json)]) == 0  # last stage, average-pooled
    assert json.loads(knn_json.read_text())["num_train"] == 4
    capsys.readouterr()

    assert main(["knn", "--model", swin, "--dataset", data, "--stage", "4"]) == 2
    assert "selfpatch eval: error: --stage: stage=4 is out of range" in capsys.readouterr().err
    args = ["visualize", "--model", swin, "--image", "skimage:chelsea", "--query", "3"]
    assert main(args + ["--output", str(workspace / "a.png")]) == 2
    assert "a Swin backbone has no image-wide attention map" in capsys.readouterr().err
    assert not (workspace / "a.png").exists()
