"""Detection and instance-segmentation heads on the multi-scale backbones: Deformable DETR and Mask2Former built around
a pretrained backbone, trained a few steps on the offline instances, saved, loaded through the Auto classes and the
pipelines in a process that never imports selfpatch_hf, and scored by `evaluate_coco` as the pipelines score."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from tiny_models import tiny_config
from transformers import (
    AutoModelForObjectDetection,
    AutoModelForUniversalSegmentation,
    BeitBackbone,
    SiglipVisionConfig,
    SiglipVisionModel,
    SwinBackbone,
    SwinConfig,
    SwinModel,
)

from selfpatch_hf import SelfPatchForPretraining, export_backbone
from selfpatch_hf.data.detection.augmentation import DetectionAugmentation, DetectionTrainTransform
from selfpatch_hf.data.detection.batching import collate_detection
from selfpatch_hf.data.detection.instances import mask_box
from selfpatch_hf.data.detection.sources import HubDetectionSource, load_detection_source
from selfpatch_hf.data.samples.instance_scenes import make_instance_dataset
from selfpatch_hf.evaluation.detection import CocoEvalConfig, evaluate_coco
from selfpatch_hf.evaluation.detection_metrics import coco_scores
from selfpatch_hf.models.dense.backbones import dense_backbone
from selfpatch_hf.models.dense.detection import (
    build_deformable_detr,
    build_detection_image_processor,
    build_instance_segmentation_image_processor,
    build_mask2former,
)
from selfpatch_hf.models.dense.siglip_backbone import SelfPatchSiglipBackbone

DETR_HEADS = dict(
    d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
    encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12,
)  # fmt: skip
MASK2FORMER_HEADS = dict(
    num_queries=8, hidden_dim=32, feature_size=32, encoder_layers=1, decoder_layers=2, dim_feedforward=64,
    encoder_feedforward_dim=64, num_attention_heads=2, train_num_points=256,
)  # fmt: skip
BUILDERS = {
    "detr": (build_deformable_detr, DETR_HEADS, build_detection_image_processor, "detr"),
    "mask2former": (
        build_mask2former,
        MASK2FORMER_HEADS,
        build_instance_segmentation_image_processor,
        "mask2former",
    ),
}
# (height, width) of the evaluation scale: multiples of 32, so that no padding enters the comparison
EVAL_SIZE = (96, 128)


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instances")
    make_instance_dataset(folder, num_train=8, num_eval=2, image_size=EVAL_SIZE, max_objects=3, seed=1)
    return load_detection_source(folder, "train")


@pytest.fixture(scope="module")
def vit_backbone(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=4, patch_size=16, image_size=64)
    return export_backbone(SelfPatchForPretraining(config), tmp_path_factory.mktemp("vit") / "backbone")


@pytest.fixture(scope="module")
def swin_backbone(tmp_path_factory):
    torch.manual_seed(0)
    config = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], patch_size=4, window_size=2, image_size=64
    )
    folder = tmp_path_factory.mktemp("swin") / "backbone"
    SwinModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def _batch(source, transform, label_format, size=4):
    samples = [transform(source[i], np.random.default_rng([0, i])) for i in range(size)]
    return collate_detection(samples, label_format)


def _train(model, batch, steps, lr=1e-3):
    """A plain loop on one fixed batch: the losses it sees."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_the_heads_carry_the_pretrained_backbone(vit_backbone, instances):
    reference = dense_backbone(vit_backbone, multi_scale=True).state_dict()
    for kind, (build, heads, _, _) in BUILDERS.items():
        model = build(vit_backbone, instances.label_names, **heads)
        inner = next(m for m in model.modules() if isinstance(m, BeitBackbone))
        for name, tensor in reference.items():
            if name.startswith("beit."):
                torch.testing.assert_close(inner.state_dict()[name], tensor, rtol=0, atol=0, msg=kind)
        assert model.config.id2label == dict(enumerate(instances.label_names))
    detr = build_deformable_detr(vit_backbone, ["a"], **DETR_HEADS)
    assert detr.config.num_feature_levels == 4 and detr.config.auxiliary_loss
    mask2former = build_mask2former(vit_backbone, ["a", "b"], **MASK2FORMER_HEADS)
    assert (
        list(mask2former.config.feature_strides) == [4, 8, 16, 32] and mask2former.config.common_stride == 4
    )
    with pytest.raises(ValueError, match="decoder_layers must be >= 2"):
        build_deformable_detr(vit_backbone, ["a"], **{**DETR_HEADS, "decoder_layers": 1})
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_mask2former(vit_backbone, ["a"], drop_path_rate=float("nan"), **MASK2FORMER_HEADS)


