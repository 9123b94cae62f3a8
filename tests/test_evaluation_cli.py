"""`python -m selfpatch_hf.evaluation`: every subcommand end to end on offline data and tiny backbones."""

import io
import json
import logging
import os
import re
import shutil
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
    assert 0.0 <= scores["J&F-Mean"] <= 100.0  # percent, as the printed tables
    assert scores["J&F-Mean"] == pytest.approx((scores["j_mean"] + scores["f_mean"]) / 2)
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
    assert probe["num_train"] == 6 and probe["num_eval"] == 3 and 0.0 <= probe["mean_iou"] <= 100.0
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
        # input + 2 models, each 64x96 shown 4x enlarged; the caption names the models and queries
        assert png.format == "PNG" and png.width == 3 * 4 * 96
        assert f"dino = {workspace / 'vit0'}" in png.text["Description"]
        assert "row 2: patch 10 (row 0, column 10 from 0 in the 8x12 patch grid)" in png.text["Description"]
        width = png.width
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
        assert png.size[0] == width  # drawn on the given image at its own size (wide enough already)


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


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def run_cli(capsys):
    """`selfpatch eval ARGV` in this process: (exit status, stderr lines); a traceback would fail the test."""

    def run(*argv: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as error:  # argparse's own usage errors
            code = error.code
        return code, capsys.readouterr().err.strip().splitlines()

    return run


def assert_one_line_error(lines: list[str], *fragments: str) -> None:
    errors = [line for line in lines if line.startswith("selfpatch eval")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_missing_model_dataset_and_davis_paths_are_one_line_errors(workspace, tmp_path, run_cli):
    data = str(workspace / "data/segmentation")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfpatch_hf.evaluation",
            "knn",
            "--model",
            str(tmp_path / "no-model"),
            "--dataset",
            data,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"selfpatch eval: error: --model {tmp_path / 'no-model'}: no such file or folder; give an existing path "
        "(or a Hub id)."
    ]
    (tmp_path / "empty").mkdir()
    assert main(["knn", "--model", str(tmp_path / "empty"), "--dataset", data]) == 1  # a folder, but no model
    code, lines = run_cli(
        "linear-probe", "--model", str(workspace / "vit0"), "--dataset", str(tmp_path / "none")
    )
    assert code == 2
    assert_one_line_error(lines, "--dataset", "no such file or folder")
    code, lines = run_cli(
        "davis", "--model", str(workspace / "vit0"), "--davis-root", str(tmp_path / "nowhere"),
        "--output-dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2
    assert_one_line_error(lines, "--davis-root", "is not a folder")
    code, lines = run_cli(
        "davis", "--davis-root", str(workspace / "data/davis"), "--output-dir", str(tmp_path)
    )
    assert code == 2
    assert_one_line_error(lines, "give --model (or --evaluate-only")


def davis_copy(workspace, tmp_path):
    root = tmp_path / "davis"
    shutil.copytree(workspace / "data/davis", root)
    sequence = (root / "ImageSets/2017/val.txt").read_text().split()[0]
    return root, sequence


def test_missing_frames_and_mismatched_masks_are_one_line_errors(workspace, tmp_path, run_cli):
    root, sequence = davis_copy(workspace, tmp_path)
    model = ["--model", str(workspace / "vit0"), "--short-side", "48", "--size-multiple", "16"]
    shutil.rmtree(root / "JPEGImages/480p" / sequence)
    code, lines = run_cli("davis", *model, "--davis-root", str(root), "--output-dir", str(tmp_path / "a"))
    assert code == 1
    assert_one_line_error(lines, "No frames (*.jpg) in", sequence)

    root, sequence = davis_copy(workspace, tmp_path / "b")
    first = root / "Annotations/480p" / sequence / "00000.png"
    with Image.open(first) as mask:
        mask.resize((32, 24)).save(first)
    code, lines = run_cli("davis", *model, "--davis-root", str(root), "--output-dir", str(tmp_path / "b/out"))
    assert code == 1
    assert_one_line_error(lines, "00000.jpg is 64x48 px but the annotation", "00000.png is 32x24")

    # predictions of another size than the annotations: the scorer names the file
    root, sequence = davis_copy(workspace, tmp_path / "c")
    predictions = tmp_path / "c/predictions"
    shutil.copytree(root / "Annotations/480p", predictions)
    with Image.open(predictions / sequence / "00001.png") as mask:
        mask.resize((32, 24)).save(predictions / sequence / "00001.png")
    code, lines = run_cli(
        "davis", "--davis-root", str(root), "--output-dir", str(predictions), "--evaluate-only"
    )
    assert code == 1
    assert_one_line_error(lines, f"The prediction {predictions / sequence / '00001.png'} is 32x24 px")


def test_an_annotated_frame_without_its_image_is_announced(workspace, tmp_path, run_cli, caplog):
    from selfpatch_hf.evaluation.davis import load_sequence

    root, sequence = davis_copy(workspace, tmp_path)
    (root / "JPEGImages/480p" / sequence / "00002.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="selfpatch_hf.evaluation.davis"):
        loaded = load_sequence(root, sequence)
    assert re.search(
        r"1 annotated frame\(s\) have no image .*\(00002\.png\); they are not propagated", caplog.text
    )
    assert [p.name for p in loaded.annotations] == ["00000.png", "00001.png", "00003.png"]
    caplog.clear()
    code, _ = run_cli(
        "davis", "--model", str(workspace / "vit0"), "--davis-root", str(root), "--output-dir",
        str(tmp_path / "out"), "--short-side", "48", "--size-multiple", "16", "--sequences", sequence,
    )  # fmt: skip
    assert code == 0 and "(00002.png); they are not propagated and not scored" in caplog.text
    (root / "JPEGImages/480p" / sequence / "00000.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"first annotated frame's image .*00000\.jpg is missing"):
        load_sequence(root, sequence)


def test_bad_visualize_arguments_are_one_line_errors(workspace, tmp_path, run_cli):
    base = ["visualize", "--model", str(workspace / "vit0"), "--image", "skimage:chelsea"]
    out = ["--output", str(tmp_path / "fig.png")]
    code, lines = run_cli(*base, "--query", "999", "--image-size", "64,96", *out)
    assert code == 2
    assert_one_line_error(lines, "Query patch 999 is outside the 8x12 patch grid (0..95)")
    code, lines = run_cli(*base, "--query", "1.5,0.2", *out)
    assert (
        code == 2
        and "argument --query: Y,X are fractions of the image height and width in [0, 1]" in lines[-1]
    )
    code, lines = run_cli(*base[:3], "--image", str(tmp_path / "missing.jpg"), "--query", "1", *out)
    assert code == 2
    assert_one_line_error(lines, "--image", "no such file")
    code, lines = run_cli("visualize", "--image", "skimage:chelsea", "--query", "1", *out)
    assert code == 2
    assert_one_line_error(lines, "give exactly one of --model")
    code, lines = run_cli(*base, "--query", "1", "--layer", "2", *out)
    assert code == 2
    assert_one_line_error(lines, "layer 2 is outside the 2 layers of vit0 (0..1, or -1..-2 from the last)")
    code, lines = run_cli(*base, "--query", "1", "--fraction", "0", *out)
    assert code == 2
    assert_one_line_error(lines, "--fraction must lie in (0, 1]")
    assert not (tmp_path / "fig.png").exists()


def test_every_option_is_described_and_examples_keep_their_lines():
    from selfpatch_hf.evaluation.cli import COMMANDS, command_parser

    for name in COMMANDS:
        subparser = command_parser(name)
        text = subparser.format_help()
        options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
        assert options, name
        for option in options:  # an option's own line is followed by its help, on the same line or the next
            after = text.split("\n  " + option, 1)[1].split("\n  --", 1)[0]
            assert len(after.split()) > 1, f"{name} {option} has no description"
        assert "(default: None)" not in text and text.count("(default: cpu)") <= 1
        assert "(default: True)" not in text and "(default: False)" not in text
        if name == "visualize":
            assert "examples:\n  selfpatch eval visualize --model dino=" in text  # line breaks kept


# ------------------------------------------------------------------------------------ what the numbers mean
def test_random_baseline_is_reported_beside_the_model(workspace, capsys, tmp_path):
    data = str(workspace / "data/segmentation")
    probe_json = tmp_path / "probe.json"
    args = ["linear-probe", "--model", str(workspace / "vit1"), "--dataset", data, "--image-size", "32"]
    assert (
        main(args + ["--epochs", "2", "--random-baseline", "--quiet", "--output-json", str(probe_json)]) == 0
    )
    printed = capsys.readouterr().out
    assert f"| {workspace / 'vit1'} |" in printed and "| random-init |" in printed
    probe = json.loads(probe_json.read_text())
    # the baseline is the model's architecture with transformers' initialisation (seed 0), probed the same way
    from selfpatch_hf.evaluation.cli.common_options import load_split
    from selfpatch_hf.evaluation.configs import LinearProbeConfig
    from selfpatch_hf.evaluation.features import FrozenBackbone
    from selfpatch_hf.evaluation.linear_probe import run_linear_probe

    random_init = FrozenBackbone.random_like(str(workspace / "vit1"), seed=0)
    assert random_init.model.config.to_dict() == ViTModel.from_pretrained(workspace / "vit1").config.to_dict()
    expected = run_linear_probe(
        random_init,
        load_split(data, "train"),
        load_split(data, "validation"),
        LinearProbeConfig(image_size=32, epochs=2),
    )
    assert probe["random-init"]["mean_iou"] == pytest.approx(100 * expected.scores.mean_iou)

    out = tmp_path / "davis"
    args = ["davis", "--davis-root", str(workspace / "data/davis"), "--output-dir", str(out), "--quiet"]
    args += [
        "--model",
        f"a={workspace / 'vit0'}",
        "--random-baseline",
        "--size-multiple",
        "16",
        "--topk",
        "3",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| a |") or
            line.startswith("| random-init |")}  # fmt: skip
    assert set(rows) == {"a", "random-init"}
    scores = {name: json.loads((out / name / "scores.json").read_text()) for name in rows}
    for name, line in rows.items():  # the table shows the JSON's percentages
        assert line.split("|")[2].strip() == f"{scores[name]['J&F-Mean']:.1f}"


def _as_standard_scenes(workspace, tmp_path):
    """The workspace's small scenes, described as the standard ones (only the description is read)."""
    from selfpatch_hf.evaluation.offline_reference import standard_arguments

    root = tmp_path / "standard"
    shutil.copytree(workspace / "data", root)
    info = json.loads((root / "offline_data.json").read_text())
    info["arguments"] = standard_arguments()
    (root / "offline_data.json").write_text(json.dumps(info))
    return root


def test_scores_on_the_standard_offline_scenes_come_with_the_recorded_floor(workspace, tmp_path, capsys):
    from selfpatch_hf.evaluation.configs import KnnConfig, LinearProbeConfig, PropagationConfig
    from selfpatch_hf.evaluation.offline_reference import RANDOM_INIT_FLOOR, reference_note

    root = _as_standard_scenes(workspace, tmp_path)
    vit_ti = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, patch_size=16)
    note = reference_note("linear-probe", root / "segmentation", LinearProbeConfig(), vit_ti)
    assert "41.4 ± 0.9" in note and "up to 0.9" in note and "BENCHMARKS.md" in note
    assert "differ" not in note and "measured for" not in note
    # DAVIS: the default settings do not enlarge the 240-px frames, so they are the recorded ones
    note = reference_note("davis", root / "davis", PropagationConfig(), vit_ti)
    assert f"J&F {RANDOM_INIT_FLOOR['J&F'][0]}" in note and "differ" not in note
    assert "differ" in reference_note("davis", root / "davis", PropagationConfig(upscale=True), vit_ti)
    assert "differ" in reference_note(
        "knn", root / "segmentation", KnnConfig(), vit_ti
    )  # resize 256, not 224
    small = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
    assert "measured for ViT-Ti/16" in reference_note("davis", root / "davis", PropagationConfig(), small)
    assert (
        reference_note("davis", workspace / "data/davis", PropagationConfig(), vit_ti) is None
    )  # other scenes

    args = ["linear-probe", "--model", str(workspace / "vit0"), "--dataset", str(root / "segmentation")]
    assert main(args + ["--image-size", "32", "--epochs", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Reference (BENCHMARKS.md" in err and "mIoU 41.4 ± 0.9" in err and "settings differ" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_threads_and_progress_bars(workspace, monkeypatch, run_cli):
    data = str(workspace / "data/segmentation")
    args = ["knn", "--model", str(workspace / "vit0"), "--dataset", data, "--resize", "32", "--crop", "32"]
    threads = torch.get_num_threads()
    try:
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main([*args, "--k", "3", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert "representations of the training images" in terminal.getvalue()  # a bar, on a terminal
        quiet = _Terminal()
        monkeypatch.setattr(sys, "stderr", quiet)
        assert main([*args, "--k", "3", "--quiet"]) == 0
        assert "representations of" not in quiet.getvalue()
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    code, lines = run_cli(*args, "--threads", "0")
    assert code == 2
    assert_one_line_error(lines, "--threads must be a positive number of threads, got 0")
    code, lines = run_cli(*args, "--k", "0")
    assert code == 2
    assert_one_line_error(lines, "--k must be >= 1, got 0")
    code, lines = run_cli(*args, "--temperature", "nan")
    assert code == 2
    assert_one_line_error(lines, "--temperature must be a positive number, got nan")


def test_offline_data_go_to_the_cache_folder_that_fine_tuning_reads(tmp_path, monkeypatch, run_cli):
    from selfpatch_hf.data.samples.synthetic_scenes import default_offline_data_dir

    monkeypatch.setenv("SELFPATCH_HF_CACHE", str(tmp_path / "cache"))
    target = default_offline_data_dir()
    assert target == tmp_path / "cache" / "offline-eval"
    code, lines = run_cli("make-offline-data", "--num-sequences", "2")
    assert code == 2
    assert_one_line_error(lines, "the cache folder holds the standard scenes only", "give --output-dir")
    assert not target.exists()
    # another folder's content is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, lines = run_cli("make-offline-data", "--output-dir", str(tmp_path / "mine"), "--num-sequences", "1")
    assert code == 2
    assert_one_line_error(lines, "holds other files (notes.txt)")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    code, lines = run_cli("make-offline-data", "--output-dir", str(tmp_path / "x"), "--num-frames", "2")
    assert code == 2
    assert_one_line_error(lines, "--num-frames must be >= 3, got 2")


@pytest.mark.slow
def test_the_standard_scenes_are_built_once_for_evaluation_and_fine_tuning(tmp_path, monkeypatch, capsys):
    from selfpatch_hf.data.samples.synthetic_scenes import default_offline_data_dir
    from selfpatch_hf.data.segmentation.loading import OFFLINE_SCENES, load_segmentation_splits

    monkeypatch.setenv("SELFPATCH_HF_CACHE", str(tmp_path / "cache"))
    assert main(["make-offline-data"]) == 0
    target = default_offline_data_dir()
    parquet = sorted((target / "segmentation").rglob("*.parquet"))
    stamps = [path.stat().st_mtime_ns for path in parquet]
    assert len(parquet) == 2 and (target / "davis" / "ImageSets" / "2017" / "val.txt").is_file()
    train, evaluation = load_segmentation_splits(OFFLINE_SCENES, "train", "validation")
    assert (len(train), len(evaluation)) == (240, 80)
    assert [path.stat().st_mtime_ns for path in parquet] == stamps  # fine-tuning reused them, no second copy
    capsys.readouterr()
    assert main(["make-offline-data"]) == 0
    assert "already built" in capsys.readouterr().out
    assert sorted(p.name for p in target.parent.iterdir()) == ["offline-eval"]  # no staging folder left


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(tmp_path, run_cli):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    model, data = str(tmp_path / "no-model"), str(tmp_path / "no-data")  # never read: the outputs fail first
    for argv, message in (
        (
            ["knn", "--model", model, "--dataset", data, "--output-json", str(a_file / "knn.json")],
            f"--output-json {a_file / 'knn.json'}: {a_file} is a file, not a folder",
        ),
        (
            ["linear-probe", "--model", model, "--dataset", data, "--output-json", str(tmp_path)],
            f"--output-json {tmp_path} is a folder; give a file name inside it.",
        ),
        (
            ["davis", "--model", model, "--davis-root", data, "--output-dir", str(a_file)],
            f"--output-dir {a_file} is a file; give a folder",
        ),
        (
            ["visualize", "--model", model, "--image", data, "--query", "0", "--output", str(tmp_path)],
            f"--output {tmp_path} is a folder",
        ),
    ):
        code, lines = run_cli(*argv)
        assert code == 2
        assert_one_line_error(lines, message)
    assert a_file.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
