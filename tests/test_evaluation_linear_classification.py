"""`selfpatch eval linear`: DINO's linear classification protocol, its saved classifier, resume and bad input."""

import io
import json
import os
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SwinConfig, SwinModel, ViTConfig, ViTImageProcessor, ViTModel

from selfpatch_hf.evaluation.classifier_export import save_classifier
from selfpatch_hf.evaluation.cli import main
from selfpatch_hf.evaluation.configs import LinearClassificationConfig, SettingError
from selfpatch_hf.evaluation.features import FrozenBackbone
from selfpatch_hf.evaluation.labelled_images import prepare_splits
from selfpatch_hf.evaluation.linear_classification import (
    EXPORTABLE,
    PROTOCOL,
    classifier_image_processor,
    fit_linear_classifier,
    protocol_features,
    resolve_feature_spec,
    run_linear_classification,
    topk_accuracy,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny_vit(seed: int = 0, layers: int = 3) -> ViTModel:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return ViTModel(config, add_pooling_layer=False).eval()


def coloured_images(num_per_class: int, seed: int, size: int = 40) -> datasets.Dataset:
    """Three classes told apart by their dominant colour, plus noise: a backbone-free signal a linear layer finds."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(3):
        for _ in range(num_per_class):
            pixels = rng.integers(0, 80, size=(size, size + 8, 3))
            pixels[..., label] += 160
            images.append(Image.fromarray(pixels.astype(np.uint8)))
            labels.append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "green", "blue"])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    tiny_vit().save_pretrained(root / "vit")
    ViTImageProcessor(image_mean=MEAN, image_std=STD).save_pretrained(root / "vit")
    # a third of the validation labels are wrong, so that no classifier scores 100 and equal scores mean equal
    # predictions image by image
    validation = coloured_images(3, 1).map(
        lambda row, index: {"label": (row["label"] + 1) % 3 if index % 3 == 0 else row["label"]},
        with_indices=True,
    )
    datasets.DatasetDict({"train": coloured_images(6, 0), "validation": validation}).save_to_disk(
        str(root / "colours")
    )
    return root


# ------------------------------------------------------------------------------------------------ the protocol
def test_topk_accuracy_matches_a_per_row_count():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=generator)
    labels = torch.randint(0, 7, (50,), generator=generator)
    for k in (1, 3, 5, 9):
        hits = sum(int(labels[i]) in np.argsort(-logits[i].numpy())[: min(k, 7)] for i in range(50))
        assert topk_accuracy(logits, labels, k) == pytest.approx(100.0 * hits / 50)


def test_linear_layer_separates_a_separable_problem_and_not_shuffled_labels():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 3

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 4, (n,), generator=generator)
        return centres[labels] + 0.3 * torch.randn(n, 16, generator=generator), labels

    train_x, train_y = sample(400)
    test_x, test_y = sample(400)
    # lr 0.5 per 256 images x 64 / 256: a large rate for a 16-wide problem
    config = LinearClassificationConfig(epochs=20, batch_size=64, learning_rate=0.5)
    head = fit_linear_classifier(train_x, train_y, 4, config)
    with torch.no_grad():
        assert topk_accuracy(head(test_x), test_y, 1) == 100.0
    shuffled = train_y[torch.randperm(400, generator=generator)]
    head = fit_linear_classifier(train_x, shuffled, 4, config)
    with torch.no_grad():
        accuracy = topk_accuracy(head(test_x), test_y[torch.randperm(400, generator=generator)], 1)
    assert 15.0 < accuracy < 37.0  # chance is 25 (400 images: a standard deviation of 2.2)


def test_features_follow_dinos_eval_linear():
    model = tiny_vit(layers=3)
    backbone = FrozenBackbone(model, MEAN, STD)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    normalised = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=normalised, output_hidden_states=True).hidden_states
        # DINO: get_intermediate_layers(x, n) = norm(output of each of the last n blocks), then
        # torch.cat([x[:, 0] for x in intermediate_output], dim=-1)
        normed = [model.layernorm(block) for block in hidden[-2:]]
        expected = torch.cat([block[:, 0] for block in normed], dim=-1)
        last = model.layernorm(hidden[-1])
        # avgpool_patchtokens: torch.cat((output.unsqueeze(-1), mean(last[:, 1:]).unsqueeze(-1)), -1).reshape(b, -1)
        cls_avg = torch.cat(
            (last[:, 0].unsqueeze(-1), last[:, 1:].mean(dim=1).unsqueeze(-1)), dim=-1
        ).reshape(2, -1)

    spec = resolve_feature_spec(backbone, LinearClassificationConfig(n_last_blocks=2))
    assert (spec.n_last_blocks, spec.avgpool, spec.dim) == (2, False, 64)
    features = protocol_features(backbone, images, spec)
    torch.testing.assert_close(features[PROTOCOL], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features[EXPORTABLE], last[:, 0], rtol=1e-5, atol=1e-5)

    spec = resolve_feature_spec(backbone, LinearClassificationConfig(n_last_blocks=1))
    assert spec.avgpool and spec.dim == 64  # auto: the average pool beside one block's CLS, as DINO's ViT-B
    features = protocol_features(backbone, images, spec)
    torch.testing.assert_close(features[PROTOCOL], cls_avg, rtol=1e-5, atol=1e-5)
    # interleaved channel by channel: CLS channel 0, mean channel 0, CLS channel 1, ...
    torch.testing.assert_close(features[PROTOCOL][0, :2], torch.stack([last[0, 0, 0], last[0, 1:, 0].mean()]))

    spec = resolve_feature_spec(backbone, LinearClassificationConfig(n_last_blocks=1, avgpool="off"))
    features = protocol_features(backbone, images, spec)
    assert set(features) == {PROTOCOL}  # ViTForImageClassification's own feature: one head only
    torch.testing.assert_close(features[PROTOCOL], last[:, 0], rtol=1e-5, atol=1e-5)

    assert resolve_feature_spec(backbone, LinearClassificationConfig()).n_last_blocks == 3  # min(4, blocks)
    wide = FrozenBackbone(
        ViTModel(ViTConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=8))
    )
    assert (lambda s: (s.n_last_blocks, s.avgpool))(
        resolve_feature_spec(wide, LinearClassificationConfig())
    ) == (
        1,
        True,
    )
    with pytest.raises(SettingError, match="avgpool"):
        LinearClassificationConfig(n_last_blocks=2, avgpool="on")
    with pytest.raises(ValueError, match="fewer than the 5"):
        protocol_features(
            backbone, images, resolve_feature_spec(backbone, LinearClassificationConfig(n_last_blocks=5))
        )


def test_swin_uses_the_last_stage_average_pool_and_saves_as_swin(tmp_path):
    torch.manual_seed(0)
    config = SwinConfig(
        image_size=32,
        patch_size=2,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=4,
        mlp_ratio=1.0,
    )
    model = SwinModel(config).eval()
    backbone = FrozenBackbone(model, MEAN, STD)
    spec = resolve_feature_spec(backbone, LinearClassificationConfig())
    assert not spec.needs_exportable_head and spec.dim == 16
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    normalised = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = model(pixel_values=normalised).pooler_output
    torch.testing.assert_close(
        protocol_features(backbone, images, spec)[PROTOCOL], pooled, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="no CLS token"):
        resolve_feature_spec(backbone, LinearClassificationConfig(n_last_blocks=2))

    data = coloured_images(2, 0, size=32)
    config = LinearClassificationConfig(epochs=1, batch_size=4, resize=32, crop=32, augmentation=False)
    trained = run_linear_classification(backbone, data, data, config)
    assert trained.result.exportable is None
    save_classifier(tmp_path / "swin", backbone, trained, config)
    from transformers import AutoModelForImageClassification, SwinForImageClassification

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "swin")
    assert isinstance(loaded, SwinForImageClassification)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=normalised).logits, trained.head(PROTOCOL)(pooled), rtol=1e-4, atol=1e-5
        )


# ---------------------------------------------------------------------------------------- the saved classifier
SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import datasets, numpy as np, torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    folder, data, out = sys.argv[1:4]
    split = datasets.load_from_disk(data)["validation"]
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**processor(images=list(split["image"]), return_tensors="pt")).logits
    np.save(out + "/logits.npy", logits.numpy())
    classifier = pipeline("image-classification", model=folder)
    names = split.features["label"].names
    predictions = [classifier(image, top_k=1)[0]["label"] for image in split["image"]]
    top1 = 100.0 * sum(p == names[y] for p, y in zip(predictions, split["label"])) / len(split)
    json.dump({"top1": top1, "selfpatch_hf": any(m.startswith("selfpatch_hf") for m in sys.modules)},
              open(out + "/pipeline.json", "w"))
    """
)