@pytest.fixture(scope="module")
def fitted(vit_backbone, instances):
    """Each head on the ViT source, fitted with a plain loop to one fixed batch of four offline images:
    (model, losses) by kind."""
    transform = DetectionTrainTransform(DetectionAugmentation(scales=(96,), max_size=128, crop_scales=None))
    models = {}
    for kind, (build, heads, _, label_format) in BUILDERS.items():
        torch.manual_seed(0)
        model = build(vit_backbone, instances.label_names, **heads)
        models[kind] = (model, _train(model, _batch(instances, transform, label_format), steps=25, lr=2e-3))
    return models


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_few_steps_on_the_offline_instances_lower_the_loss(kind, fitted):
    _, losses = fitted[kind]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def _save(model, processor, folder):
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


_PIPELINES = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils
    from transformers import pipeline

    jobs = json.loads(sys.argv[1])
    results = {}
    for name, job in jobs.items():
        task = "object-detection" if job["kind"] == "detr" else "image-segmentation"
        run = pipeline(task, model=job["folder"])
        kwargs = {"threshold": job["threshold"]} if task == "object-detection" else dict(
            subtask="instance", threshold=job["threshold"], mask_threshold=0.5, overlap_mask_area_threshold=0.8)
        per_image = []
        for path in job["images"]:
            outputs = run(Image.open(path), **kwargs)
            entry = {"labels": [o["label"] for o in outputs], "scores": [o["score"] for o in outputs]}
            if task == "object-detection":
                entry["boxes"] = [[o["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for o in outputs]
            else:
                rles = [mask_utils.encode(np.asfortranarray((np.asarray(o["mask"]) > 0).astype(np.uint8)))
                        for o in outputs]
                entry["masks"] = [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]
            per_image.append(entry)
        results[name] = {"predictions": per_image, "id2label": {int(k): v for k, v in run.model.config.id2label.items()}}
    results["imported selfpatch_hf"] = "selfpatch_hf" in sys.modules
    print(json.dumps(results))
    """
)


def _run_pipelines_elsewhere(jobs: dict) -> dict:
    """The pipelines in a fresh interpreter that cannot import selfpatch_hf (it is not on its path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    process = subprocess.run(
        [sys.executable, "-I", "-c", _PIPELINES, json.dumps(jobs)], capture_output=True, text=True, env=env,
        timeout=600, cwd="/",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads(process.stdout.strip().splitlines()[-1])
    assert results.pop("imported selfpatch_hf") is False
    return results


def _pipeline_predictions(entries, label_names):
    index = {name: i for i, name in enumerate(label_names)}
    predictions = []
    for image_id, entry in enumerate(entries):
        prediction = {
            "image_id": image_id,
            "labels": np.asarray([index[name] for name in entry["labels"]], np.int64),
            "scores": np.asarray(entry["scores"], np.float64),
        }
        if "boxes" in entry:
            prediction["boxes"] = np.asarray(entry["boxes"], np.float64).reshape(-1, 4)
        else:
            masks = [
                mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()}) for m in entry["masks"]
            ]
            prediction["masks"] = masks
            boxes = [mask_box(m) for m in masks]
            prediction["boxes"] = np.asarray(
                [b if b is not None else np.zeros(4) for b in boxes], np.float64
            ).reshape(-1, 4)
        predictions.append(prediction)
    return predictions


def _references(source):
    references = []
    for image_id in range(len(source)):
        example = source[image_id]
        references.append(
            {
                "image_id": image_id, "height": example.image.height, "width": example.image.width,
                "boxes": example.instances.boxes, "labels": example.instances.labels,
                "iscrowd": example.instances.iscrowd, "areas": example.instances.areas,
                "masks": list(example.instances.masks),
            }
        )  # fmt: skip
    return references


def test_saved_models_load_without_selfpatch_and_pipelines_score_as_evaluate_coco(
    tmp_path, fitted, swin_backbone, instances
):
    folders, jobs = {}, {}
    image_paths = []
    for index in range(4):  # the images the models were fitted to: their AP is well above zero
        path = tmp_path / f"image-{index}.png"
        instances[index].image.save(path)
        image_paths.append(str(path))
    for source_name in ("vit", "swin"):
        for kind, (build, heads, processor, _) in BUILDERS.items():
            if source_name == "vit":
                model = fitted[kind][0]
            else:
                torch.manual_seed(0)
                model = build(swin_backbone, instances.label_names, **heads)
            expected_backbone = BeitBackbone if source_name == "vit" else SwinBackbone
            assert any(isinstance(m, expected_backbone) for m in model.modules())
            name = f"{source_name}-{kind}"
            folders[name] = _save(model.eval(), processor(*EVAL_SIZE), tmp_path / name)
            jobs[name] = {"kind": kind, "folder": str(folders[name]), "images": image_paths, "threshold": 0.1}
    results = _run_pipelines_elsewhere(jobs)

    # the Auto classes load every folder completely (nothing missing or newly initialised)
    for name, folder in folders.items():
        auto = AutoModelForObjectDetection if name.endswith("detr") else AutoModelForUniversalSegmentation
        _, info = auto.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values()), (name, info)

    subset = HubDetectionSource(instances.dataset.select(range(4)))  # the four images the pipelines saw
    references = _references(subset)
    for name in ("vit-detr", "vit-mask2former"):
        # one image per forward pass, as the pipeline runs it (batched runs agree to float rounding only)
        config = CocoEvalConfig(
            threshold=0.1, overlapping_masks=False, overlap_mask_area_threshold=0.8, batch_size=1
        )
        ours = evaluate_coco(folders[name], subset, config, keep_predictions=True)
        piped = _pipeline_predictions(results[name]["predictions"], subset.label_names)
        iou_types = ["bbox"] if name.endswith("detr") else ["bbox", "segm"]
        from_pipeline = coco_scores(piped, references, len(subset.label_names), iou_types, subset.label_names)
        if name.endswith("detr"):
            assert ours.scores["bbox"]["AP50"] > 0.05, (
                ours.scores
            )  # a fitted model, not an all-zero comparison
            for mine, theirs in zip(ours.predictions, piped):
                np.testing.assert_array_equal(mine["labels"], theirs["labels"])
                np.testing.assert_allclose(mine["scores"], theirs["scores"], rtol=1e-5)
                # the pipeline rounds boxes down to whole pixels (int()); otherwise the same boxes
                np.testing.assert_array_equal(np.trunc(mine["boxes"]), theirs["boxes"])
            truncated = [{**p, "boxes": np.trunc(p["boxes"])} for p in ours.predictions]
            assert (
                coco_scores(truncated, references, len(subset.label_names), label_names=subset.label_names)[
                    "bbox"
                ]
                == from_pipeline["bbox"]
            )
            # and `pipeline_boxes` is that rounding
            whole = evaluate_coco(folders[name], subset, dataclasses.replace(config, pipeline_boxes=True))
            assert whole.scores["bbox"] == from_pipeline["bbox"]
            assert ours.scores["bbox"]["AP"] == pytest.approx(from_pipeline["bbox"]["AP"], abs=0.05)
        else:
            assert ours.scores["segm"]["AP50"] > 0.05, ours.scores
            assert ours.scores == from_pipeline  # masks and scores exactly the pipeline's


def test_a_siglip_source_needs_the_package_to_load(tmp_path, instances):
    torch.manual_seed(0)
    tower = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=4,
                           patch_size=16, image_size=64, vision_use_head=False)
    )  # fmt: skip
    model = build_mask2former(tower, instances.label_names, **MASK2FORMER_HEADS).eval()
    folder = _save(model, build_instance_segmentation_image_processor(*EVAL_SIZE), tmp_path / "m2f")
    loaded = AutoModelForUniversalSegmentation.from_pretrained(folder).eval()  # registered by our import
    assert any(isinstance(m, SelfPatchSiglipBackbone) and m.config.add_fpn for m in loaded.modules())
    pixels = torch.randn(1, 3, *EVAL_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixels).masks_queries_logits, model(pixel_values=pixels).masks_queries_logits
        )
    detr = build_deformable_detr(tower, instances.label_names, **DETR_HEADS)
    assert sum(p.numel() for p in detr.parameters() if p.requires_grad) > 0
