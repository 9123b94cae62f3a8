"""training/finetune_segmentation.py on a tiny backbone and a tiny synthetic segmentation set: the loss falls, resuming
is exact, and the saved folder is a plain transformers model that loads without this package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from segmentation_inputs import SCRIPT, load_finetune_script, segmentation_inputs
from segmentation_inputs import finetune_arguments as _arguments

REPO = Path(__file__).resolve().parents[1]
_script = load_finetune_script


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 4-block ViT export (width 32, 8-pixel patches) and 12 + 4 synthetic 64 x 64 scenes."""
    return segmentation_inputs(tmp_path_factory.mktemp("finetune_inputs"))


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("finetune_run") / "run"
    script = _script()
    model_args, data_args, training_args = script.parse_finetuning_arguments(_arguments(inputs, output_dir))
    result = script.train(model_args, data_args, training_args)
    result.accelerator.end_training()
    return result, output_dir


def _losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def test_a_few_steps_lower_the_loss(uninterrupted):
    result, output_dir = uninterrupted
    losses = _losses(output_dir)
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert result.scores is not None and 0 <= result.scores["mean_iou"] <= 1
    card = (output_dir / "model" / "README.md").read_text()
    assert f"{100 * result.scores['mean_iou']:.2f}" in card and "pipeline_tag: image-segmentation" in card


def test_resuming_from_a_checkpoint_is_exact(inputs, uninterrupted, tmp_path):
    _, first = uninterrupted
    second = tmp_path / "resumed"
    (second / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "checkpoint-4", second / "checkpoints" / "checkpoint-4")
    script = _script()
    arguments = script.parse_finetuning_arguments(
        _arguments(inputs, second, "--resume_from_checkpoint", "latest")
    )
    result = script.train(*arguments)
    result.accelerator.end_training()
    assert result.global_step == 8
    # same batches, crops, drop-path masks and optimiser state: the same losses and bit-identical weights
    assert _losses(second) == _losses(first)[4:]
    expected = load_file(first / "checkpoints" / "checkpoint-8" / "model.safetensors")
    resumed = load_file(second / "checkpoints" / "checkpoint-8" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name


LOADER = """
import json, sys
import numpy as np
from PIL import Image
import torch
from transformers import AutoModelForSemanticSegmentation, pipeline

folder, pixels_path = sys.argv[1], sys.argv[2]
model = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
with torch.no_grad():
    logits = model(pixel_values=torch.from_numpy(np.load(pixels_path))).logits
np.save(pixels_path.replace("pixels", "logits"), logits.numpy())
segmenter = pipeline("image-segmentation", model=folder)
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
segments = segmenter(image)
print(json.dumps({
    "model": type(model).__name__,
    "backbone": type(model.backbone).__name__,
    "labels": [segment["label"] for segment in segments],
    "mask_sizes": [list(segment["mask"].size) for segment in segments],
    "imported_selfpatch": any(name.startswith("selfpatch_hf") for name in sys.modules),
}))
"""


def _load_elsewhere(folder: Path, pixels: torch.Tensor, tmp_path: Path) -> dict:
    """LOADER on `folder` in a process without this package: its report, and its logits of `pixels`."""
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), str(tmp_path / "pixels.npy")],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: nothing of ours on the path
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    report["logits"] = np.load(tmp_path / "logits.npy")
    return report


