"""Backbone export: a plain ViTModel folder that a process without selfpatch_hf loads and that reproduces the
per-patch representations the patch loss trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_config

from selfpatch_hf import SelfPatchForPretraining, export_backbone

CHILD = textwrap.dedent(
    """
    import sys, json
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, ViTModel, pipeline

    folder, inputs_path, outputs_path, image_path = sys.argv[1:5]
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    model.eval()
    assert type(model) is ViTModel, type(model)
    assert not any(info.values()), info  # nothing missing (no random pooler), unexpected or mismatched
    pixel_values = torch.load(inputs_path, weights_only=True)
    with torch.no_grad():
        features = model(pixel_values, interpolate_pos_encoding=True).last_hidden_state[:, 1:]

    processor = AutoImageProcessor.from_pretrained(folder)
    image = Image.open(image_path)
    processed = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = model(processed).last_hidden_state
    extractor = pipeline("image-feature-extraction", model=folder, image_processor=processor)
    piped = torch.tensor(extractor(image))
    torch.save(
        {"features": features, "processed": processed, "direct": direct, "piped": piped}, outputs_path
    )
    assert "selfpatch_hf" not in sys.modules, "the child must not import selfpatch_hf"
    print(json.dumps({"ok": True}))
    """
)


def trained_tiny_model() -> SelfPatchForPretraining:
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config())
    with torch.no_grad():  # make student and teacher differ, as after training
        for p in model.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def model_patch_tokens(model, source: str, pixel_values: torch.Tensor) -> torch.Tensor:
    network = model.teacher if source == "teacher" else model.student
    with torch.no_grad():
        return network.encode(pixel_values)[1][:, 1:]


@pytest.mark.parametrize("source", ["teacher", "student"])
def test_exported_backbone_reproduces_patch_representations(tmp_path, source):
    model = trained_tiny_model()
    folder = export_backbone(model, tmp_path / "backbone", source=source)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTModel"]
    assert "auto_map" not in config  # no remote code
    assert config["pooler_act"] == "linear"  # identity pooler: nothing random is added at load time
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert processor["image_std"] == pytest.approx([0.229, 0.224, 0.225])
    assert processor["resample"] == 3  # bicubic
    assert processor["size"] == {"height": 32, "width": 32}

    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(folder).eval()
    pixel_values = torch.randn(2, 3, 48, 32)  # not the training size: interpolated position embeddings
    with torch.no_grad():
        outputs = loaded(pixel_values, interpolate_pos_encoding=True)
    exported = outputs.last_hidden_state[:, 1:]
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(exported, model_patch_tokens(model, source, pixel_values), atol=0, rtol=0)
    other = "student" if source == "teacher" else "teacher"
    assert not torch.allclose(exported, model_patch_tokens(model, other, pixel_values))


def test_export_is_loaded_by_a_process_that_never_imports_selfpatch(tmp_path):
    model = trained_tiny_model()
    folder = export_backbone(model, tmp_path / "backbone")
    pixel_values = torch.randn(2, 3, 32, 40)
    torch.save(pixel_values, tmp_path / "inputs.pt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"),
         str(tmp_path / "image.png")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(
        out["features"], model_patch_tokens(model, "teacher", pixel_values), atol=1e-6, rtol=0
    )

    # the processor does what the training recipe did: bicubic resize to the crop size, ImageNet normalisation
    image = Image.open(tmp_path / "image.png").convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    expected = (np.asarray(image, dtype=np.float32) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    expected = torch.from_numpy(expected.transpose(2, 0, 1)).float()[None]
    torch.testing.assert_close(out["processed"], expected, atol=1e-4, rtol=0)
    # the pipeline returns CLS + patch tokens, the same as calling the model on the processed image
    torch.testing.assert_close(out["piped"], out["direct"], atol=1e-5, rtol=0)
    assert out["piped"].shape == (1, 1 + 16, 32)


def test_export_replaces_a_previous_export_atomically(tmp_path):
    model = trained_tiny_model()
    target = tmp_path / "backbone"
    export_backbone(model, target)
    first = (target / "model.safetensors").read_bytes()
    model.update_teacher(0.0)  # teacher <- student
    export_backbone(model, target)
    assert (target / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]  # no staging or retired folders left


def test_export_rejects_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="teacher"):
        export_backbone(trained_tiny_model(), tmp_path / "x", source="ema")


def test_export_of_a_folder_that_is_no_pretraining_model_is_one_line(tmp_path, capsys):
    from selfpatch_hf.export.cli import main

    backbone = export_backbone(trained_tiny_model(), tmp_path / "backbone")
    capsys.readouterr()
    assert main([str(backbone), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"selfpatch export: error: {backbone} holds a 'vit' model, not a SelfPatchForPretraining (model_type "
        "'selfpatch'): give the pretraining folder (e.g. runs/x/pretraining_model); an exported backbone is already "
        "what this command writes."
    )
    assert not (tmp_path / "again").exists()


def _modes(root) -> dict[str, int]:
    """`{relative path: permission bits}` of a folder and everything in it."""
    modes = {".": os.stat(root).st_mode & 0o777}
    for directory, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(directory, name)
            modes[os.path.relpath(path, root)] = os.stat(path).st_mode & 0o777
    return modes


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_export_and_its_upload_snapshot_follow_the_umask(tmp_path, umask):
    """The folder and files get the modes a plain mkdir / open gives under the umask (mkdtemp alone gives 0700 and
    save_pretrained 0600), and so does the snapshot the Hub uploader keeps of an export."""
    from selfpatch_hf.hub.uploads import snapshot_folder

    previous = os.umask(umask)
    try:
        target = export_backbone(trained_tiny_model(), tmp_path / "run" / "backbone")
        snapshot = tmp_path / "run" / ".hub_uploads" / "step-1"
        snapshot.parent.mkdir()
        snapshot_folder(target, snapshot)
    finally:
        os.umask(previous)
    for folder in (target, snapshot):
        modes = _modes(folder)
        assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= modes.keys()
        for name, mode in modes.items():
            expected = 0o777 & ~umask if (folder / name).is_dir() else 0o666 & ~umask
            assert mode == expected, (folder, name, oct(mode), oct(expected))


def test_export_leaves_the_global_rng_as_it_was(tmp_path):
    """A training run exports between steps: building the exported model must not draw from the RNG its drop-path
    masks come from (a resumed run would otherwise differ from the uninterrupted one)."""
    model = trained_tiny_model()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    export_backbone(model, tmp_path / "backbone")
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


README_CHILD = textwrap.dedent(
    """
    import sys

    snippet = open(sys.argv[1]).read()
    exec(compile(snippet, "README.md", "exec"), {})
    assert "selfpatch_hf" not in sys.modules, "the README's snippet must run without selfpatch_hf"
    print("ran")
    """
)


@pytest.mark.parametrize("mode", ["L", "RGBA"], ids=["grayscale", "rgba"])
def test_the_readme_snippet_runs_on_any_photograph(tmp_path, mode):
    """README.md's "Use a backbone" snippet, as printed, on an exported folder and a grayscale or RGBA image,
    in a process that never imports selfpatch_hf: the exported processor converts every image to RGB."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use a backbone", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    folder = export_backbone(trained_tiny_model(), tmp_path / "backbone")
    rng = np.random.default_rng(0)
    channels = {"L": (), "RGBA": (4,)}[mode]
    Image.fromarray(rng.integers(0, 256, (45, 60, *channels), dtype=np.uint8)).save(
        tmp_path / "image.png"
    )  # L, RGBA
    snippet = snippet.replace("path-or-hub-id", str(folder)).replace("image.jpg", str(tmp_path / "image.png"))
    snippet += "\nassert tuple(feature_map.shape) == (1, 4, 4, 32), feature_map.shape\n"
    (tmp_path / "snippet.py").write_text(snippet)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", README_CHILD, str(tmp_path / "snippet.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and "ran" in result.stdout, result.stderr[-3000:]