def test_saved_classifier_loads_without_selfpatch_hf_and_its_card_holds_the_pipelines_score(
    workspace, tmp_path
):
    folder, data = tmp_path / "classifier", workspace / "colours"
    args = [
        "linear",
        "--model",
        str(workspace / "vit"),
        "--dataset",
        str(data),
        "--resize",
        "36",
        "--crop",
        "32",
    ]
    args += ["--epochs", "4", "--batch-size", "6", "--learning-rate", "20", "--n-last-blocks", "2", "--quiet"]
    args += ["--save-classifier", str(folder), "--output-json", str(tmp_path / "scores.json")]
    assert main(args) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert (
        scores["feature"] == "CLS of the last 2 blocks"
        and scores["exportable"]["feature"] == "CLS of the last block"
    )
    # the exportable head's score (evaluation views through the saved processor) is what the saved folder gives
    assert scores["saved_classifier"]["top1"] == scores["exportable"]["top1"]

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, str(folder), str(data), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads((tmp_path / "pipeline.json").read_text())
    assert outcome["selfpatch_hf"] is False
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "**CLS of the last block**" in card
    assert f"value: {round(outcome['top1'], 2)}" in card  # the card's top-1 is the pipeline's
    assert outcome["top1"] == pytest.approx(scores["saved_classifier"]["top1"])
    assert 0 < outcome["top1"] < 100
    assert "CLS of the last 2 blocks" in card  # and names the protocol's own feature and score apart

    # the same logits as the backbone + head computed here
    backbone = FrozenBackbone.from_pretrained(str(workspace / "vit"))
    config = LinearClassificationConfig(n_last_blocks=2, resize=36, crop=32)
    split = datasets.load_from_disk(str(data))["validation"]
    pixels = classifier_image_processor(backbone, config)(
        images=list(split["image"]), do_normalize=False, return_tensors="pt"
    )["pixel_values"]
    cls = protocol_features(backbone, pixels, resolve_feature_spec(backbone, config))[EXPORTABLE]
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    expected = cls @ weights["classifier.weight"].T + weights["classifier.bias"]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_a_learning_rate_sweep_trains_each_rate_as_its_own_run_and_reports_the_best():
    backbone = FrozenBackbone(tiny_vit(layers=2), MEAN, STD)
    data = coloured_images(3, 0, size=32)
    settings = {"epochs": 2, "batch_size": 4, "resize": 32, "crop": 32, "augmentation": False}
    sweep = run_linear_classification(
        backbone, data, data, LinearClassificationConfig(lr_sweep="0.01,5", **settings)
    )
    rows = sweep.result.protocol.sweep
    assert [row["learning_rate"] for row in rows] == [0.01, 5.0]
    for index, rate in enumerate((0.01, 5.0)):
        alone = run_linear_classification(
            backbone, data, data, LinearClassificationConfig(learning_rate=rate, **settings)
        )
        assert (rows[index]["top1"], rows[index]["top5"]) == (alone.result.top1, alone.result.top5)
        for name in ("protocol", "exportable"):
            ours, theirs = sweep.heads[f"{name}_{index}"], alone.heads[f"{name}_0"]
            torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=1e-7)
    best = max(rows, key=lambda row: row["top1"])
    assert sweep.result.top1 == best["top1"] and sweep.result.protocol.learning_rate == best["learning_rate"]
    with pytest.raises(SettingError, match="lr_sweep"):
        LinearClassificationConfig(lr_sweep="0.1,-1")


