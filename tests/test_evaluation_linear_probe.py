"""Linear-probe semantic segmentation and k-NN classification on frozen features."""

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from selfpatch_hf.evaluation.features import FrozenBackbone
from selfpatch_hf.evaluation.knn import KnnConfig, knn_classify, run_knn
from selfpatch_hf.evaluation.linear_probe import LinearProbeConfig, resolve_columns, run_linear_probe

COLOURS = np.array([(220, 40, 40), (40, 200, 60), (40, 60, 220)], dtype=np.float64)


class ColourFeatures:
    patch_size = 4

    def __call__(self, pixels):
        mean = F.avg_pool2d(pixels, 4)
        std = (F.avg_pool2d(pixels**2, 4) - mean**2).clamp_min(0).sqrt()
        return torch.cat([mean - 0.5, std], dim=1).permute(0, 2, 3, 1)


class RandomFeatures:
    patch_size = 4

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, pixels):
        b, _, h, w = pixels.shape
        return torch.randn(b, h // 4, w // 4, 8, generator=self.generator)


def colour_split_dataset(count, size, seed, label_offset=0):
    """Two coloured regions split at a random row or column; the split line is labelled 255 (ignore)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(count):
        first, second = rng.choice(3, size=2, replace=False)
        cut = int(rng.integers(size // 4, 3 * size // 4))
        mask = np.full((size, size), second + label_offset, np.uint8)
        mask[:, :cut] = first + label_offset
        image = COLOURS[mask - label_offset]
        mask[:, cut - 1 : cut + 1] = 255
        if rng.integers(2):
            image, mask = image.transpose(1, 0, 2), mask.T
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        images.append(image)
        masks.append(np.ascontiguousarray(mask))
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "annotation": masks}, features=features)


def test_resolve_columns():
    ds = colour_split_dataset(2, 16, 0)
    assert resolve_columns(ds) == ("image", "annotation")
    with pytest.raises(ValueError, match="mask column"):
        resolve_columns(ds.remove_columns("annotation"))


def test_probe_learns_colour_features_and_not_random_ones():
    train = colour_split_dataset(24, 32, seed=0)
    evaluation = colour_split_dataset(12, 48, seed=1)  # other size: scored at the masks' own resolution
    config = LinearProbeConfig(image_size=32, epochs=15, batch_size=8, learning_rate=1e-2)
    good = run_linear_probe(ColourFeatures(), train, evaluation, config)
    assert good.num_labels == 3 and good.num_train == 24 and good.num_eval == 12
    assert good.scores.mean_iou > 0.85 and good.scores.overall_accuracy > 0.9
    bad = run_linear_probe(RandomFeatures(), train, evaluation, config)
    assert bad.scores.mean_iou < 0.6
    assert good.final_train_loss < bad.final_train_loss


def test_probe_reduce_labels_and_label_errors():
    train = colour_split_dataset(12, 32, seed=0, label_offset=1)  # labels 1..3, 0 = "other"
    evaluation = colour_split_dataset(6, 32, seed=1, label_offset=1)
    config = LinearProbeConfig(image_size=32, epochs=10, batch_size=6, learning_rate=1e-2, reduce_labels=True)
    result = run_linear_probe(ColourFeatures(), train, evaluation, config)
    assert result.num_labels == 3 and result.scores.mean_iou > 0.8
    with pytest.raises(ValueError, match="outside"):
        run_linear_probe(ColourFeatures(), train, evaluation, LinearProbeConfig(image_size=32, num_labels=2))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        run_linear_probe(ColourFeatures(), train, evaluation, LinearProbeConfig(image_size=30))


def _tiny_vit(path):
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor().save_pretrained(path)
    return FrozenBackbone.from_pretrained(str(path))


def test_probe_runs_on_a_vit_backbone(tmp_path):
    backbone = _tiny_vit(tmp_path)
    train = colour_split_dataset(8, 32, seed=0)
    result = run_linear_probe(
        backbone, train, train, LinearProbeConfig(image_size=32, epochs=2, max_eval_samples=4)
    )
    assert result.num_eval == 4
    assert 0.0 <= result.scores.mean_iou <= 1.0 and np.isfinite(result.final_train_loss)


# ---------------------------------------------------------------- k-NN


def reference_knn(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """DINO's knn_classifier, one test image at a time."""
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    top1 = top5 = 0
    for feature, target in zip(test_features, test_labels, strict=True):
        similarity = train_features @ feature
        distances, indices = similarity.topk(k)
        probs = torch.zeros(num_classes)
        for distance, index in zip(distances, indices, strict=True):
            probs[train_labels[index]] += torch.exp(distance / T)
        ranked = probs.argsort(descending=True)
        top1 += int(ranked[0] == target)
        top5 += int((ranked[: min(5, k)] == target).any())
    return 100 * top1 / len(test_labels), 100 * top5 / len(test_labels)


def test_knn_weighting_hand_worked():
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    test, target = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # sharp temperature: one neighbour at similarity 1 outweighs two at 0.6 (e^(1/0.07) > 2 e^(0.6/0.07))
    assert knn_classify(train, labels, test, target, k=3, temperature=0.07)[0] == 100.0
    # flat temperature: the majority of the three neighbours wins
    assert knn_classify(train, labels, test, target, k=3, temperature=100.0)[0] == 0.0
    assert knn_classify(train, labels, test, target, k=1, temperature=100.0)[0] == 100.0


def test_knn_matches_reference():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=generator)
    train_labels = torch.randint(0, 6, (120,), generator=generator)
    test_labels = torch.randint(0, 6, (50,), generator=generator)
    train = centres[train_labels] + 1.2 * torch.randn(120, 16, generator=generator)
    test = centres[test_labels] + 1.2 * torch.randn(50, 16, generator=generator)
    ours = knn_classify(train, train_labels, test, test_labels, k=10, temperature=0.07, chunk_size=7)
    expected = reference_knn(train, train_labels, test, test_labels, 10, 0.07, 6)
    assert ours == pytest.approx(expected)
    assert 30.0 < ours[0] < 100.0


def test_run_knn_on_a_vit_backbone(tmp_path):
    backbone = _tiny_vit(tmp_path)
    rng = np.random.default_rng(0)
    labels = [i % 3 for i in range(12)]
    images = [np.clip(COLOURS[c] + rng.normal(0, 10, (40, 48, 3)), 0, 255).astype(np.uint8) for c in labels]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["r", "g", "b"])}
    )
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    result = run_knn(backbone, ds, ds, KnnConfig(k=3, resize=36, crop=32))
    # Every query is in the training set with similarity 1: it dominates the vote.
    assert result.top1 == 100.0 and result.top5 == 100.0 and result.num_train == 12
    with pytest.raises(ValueError, match="label column"):
        run_knn(backbone, ds.remove_columns("label"), ds, KnnConfig(resize=36, crop=32))
