"""Weighted k-NN classification on frozen image representations (DINO's `eval_knn.py` protocol).

Image representation: the backbone's CLS token after the final norm (or the mean patch token for backbones
without CLS), L2-normalised. Each test image votes with its k most cosine-similar training images, each
vote weighted by exp(similarity / temperature) (k = 20, temperature = 0.07). Images are resized so that the
short side is `resize` (256) and centre-cropped to `crop` (224), bicubic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selfpatch_hf.evaluation.configs import KnnConfig
from selfpatch_hf.evaluation.features import FrozenBackbone, image_to_tensor, progress_bar
from selfpatch_hf.evaluation.labelled_images import find_label_column


@dataclass
class KnnResult:
    top1: float  # percent
    top5: float  # percent
    num_train: int
    num_eval: int

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "num_train": self.num_train, "num_eval": self.num_eval}


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> tuple[float, float]:
    """Top-1 / top-5 accuracy (percent) of temperature-weighted k-NN voting on L2-normalised features."""
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.long()
    test_labels = test_labels.long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_features))
    top1 = top5 = 0
    for start in range(0, len(test_features), chunk_size):
        features = test_features[start : start + chunk_size]
        targets = test_labels[start : start + chunk_size]
        similarity, indices = (features @ train_features.T).topk(k, dim=1)  # (b, k)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(features), num_classes).scatter_add_(1, train_labels[indices], weights)
        ranked = votes.argsort(dim=1, descending=True)
        correct = ranked == targets[:, None]
        top1 += int(correct[:, :1].sum())
        top5 += int(correct[:, : min(5, k, num_classes)].sum())
    total = len(test_features)
    return 100.0 * top1 / total, 100.0 * top5 / total


def _center_crop_tensor(image: Image.Image, resize: int, crop: int) -> torch.Tensor:
    image = image.convert("RGB")
    width, height = image.size
    scale = resize / min(width, height)
    new_w, new_h = max(crop, round(width * scale)), max(crop, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    return image_to_tensor(image.crop((left, top, left + crop, top + crop)))


@torch.no_grad()
def extract_image_embeddings(
    backbone: FrozenBackbone,
    dataset,
    image_column: str,
    config: KnnConfig,
    show_progress: bool = False,
    description: str = "image representations",
) -> torch.Tensor:
    """(n, C) image representations of a `datasets` dataset (`show_progress`: a progress bar on a terminal)."""
    if config.crop % backbone.patch_size:
        raise ValueError(f"crop {config.crop} must be a multiple of the patch size {backbone.patch_size}.")
    embeddings = []
    bar = progress_bar(len(dataset), description, show_progress)
    for start in range(0, len(dataset), config.batch_size):
        batch = dataset[start : start + config.batch_size][image_column]
        images = [img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img)) for img in batch]
        pixels = torch.stack([_center_crop_tensor(img, config.resize, config.crop) for img in images])
        embeddings.append(backbone.image_embedding(pixels, config.pooling).float().cpu())
        bar.update(len(images))
    bar.close()
    return torch.cat(embeddings)


def run_knn(
    backbone: FrozenBackbone,
    train_dataset,
    eval_dataset,
    config: KnnConfig | None = None,
    *,
    image_column: str = "image",
    label_column: str | None = None,
    show_progress: bool = False,
) -> KnnResult:
    """k-NN accuracy of `backbone`'s image representation on `datasets` splits with an integer label column
    (`show_progress`: progress bars for the feature passes on a terminal)."""
    config = config or KnnConfig()
    label_column = find_label_column(train_dataset, eval_dataset, image_column, label_column)
    if config.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(config.max_train_samples, len(train_dataset))))
    if config.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(config.max_eval_samples, len(eval_dataset))))
    train_features = extract_image_embeddings(
        backbone, train_dataset, image_column, config, show_progress, "representations of the training images"
    )
    eval_features = extract_image_embeddings(
        backbone,
        eval_dataset,
        image_column,
        config,
        show_progress,
        "representations of the evaluation images",
    )
    train_labels = torch.tensor(train_dataset[label_column])
    eval_labels = torch.tensor(eval_dataset[label_column])
    top1, top5 = knn_classify(
        train_features, train_labels, eval_features, eval_labels, config.k, config.temperature
    )
    return KnnResult(top1, top5, len(train_dataset), len(eval_dataset))