@pytest.mark.slow
def test_two_processes_share_the_backbone_passes_and_give_one_processs_result(workspace, tmp_path):
    args = ["linear", "--model", str(workspace / "vit"), "--dataset", str(workspace / "colours"), "--quiet"]
    args += ["--resize", "36", "--crop", "32", "--epochs", "2", "--batch-size", "4", "--learning-rate", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launches = {
        "one": [sys.executable, "-m", "selfpatch_hf.evaluation"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
        + ["selfpatch_hf.evaluation"],
    }
    outputs = {}
    for name, launch in launches.items():
        done = subprocess.run(
            [*launch, *args, "--output-json", str(tmp_path / f"{name}.json")],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[name] = done
    assert "2 processes shared the backbone passes (cpu)." in outputs["two"].stderr
    assert outputs["two"].stdout.count("| Model |") == 1  # one table, from the main process
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in launches)
    assert two == one  # augmented views drawn per image, not per process: the same training


# ------------------------------------------------------------------------------------------------------ resume
class _Stop(Exception):
    pass


@pytest.mark.parametrize("augmentation", [True, False])
def test_a_resumed_run_gives_the_uninterrupted_runs_weights(tmp_path, augmentation):
    backbone = FrozenBackbone(tiny_vit(layers=2), MEAN, STD)
    data = coloured_images(3, 0, size=32)
    config = LinearClassificationConfig(
        epochs=3, batch_size=4, resize=32, crop=32, learning_rate=5.0, augmentation=augmentation
    )
    whole = run_linear_classification(backbone, data, data, config)
    state = tmp_path / "state.pt"

    def stop_after_two(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise _Stop  # killed right after epoch 2's state was written

    with pytest.raises(_Stop):
        run_linear_classification(backbone, data, data, config, checkpoint=state, log=stop_after_two)
    lines = []
    resumed = run_linear_classification(backbone, data, data, config, checkpoint=state, log=lines.append)
    assert lines[0].startswith(f"resuming from {state} after epoch 2 of 3") and len(lines) == 2
    assert resumed.result.resumed_from_epoch == 2
    for key in whole.heads:
        for a, b in zip(whole.heads[key].parameters(), resumed.heads[key].parameters(), strict=True):
            assert torch.equal(a, b)
    assert resumed.result.to_dict() == whole.result.to_dict()
    # other settings refuse the state instead of mixing two runs
    with pytest.raises(ValueError, match="other settings"):
        run_linear_classification(
            backbone, data, data, LinearClassificationConfig(epochs=4, resize=32, crop=32), checkpoint=state
        )


# --------------------------------------------------------------------------------------------------- bad input
def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as error:
        code = error.code
    return code, capsys.readouterr().err.strip().splitlines()


def one_line_error(lines: list[str], fragment: str) -> None:
    errors = [line for line in lines if line.startswith("selfpatch eval")]
    assert len(errors) == 1 and lines[-1] == errors[0] and fragment in errors[0], lines


def test_bad_input_is_one_line(workspace, tmp_path, capsys):
    base = ["linear", "--model", str(workspace / "vit"), "--resize", "36", "--crop", "32", "--quiet"]
    colours = ["--dataset", str(workspace / "colours")]
    code, lines = run_cli(capsys, *base, *colours, "--epochs", "0")
    assert code == 2
    one_line_error(lines, "--epochs must be >= 1, got 0")
    code, lines = run_cli(capsys, *base, *colours, "--n-last-blocks", "2", "--avgpool", "on")
    assert code == 2
    one_line_error(lines, "--avgpool must be 'off' or 'auto' with more than one block")
    code, lines = run_cli(capsys, *base, *colours, "--hub-request-timeout", "0")
    assert code == 2
    one_line_error(lines, "--hub-request-timeout must be a positive number of seconds, got 0.0")
    code, lines = run_cli(capsys, *base, *colours, "--label-column", "species")
    assert code == 1
    one_line_error(lines, "not 'species'")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, lines = run_cli(capsys, *base, *colours, "--save-classifier", str(tmp_path / "other"))
    assert code == 2
    one_line_error(lines, "holds other files")

    def saved(name: str, train: datasets.Dataset, validation: datasets.Dataset) -> list[str]:
        datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(tmp_path / name))
        return ["--dataset", str(tmp_path / name)]

    good = coloured_images(2, 0)
    unlabelled = good.cast_column("label", datasets.Value("int64")).map(lambda row: {"label": -1})
    code, lines = run_cli(capsys, *base, *saved("unlabelled", good, unlabelled))
    assert code == 1
    one_line_error(lines, "labels -1..-1, outside 0..2")
    single = good.filter(lambda row: row["label"] == 1)
    code, lines = run_cli(capsys, *base, *saved("single", single, good))
    assert code == 1
    one_line_error(lines, "a single class (1)")

    # a corrupt image is skipped and counted, once, in both splits
    raw = good.cast_column("image", datasets.Image(decode=False))
    rows = raw.to_list()
    rows[1]["image"] = {"bytes": b"not an image", "path": None}
    broken = datasets.Dataset.from_list(rows, features=raw.features).cast_column("image", datasets.Image())
    out = tmp_path / "broken.json"
    args = [*base, *saved("broken", broken, broken), "--epochs", "2", "--output-json", str(out)]
    code, lines = run_cli(capsys, *args)
    assert code == 0, lines
    scores = json.loads(out.read_text())
    assert (scores["skipped_train"], scores["skipped_eval"], scores["num_train"], scores["num_eval"]) == (
        1,
        1,
        5,
        5,
    )
    assert "skipped unreadable images: 1 training, 1 evaluation." in lines


def test_labels_are_checked_against_the_class_names():
    data = coloured_images(2, 0)
    train, evaluation, names = prepare_splits(data, data)
    assert (
        names == ["red", "green", "blue"]
        and len(train) == 6
        and list(evaluation.labels) == [0, 0, 1, 1, 2, 2]
    )
    plain = data.cast_column("label", datasets.Value("int64")).map(lambda row: {"label": row["label"] * 2})
    assert prepare_splits(plain, plain)[2] == ["0", "1", "2", "3", "4"]  # no names: 0..largest label
    floats = data.cast_column("label", datasets.Value("float32"))
    with pytest.raises(ValueError, match="not one integer class per image"):
        prepare_splits(floats, floats)


def test_progress_bar_and_cached_note(workspace, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    args = ["linear", "--model", str(workspace / "vit"), "--dataset", str(workspace / "colours")]
    threads = torch.get_num_threads()
    try:
        args += ["--resize", "36", "--crop", "32", "--epochs", "2", "--no-augmentation", "--threads", "1"]
        assert main(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    shown = terminal.getvalue()
    assert "training features (computed once)" in shown and "epoch 2/2: loss" in shown
    assert "each image's features were computed once and reused" in shown
    assert f"| {workspace / 'vit'} | CLS of the last 3 blocks |" in capsys.readouterr().out