def test_the_default_neck_is_multiscale_and_single_stays_an_option(uninterrupted, inputs, tmp_path):
    """The default model reads strides 2-16 of the 8-pixel-patch backbone (patch / 4 ... 2 x patch) through the
    reference's neck; `--neck single` trains UperNet on the blocks at the patch stride, and its saved folder loads
    as a plain Dinov2Backbone UperNet too."""
    result, _ = uninterrupted
    backbone = result.model.backbone
    assert backbone.config.add_fpn and backbone.config.out_indices == [1, 2, 3, 4]
    pixels = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        maps = backbone(pixel_values=pixels).feature_maps
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]

    output_dir = tmp_path / "single"
    script = _script()
    arguments = script.parse_finetuning_arguments(_arguments(inputs, output_dir, "--neck", "single"))
    single = script.train(*arguments)
    single.accelerator.end_training()
    losses = _losses(output_dir)
    assert len(losses) == 8 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert type(single.model.backbone).__name__ == "Dinov2Backbone"
    card = (output_dir / "model" / "README.md").read_text()
    assert "at a single stride" in card and "made from four blocks by the reference" not in card
    report = _load_elsewhere(output_dir / "model", pixels, tmp_path)
    assert report["backbone"] == "Dinov2Backbone" and report["imported_selfpatch"] is False
    with torch.no_grad():
        expected = single.model.eval()(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(report["logits"], expected, rtol=0, atol=1e-5)


def test_saved_model_loads_with_plain_transformers(uninterrupted, tmp_path):
    result, output_dir = uninterrupted
    assert "made from four blocks by the reference" in (output_dir / "model" / "README.md").read_text()
    umask = os.umask(0o022)
    os.umask(umask)
    assert (output_dir / "model").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    for file in (output_dir / "model").iterdir():  # not save_pretrained's 0600
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name
    pixels = torch.randn(2, 3, 32, 48)
    report = _load_elsewhere(output_dir / "model", pixels, tmp_path)
    assert report["model"] == "UperNetForSemanticSegmentation"
    # the default neck: strides 4-32 from BeitBackbone(add_fpn=True)
    assert report["backbone"] == "BeitBackbone"
    assert report["imported_selfpatch"] is False
    assert report["labels"] and all(size == [70, 50] for size in report["mask_sizes"])
    names = set(result.model.config.id2label.values())
    assert set(report["labels"]) <= names
    with torch.no_grad():
        expected = result.model.eval()(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(report["logits"], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_the_saved_image_processor_takes_any_image_mode_as_rgb(uninterrupted, mode):
    from PIL import Image
    from transformers import AutoImageProcessor

    _, output_dir = uninterrupted
    processor = AutoImageProcessor.from_pretrained(output_dir / "model")
    colours = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    image = Image.fromarray(colours).convert(mode)
    pixels = processor(images=image, return_tensors="np")["pixel_values"]
    expected = processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"]
    assert pixels.shape == expected.shape and pixels.shape[1] == 3
    np.testing.assert_array_equal(pixels, expected)


PIPELINE_SCORE = """
import json, sys
import datasets
import numpy as np
from transformers import pipeline

folder, data, ignore_index = sys.argv[1], sys.argv[2], 255
segmenter = pipeline("image-segmentation", model=folder)
label2id = segmenter.model.config.label2id
num_labels = len(label2id)
confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
for row in datasets.load_dataset(data, split="validation"):
    truth = np.asarray(row["mask"], dtype=np.int64)
    predicted = np.full(truth.shape, -1, dtype=np.int64)
    for segment in segmenter(row["image"].convert("RGB")):
        predicted[np.asarray(segment["mask"]) > 0] = label2id[segment["label"]]
    assert (predicted >= 0).all()  # the segments cover the image once
    valid = truth != ignore_index
    np.add.at(confusion, (truth[valid], predicted[valid]), 1)
intersection = np.diag(confusion).astype(float)
union = confusion.sum(0) + confusion.sum(1) - intersection
present = union > 0  # mmsegmentation's mIoU: the classes in the ground truth or the prediction
print(json.dumps({
    "mean_iou": float(np.mean(intersection[present] / union[present])),
    "overall_accuracy": float(intersection.sum() / confusion.sum()),
    "processor_size": dict(segmenter.image_processor.size),
    "imported_selfpatch": any(name.startswith("selfpatch_hf") for name in sys.modules),
}))
"""


def test_the_pipeline_scores_the_saved_model_as_its_card_says(uninterrupted, inputs, tmp_path):
    """`pipeline("image-segmentation")` on the saved folder alone (transformers, no code of ours) over the
    evaluation split: its mIoU and pixel accuracy are the card's, because the saved image processor is the
    evaluation's (the aspect ratio kept into --scale, here short side 48 / long side 64) and the whole-image
    evaluation feeds the model what the pipeline feeds it."""
    result, output_dir = uninterrupted
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, "-c", PIPELINE_SCORE, str(output_dir / "model"), str(inputs["data"])],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["imported_selfpatch"] is False
    assert report["processor_size"] == {"shortest_edge": 48, "longest_edge": 64}
    assert report["mean_iou"] == pytest.approx(result.scores["mean_iou"], abs=1e-12)
    assert report["overall_accuracy"] == pytest.approx(result.scores["overall_accuracy"], abs=1e-12)
    card = (output_dir / "model" / "README.md").read_text()
    assert f"{100 * report['mean_iou']:.2f}" in card


def test_argument_mistakes_are_one_line_errors(inputs, tmp_path, capsys):
    from selfpatch_hf.cli.errors import run_command

    script = _script()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("backbone: x\nlearning_rat: 1.0\n")
    assert run_command("finetune_segmentation.py", script.main, [str(recipe)]) == 2
    assert "unknown option(s) ['learning_rat']" in capsys.readouterr().err
    assert run_command("finetune_segmentation.py", script.main, ["--dataset_name", "x"]) == 2
    assert "--backbone is required" in capsys.readouterr().err

    def refused(message: str, *extra: str, backbone: Path | None = None) -> None:
        arguments = _arguments(inputs, tmp_path / "out", *extra)
        if backbone is not None:
            arguments[arguments.index("--backbone") + 1] = str(backbone)
        assert run_command("finetune_segmentation.py", script.main, arguments) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        assert message in err.strip().splitlines()[-1], err
        assert not (tmp_path / "out").exists()

    refused(f"--backbone {tmp_path / 'nowhere'}: no such folder", backbone=tmp_path / "nowhere")
    damaged = tmp_path / "damaged"
    shutil.copytree(inputs["backbone"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    refused("its weights cannot be read (SafetensorError", backbone=damaged)
    weights.unlink()
    torch.save({"unrelated": torch.zeros(2)}, damaged / "pytorch_model.bin")
    refused("its weights lack 70 of the ViTModel's tensors", backbone=damaged)
    (damaged / "pytorch_model.bin").unlink()
    weights = {
        name: tensor.clone() for name, tensor in load_file(inputs["backbone"] / "model.safetensors").items()
    }
    weights["embeddings.position_embeddings"].view(-1)[0] = float("nan")
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    refused(
        "its weights hold NaN or infinite values in 1 tensor(s) (embeddings.position_embeddings)",
        backbone=damaged,
    )
    (damaged / "model.safetensors").unlink()
    torch.save({"payload": print}, damaged / "pytorch_model.bin")  # a pickle that would call a function
    refused(
        "its weights cannot be read (UnpicklingError: WeightsUnpickler error: Unsupported global",
        backbone=damaged,
    )
    labels = tmp_path / "labels.json"
    labels.write_text('{"sky": 0, "sea": 1}')
    index = _arguments(inputs, tmp_path).index("--label_names") + 1
    arguments = _arguments(inputs, tmp_path / "out")
    arguments[index] = str(labels)
    assert run_command("finetune_segmentation.py", script.main, arguments) == 2
    assert f"--label_names {labels} must hold a list" in capsys.readouterr().err
    refused("--mask_column 'masks' is not a column of the dataset", "--mask_column", "masks")
    refused("--image_column 'label' holds ClassLabel", "--image_column", "label")
    refused("has 12 images, fewer than one global batch of 16", "--per_device_train_batch_size", "16")
    refused("--per_device_train_batch_size 1 cannot train UperNet", "--per_device_train_batch_size", "1")
    refused("--learning_rate must be a finite number, got nan.", "--learning_rate", "nan")
    refused("--max_grad_norm must be >= 0, got -1.0.", "--max_grad_norm", "-1")


@pytest.mark.parametrize("recipe", ["segmentation_ade20k_vit_small.yaml", "segmentation_offline.yaml"])
def test_shipped_recipes_parse(recipe, tmp_path):
    script = _script()
    model_args, data_args, training_args = script.parse_finetuning_arguments(
        [str(REPO / "training" / "configs" / recipe), "--output_dir", str(tmp_path)]
    )
    assert model_args.backbone and data_args.dataset_name
    assert training_args.warmup_steps < training_args.max_steps
    if "ade20k" in recipe:  # multi-scale UperNet on blocks 3, 6, 9, 12, the reference's Semantic FPN blocks
        assert model_args.neck == "multiscale" and model_args.out_indices == [3, 6, 9, 12]


@pytest.mark.slow
def test_two_processes_share_the_batches_and_the_evaluation(inputs, tmp_path):
    """2 CPU processes (DDP over gloo): a global batch of 2 x 4, every rank's checkpoint state, and a sharded
    evaluation whose summed confusion matrix gives the scores of evaluating the saved model in one process."""
    import socket

    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    from selfpatch_hf.data.segmentation.augmentation import prepare_mask
    from selfpatch_hf.data.segmentation.loading import find_columns, load_segmentation_splits
    from selfpatch_hf.evaluation.segmentation_inference import evaluate_segmentation

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    output_dir = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port)]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    arguments = _arguments(inputs, output_dir, "--max_steps", "3", "--checkpointing_steps", "3")
    completed = subprocess.run(
        [*launcher, str(SCRIPT), *arguments], env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-6000:]

    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_batch_size"] for r in records if r.get("event") == "start"] == [8]
    checkpoint = output_dir / "checkpoints" / "checkpoint-3"
    assert json.loads((checkpoint / "COMPLETE").read_text())["num_processes"] == 2
    assert (checkpoint / "random_states_1.pkl").is_file() and (checkpoint / "rank_state_1.json").is_file()
    reported = [r for r in records if r.get("event") == "end"][-1]["scores"]

    model = AutoModelForSemanticSegmentation.from_pretrained(output_dir / "model")
    _, evaluation = load_segmentation_splits(str(inputs["data"]), "train", "validation")
    image_column, mask_column = find_columns(evaluation, None, None)
    processor = AutoImageProcessor.from_pretrained(output_dir / "model")  # what the evaluation resized with
    examples = (
        (
            processor(images=row[image_column], return_tensors="np")["pixel_values"][0],
            prepare_mask(row[mask_column]),
        )
        for row in evaluation
    )
    scores = evaluate_segmentation(model, examples, 12, patch_size=1).compute()  # whole images, unpadded
    assert scores.mean_iou == pytest.approx(reported["mean_iou"], abs=1e-6)
    assert scores.overall_accuracy == pytest.approx(reported["overall_accuracy"], abs=1e-6)


def test_push_to_hub_uploads_the_model_folder(inputs, tmp_path, hub_server):
    output_dir = tmp_path / "pushed"
    arguments = _arguments(inputs, output_dir, "--max_steps", "2", "--checkpointing_steps", "0")
    arguments += ["--push_to_hub", "--hub_model_id", "loopback-user/tiny-upernet"]
    env = {**os.environ, **hub_server.client_env(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    files = hub_server.files("loopback-user/tiny-upernet")
    local = output_dir / "model"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert files[name] == (local / name).read_bytes(), name
    assert b"pipeline_tag: image-segmentation" in files["README.md"]


def _altered_scenes(source: Path, target: Path, split: str, alter) -> Path:
    """A copy of the scenes whose `split` has `alter(index, image_bytes, mask) -> (image_bytes, mask_bytes)`."""
    import io

    import datasets
    from PIL import Image

    from selfpatch_hf.data.samples.synthetic_scenes import segmentation_features

    (target / "data").mkdir(parents=True)
    for name in ("train", "validation"):
        parquet = f"{name}-00000-of-00001.parquet"
        if name != split:
            shutil.copy(source / "data" / parquet, target / "data" / parquet)
            continue
        rows = datasets.Dataset.from_parquet(str(source / "data" / parquet))
        rows = rows.cast_column("image", datasets.Image(decode=False))
        rows = rows.cast_column("mask", datasets.Image(decode=False))
        images, masks = [], []
        for index, row in enumerate(rows):
            mask = np.asarray(Image.open(io.BytesIO(row["mask"]["bytes"])))
            image, mask = alter(index, row["image"]["bytes"], mask)
            if isinstance(mask, np.ndarray):
                buffer = io.BytesIO()
                Image.fromarray(mask).save(buffer, format="TIFF" if mask.dtype == np.float32 else "PNG")
                mask = buffer.getvalue()
            images.append({"bytes": image, "path": None})
            masks.append({"bytes": mask, "path": None})
        altered = datasets.Dataset.from_dict(
            {"image": images, "mask": masks, "label": rows["label"]}, features=segmentation_features()
        )
        altered.to_parquet(str(target / "data" / parquet))
    return target


def _beyond_the_classes(mask: np.ndarray) -> np.ndarray:
    return np.where(mask == 255, mask, mask + 20).astype(np.uint8)


def test_masks_that_cannot_be_trained_on_are_one_line_and_undecodable_examples_are_skipped(
    inputs, tmp_path, capsys, caplog
):
    from selfpatch_hf.cli.errors import run_command

    script = _script()

    def run(data: Path, name: str) -> tuple[int, str]:
        arguments = _arguments({**inputs, "data": data}, tmp_path / f"{name}-run", "--max_steps", "3")
        code = run_command("finetune_segmentation.py", script.main, arguments)
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return code, err.strip().splitlines()[-1]

    def late_label(index, image, mask):
        return image, _beyond_the_classes(mask) if index == 5 else mask

    code, error = run(_altered_scenes(inputs["data"], tmp_path / "late", "train", late_label), "late")
    assert code == 1 and error.startswith("finetune_segmentation.py: error: training data: "), error
    assert "training example 5: its mask holds label" in error
    assert "but there are 12 classes (0..11, 255 = ignore): pass the dataset's class names" in error

    def eval_label(index, image, mask):
        return image, _beyond_the_classes(mask) if index == 2 else mask

    code, error = run(_altered_scenes(inputs["data"], tmp_path / "eval", "validation", eval_label), "eval")
    assert code == 2 and "(validation split): evaluation example 2: its mask holds label" in error, error
    assert not (tmp_path / "eval-run").exists()

    def fractional(index, image, mask):
        return image, mask.astype(np.float32) + 0.5

    code, error = run(_altered_scenes(inputs["data"], tmp_path / "float", "train", fractional), "float")
    assert code == 2 and "training example 0: its mask holds values that are no class ids" in error, error

    def unlabelled(index, image, mask):
        return image, np.full_like(mask, 255)

    code, error = run(
        _altered_scenes(inputs["data"], tmp_path / "unlabelled", "train", unlabelled), "unlabelled"
    )
    assert code == 1 and "a batch of 4 training crops holds no labelled pixel" in error, error

    def corrupt(index, image, mask):
        return (image[:40] if index == 2 else image), (b"\x89PNG broken" if index == 7 else mask)

    # a truncated image and a corrupt mask: replaced by the next readable example, warned with the row and the
    # reason, counted in metrics.jsonl; the run trains to the end and saves its model
    with caplog.at_level("WARNING"):
        code, error = run(_altered_scenes(inputs["data"], tmp_path / "corrupt", "train", corrupt), "corrupt")
    assert code == 0, error
    warnings = [
        record.getMessage() for record in caplog.records if "skipped unreadable" in record.getMessage()
    ]
    assert sorted(message.split(":")[1].strip() for message in warnings) == [
        "skipped unreadable training example 2",
        "skipped unreadable training example 7",
    ], warnings
    records = [
        json.loads(line) for line in (tmp_path / "corrupt-run" / "metrics.jsonl").read_text().splitlines()
    ]
    # 12 rows, 3 steps of 4: one epoch, each unreadable row drawn once
    assert sum(record.get("skipped_examples", 0) for record in records) == 2
    assert (tmp_path / "corrupt-run" / "model" / "config.json").is_file()
