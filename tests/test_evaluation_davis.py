"""DAVIS folder layout: reading, indexed PNG writing, propagation over a split and J&F scoring."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTConfig, ViTModel

from selfpatch_hf.data.samples.synthetic_scenes import make_sequences
from selfpatch_hf.evaluation.davis import (
    DAVIS_PALETTE,
    evaluate_davis,
    list_sequences,
    load_sequence,
    predict_davis,
    read_indexed_mask,
    run_davis,
    write_indexed_mask,
)
from selfpatch_hf.evaluation.features import FrozenBackbone
from selfpatch_hf.evaluation.propagation import PropagationConfig


class ColourTextureFeatures:
    patch_size = 4

    def __call__(self, pixels):
        mean = F.avg_pool2d(pixels, 4)
        std = (F.avg_pool2d(pixels**2, 4) - mean**2).clamp_min(0).sqrt()
        return torch.cat([mean - 0.5, std], dim=1).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis")
    names = make_sequences(root, num_sequences=2, num_frames=6, frame_size=(64, 96), max_objects=2, seed=1)
    return root, names


def test_palette_and_indexed_png_round_trip(tmp_path):
    assert DAVIS_PALETTE[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]  # VOC / DAVIS colours
    mask = np.zeros((5, 6), np.uint8)
    mask[1:3, 2:5] = 2
    mask[4, 0] = 255
    write_indexed_mask(tmp_path / "a" / "00000.png", mask)
    with Image.open(tmp_path / "a" / "00000.png") as image:
        assert image.mode == "P"
        assert image.getpalette()[6:9] == [0, 128, 0]
    np.testing.assert_array_equal(read_indexed_mask(tmp_path / "a" / "00000.png"), mask)
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="indexed"):
        read_indexed_mask(tmp_path / "rgb.png")


def test_layout_reading(davis_root):
    root, names = davis_root
    assert list_sequences(root) == names
    sequence = load_sequence(root, names[0])
    assert len(sequence.frames) == len(sequence.annotations) == 6
    assert sequence.frames[0].name == "00000.jpg" and sequence.annotations[0].name == "00000.png"
    with pytest.raises(FileNotFoundError, match="DAVIS folder"):
        list_sequences(root / "nowhere")


def test_perfect_and_empty_predictions(davis_root, tmp_path):
    root, names = davis_root
    perfect = tmp_path / "perfect"
    shutil.copytree(root / "Annotations" / "480p", perfect)
    result = evaluate_davis(root, perfect)
    assert result.j_mean == result.f_mean == result.jf_mean == 1.0
    objects = {n: int(read_indexed_mask(perfect / n / "00000.png").max()) for n in names}
    assert set(objects.values()) == {1, 2}  # one- and two-object sequences
    assert set(result.per_object) == {f"{n}_{k}" for n, count in objects.items() for k in range(1, count + 1)}
    empty = tmp_path / "empty"
    for name in names:
        for path in sorted((perfect / name).glob("*.png")):
            write_indexed_mask(empty / name / path.name, np.zeros_like(read_indexed_mask(path)))
    assert evaluate_davis(root, empty).jf_mean == 0.0
    (empty / names[0] / "00002.png").unlink()
    with pytest.raises(FileNotFoundError, match="Missing prediction"):
        evaluate_davis(root, empty)


def test_propagation_over_the_split(davis_root, tmp_path):
    root, names = davis_root
    config = PropagationConfig(short_side=64, size_multiple=8)
    seen = []
    assert predict_davis(root, ColourTextureFeatures(), tmp_path, config, progress=seen.append) == names
    assert seen == names
    for name in names:
        written = sorted(p.name for p in (tmp_path / name).glob("*.png"))
        assert written == [f"{t:05d}.png" for t in range(6)]
        with Image.open(tmp_path / name / "00003.png") as image:
            assert image.mode == "P" and image.size == (96, 64)
    result = evaluate_davis(root, tmp_path)
    assert 0.0 < result.jf_mean <= 1.0


def test_run_davis_with_a_tiny_vit(davis_root, tmp_path):
    root, names = davis_root
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    ).save_pretrained(tmp_path / "vit")
    backbone = FrozenBackbone.from_pretrained(str(tmp_path / "vit"))
    config = PropagationConfig(short_side=64, size_multiple=32, n_last_frames=2)
    result = run_davis(root, backbone, tmp_path / "out", config, sequences=names[:1])
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["J&F-Mean"] == pytest.approx(100 * result.jf_mean)  # the file says percent, as papers do
    assert 0.0 <= result.j_mean <= 1.0 and list(result.per_object)[0].startswith(names[0])


@pytest.mark.parametrize(
    "setting, value, requirement",
    [
        ("neighborhood", -1, "be >= 0 patches (0: the whole frame)"),
        ("topk", 0, "be >= 1"),
        ("temperature", 0.0, "be a positive number"),
        ("n_last_frames", -2, "be >= 0"),
    ],
)
def test_propagation_settings_that_mean_nothing_are_refused(setting, value, requirement):
    from selfpatch_hf.evaluation.configs import SettingError

    with pytest.raises(SettingError) as raised:
        PropagationConfig(**{setting: value})
    assert (raised.value.field, raised.value.requirement, raised.value.value) == (setting, requirement, value)
