"""Teacher-positive pictures straight from a SelfPatch pretraining model (Python and CLI)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tiny_models import tiny_config

from selfpatch_hf import SelfPatchForPretraining, select_positive_neighbors
from selfpatch_hf.evaluation.cli import main
from selfpatch_hf.evaluation.visualize import teacher_positives


def test_teacher_positives_match_the_model_and_draw(tmp_path):
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config(num_positives=3)).eval()
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    picture, grid, positives = teacher_positives(model, image, image_size=(32, 48))
    assert picture.size == (48, 32) and grid == (4, 6) and positives.shape == (24, 3)
    # same selection as the model's own teacher on the same crop
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
    pixels = ((pixels - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])).permute(
        2, 0, 1
    )
    with torch.no_grad():
        features, _ = model.teacher.encode(pixels[None])
    assert torch.equal(positives, select_positive_neighbors(features, grid, 3)[0])

    model.save_pretrained(tmp_path / "pretraining")
    Image.fromarray(image).save(tmp_path / "image.png")
    out = tmp_path / "positives.png"
    argv = [
        "visualize",
        "--pretraining",
        str(tmp_path / "pretraining"),
        "--image",
        str(tmp_path / "image.png"),
    ]
    assert main([*argv, "--query", "5", "--query", "0.5,0.5", "--output", str(out)]) == 0
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.width >= 2 * 32