def _limit_file_size():
    """In the child: files cannot grow beyond 100 kB (writes fail with EFBIG, as on a full disk; not a signal)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_failed_write_of_an_export_is_one_line_and_keeps_the_previous_export(tmp_path):
    model = trained_tiny_model()
    model.save_pretrained(tmp_path / "pretraining")
    target = tmp_path / "backbone"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [
        sys.executable,
        "-m",
        "selfpatch_hf.cli.main",
        "export",
        str(tmp_path / "pretraining"),
        str(target),
    ]
    assert subprocess.run(command, capture_output=True, text=True, env=env, timeout=300).returncode == 0
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    model.update_teacher(0.0)
    model.save_pretrained(tmp_path / "pretraining")
    failed = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, preexec_fn=_limit_file_size
    )
    assert failed.returncode == 1, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert "Traceback" not in failed.stderr, failed.stderr
    assert last.startswith(f"selfpatch export: error: writing the backbone to {target} failed: "), last
    assert last.endswith(
        "the previous export is untouched. Free space or fix the folder's permissions, then run the same command again."
    )
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backbone", "pretraining"]  # no staging left


def test_weights_with_nan_are_never_exported_nor_pushed(tmp_path, capsys):
    from selfpatch_hf.export.cli import main
    from selfpatch_hf.hub.publishing import PublishError, check_backbone_folder

    model = trained_tiny_model()
    target = export_backbone(model, tmp_path / "backbone")
    good = (target / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.teacher.backbone.embeddings.position_embeddings.view(-1)[0] = float("nan")
    with pytest.raises(
        ValueError, match=r"the teacher's backbone holds NaN or infinite values in 1 tensor\(s\)"
    ):
        export_backbone(model, target)
    assert (target / "model.safetensors").read_bytes() == good  # the good export stays
    model.save_pretrained(tmp_path / "pretraining")
    capsys.readouterr()
    assert main([str(tmp_path / "pretraining"), str(target)]) == 1
    assert "embeddings.position_embeddings); nothing was written" in capsys.readouterr().err
    assert (target / "model.safetensors").read_bytes() == good
    # a folder written by other means is not published either
    from safetensors.torch import load_file, save_file

    weights = load_file(target / "model.safetensors")
    weights["embeddings.position_embeddings"] = weights["embeddings.position_embeddings"].clone()
    weights["embeddings.position_embeddings"].view(-1)[0] = float("inf")
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    (target / "README.md").write_text("# card\n")
    with pytest.raises(
        PublishError, match=r"hold NaN or infinite values in 1 tensor\(s\) \(embeddings.position"
    ):
        check_backbone_folder(target)
