"""Linear classification on frozen image features: DINO's linear evaluation protocol (`eval_linear.py`).

The feature of an image: the CLS tokens of the last `n` blocks, each after the backbone's final norm, concatenated
oldest block first (n = 4 for ViT-S); for ViT-B, n = 1 and the average-pooled last-block patch tokens beside the CLS
token, interleaved channel by channel as DINO's `torch.cat((cls[..., None], avg[..., None]), -1).reshape(b, -1)`
does. CLS-free backbones (Swin) use the average pool of the last stage, which is what `SwinForImageClassification`
classifies. A linear layer (weights N(0, 0.01), zero bias; no batch norm) is trained with SGD, momentum 0.9, the
learning rate `lr x batch / 256`, a cosine schedule over the epochs (stepped once per epoch) and cross-entropy.
Training views: random resized crop (area 0.08-1, bilinear) + horizontal flip; evaluation views: shorter side 256
(bicubic), centre crop 224, made by the image processor that `save_classifier` saves (before its normalisation),
so that the saved folder scores what the exportable head scored here. Scores: top-1 and top-5 on the evaluation
split, in percent. `lr_sweep` trains one head per learning rate side by side (all from the same initial weights,
so each is the run of its rate alone) and reports the best on the evaluation split.

Without training augmentation (`augmentation=False`) every training image has one view (the evaluation view), so
its feature is computed once and kept ("cached") for all epochs.

Where the protocol's feature is not what a transformers classification class computes (several blocks, or the
average pool beside the CLS token of a ViT), a second linear layer is trained beside it, on the same batches, on
the last block's CLS token after the final norm: the "exportable" head, which `save_classifier` writes as a
`ViTForImageClassification`. Both are reported, named apart.

Each epoch's order and augmentation come from `numpy.random.default_rng((seed, epoch))`, so a run resumed from
the state written after an epoch (`checkpoint=`) computes what an uninterrupted run does. Several processes
(`accelerate launch` / `torchrun`) share every batch's backbone passes; the linear steps, identical on every
process, are not distributed (they cost nothing beside the backbone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selfpatch_hf.data.augmentation import DEFAULT_RATIO, sample_crop_box
from selfpatch_hf.evaluation.configs import LinearClassificationConfig
from selfpatch_hf.evaluation.features import FrozenBackbone, image_to_tensor, progress_bar
from selfpatch_hf.evaluation.labelled_images import LabelledSplit, prepare_splits
from selfpatch_hf.image_conventions import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

PROTOCOL, EXPORTABLE = "protocol", "exportable"  # the heads' names
EXPORTABLE_FEATURE = "CLS of the last block"
EXPORTABLE_MODEL_TYPES = {"vit": "ViTForImageClassification", "swin": "SwinForImageClassification"}
WIDE_MODEL = 768  # DINO's setting switches at ViT-B: 1 block + average pool from this width, else 4 blocks
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class FeatureSpec:
    """Which tokens make the protocol's feature of a backbone."""

    n_last_blocks: int
    avgpool: bool
    has_cls: bool
    hidden_size: int

    @property
    def dim(self) -> int:
        if not self.has_cls:
            return self.hidden_size
        return self.hidden_size * (self.n_last_blocks + int(self.avgpool))

    @property
    def needs_exportable_head(self) -> bool:
        """Whether the feature differs from what ViT/SwinForImageClassification classify."""
        return self.has_cls and (self.n_last_blocks > 1 or self.avgpool)

    def describe(self) -> str:
        if not self.has_cls:
            return "average-pooled last-stage tokens"
        blocks = "last block" if self.n_last_blocks == 1 else f"last {self.n_last_blocks} blocks"
        return f"CLS of the {blocks}" + (" + average-pooled patch tokens" if self.avgpool else "")


def resolve_feature_spec(backbone: FrozenBackbone, config: LinearClassificationConfig) -> FeatureSpec:
    """DINO's choice for this backbone's width unless the config fixes it; refuses combinations DINO cannot form."""
    has_cls = (backbone.expected_prefix_tokens or 0) > 0
    hidden = int(backbone.hidden_size)
    if not has_cls:
        if (config.n_last_blocks or 1) != 1 or config.avgpool == "off":
            raise ValueError(
                f"This {backbone.model.config.model_type!r} backbone has no CLS token: its feature is the average "
                "pool of the last stage; leave --n-last-blocks and --avgpool unset."
            )
        return FeatureSpec(1, True, False, hidden)
    blocks = int(getattr(backbone.model.config, "num_hidden_layers", 1))
    n = config.n_last_blocks or (1 if hidden >= WIDE_MODEL else min(4, blocks))
    avgpool = n == 1 if config.avgpool == "auto" else config.avgpool == "on"
    if avgpool and n > 1:
        raise ValueError(
            f"DINO's protocol adds the average pool to one block's CLS token only, not to {n} blocks: use "
            "--n-last-blocks 1 with --avgpool on, or --avgpool off."
        )
    return FeatureSpec(n, avgpool, True, hidden)


def protocol_features(
    backbone: FrozenBackbone, pixel_values: torch.Tensor, spec: FeatureSpec
) -> dict[str, torch.Tensor]:
    """{"protocol": (B, D)} and, where it differs, {"exportable": (B, C)}: the last block's CLS after the
    final norm."""
    blocks = backbone.last_blocks(pixel_values, spec.n_last_blocks)
    last = blocks[-1]
    average = last.patch_tokens.flatten(1, 2).mean(dim=1)
    if not spec.has_cls:
        return {PROTOCOL: average.float()}
    feature = torch.cat([block.prefix_tokens[:, 0] for block in blocks], dim=-1)
    if spec.avgpool:
        feature = torch.cat((feature.unsqueeze(-1), average.unsqueeze(-1)), dim=-1).reshape(len(feature), -1)
    features = {PROTOCOL: feature.float()}
    if spec.needs_exportable_head:
        features[EXPORTABLE] = last.prefix_tokens[:, 0].float()
    return features


def training_view(image: Image.Image, rng: np.random.Generator, crop: int, min_scale: float) -> torch.Tensor:
    """DINO's training view: torchvision's RandomResizedCrop(crop, scale=(min_scale, 1)) (bilinear) and a
    horizontal flip with probability 0.5, drawn from `rng` -> (3, crop, crop) in [0, 1]."""
    top, left, height, width = sample_crop_box(
        rng, image.width, image.height, (min_scale, 1.0), DEFAULT_RATIO
    )
    view = image.resize((crop, crop), Image.Resampling.BILINEAR, box=(left, top, left + width, top + height))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image_to_tensor(view)


# ------------------------------------------------------------------------------------------ processes and heads
class Processes:
    """Splits each batch's backbone passes over the `accelerate` processes (contiguous slices, gathered in order);
    a single process does everything."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[Any]) -> Sequence[Any]:
        bounds = np.linspace(0, len(items), self.world + 1).round().astype(int)
        return items[bounds[self.rank] : bounds[self.rank + 1]]

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def _batch_features(
    backbone: FrozenBackbone,
    spec: FeatureSpec,
    split: LabelledSplit,
    indices: Sequence[int],
    view: Callable[[int, Image.Image], torch.Tensor],
    processes: Processes,
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The features of the readable images among `indices` (views by `view(position, image)`) and which they are."""
    positions = processes.share(np.arange(len(indices)))
    images = split.images([indices[p] for p in positions])
    kept = [(p, img) for p, img in zip(positions, images, strict=True) if img is not None]
    if kept:
        pixels = torch.stack([view(int(p), img) for p, img in kept])
        features = {key: value.cpu() for key, value in protocol_features(backbone, pixels, spec).items()}
    else:
        features = None
    parts = processes.gather(
        (np.asarray([p for p, _ in kept], dtype=np.int64), features, sorted(split.unreadable))
    )
    gathered: dict[str, list[torch.Tensor]] = {}
    for _, part_features, seen in parts:
        split.unreadable.update(seen)
        for key, value in (part_features or {}).items():
            gathered.setdefault(key, []).append(value)
    positions_kept = np.concatenate([part[0] for part in parts])
    return {key: torch.cat(values) for key, values in gathered.items()}, np.asarray(indices)[positions_kept]


def _eval_view(config: LinearClassificationConfig) -> Callable[[int, Image.Image], torch.Tensor]:
    """The saved classifier's own image processor, before its normalisation (the backbone normalises): the scores
    of the exportable head are then what the saved folder gives."""
    processor = classifier_image_processor(None, config)

    def view(_position: int, image: Image.Image) -> torch.Tensor:
        return processor(images=image, do_normalize=False, return_tensors="pt")["pixel_values"][0]

    return view


def extract_split_features(
    backbone: FrozenBackbone,
    spec: FeatureSpec,
    split: LabelledSplit,
    config: LinearClassificationConfig,
    processes: Processes | None = None,
    show_progress: bool = False,
    description: str = "features",
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The evaluation-view features of every readable image of `split`, and their labels."""
    processes = processes or Processes()
    chunks: dict[str, list[torch.Tensor]] = {}
    labels = []
    bar = progress_bar(len(split), description, show_progress and processes.is_main)
    for start in range(0, len(split), config.batch_size):
        indices = np.arange(start, min(start + config.batch_size, len(split)))
        features, kept = _batch_features(backbone, spec, split, indices, _eval_view(config), processes)
        for key, value in features.items():
            chunks.setdefault(key, []).append(value)
        labels.append(split.labels[kept])
        bar.update(len(indices))
    bar.close()
    if not chunks:
        raise ValueError("No image of the split could be read; check the image column (--image-column).")
    return {key: torch.cat(values) for key, values in chunks.items()}, np.concatenate(labels)


def head_name(kind: str, index: int) -> str:
    """The key of the head of `kind` (PROTOCOL / EXPORTABLE) with the sweep's `index`-th learning rate."""
    return f"{kind}_{index}"


def head_kind(name: str) -> tuple[str, int]:
    kind, index = name.rsplit("_", 1)
    return kind, int(index)


def new_heads(spec: FeatureSpec, num_labels: int, seed: int, num_rates: int = 1) -> torch.nn.ModuleDict:
    """DINO's `LinearClassifier` (weights N(0, 0.01), zero bias), one per learning rate of the sweep, and as many
    exportable heads beside them where the protocol's feature is not the exportable one."""
    dims = {PROTOCOL: spec.dim}
    if spec.needs_exportable_head:
        dims[EXPORTABLE] = spec.hidden_size
    heads = torch.nn.ModuleDict()
    for kind, dim in dims.items():
        # every rate starts from the same weights: a sweep's head is the run of its rate alone
        weight = torch.randn(num_labels, dim, generator=torch.Generator().manual_seed(seed)) * 0.01
        for index in range(num_rates):
            head = torch.nn.Linear(dim, num_labels)
            with torch.no_grad():
                head.weight.copy_(weight)
                head.bias.zero_()
            heads[head_name(kind, index)] = head
    return heads


def dino_optimizer(heads: torch.nn.ModuleDict, config: LinearClassificationConfig):
    """SGD (momentum 0.9, each head's learning rate scaled by batch / 256) and the cosine schedule to 0 over the
    epochs, stepped once per epoch."""
    rates = config.learning_rates
    groups = [
        {"params": head.parameters(), "lr": config.scaled(rates[head_kind(name)[1]])}
        for name, head in heads.items()
    ]
    optimizer = torch.optim.SGD(
        groups, lr=config.scaled(rates[0]), momentum=0.9, weight_decay=config.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs, eta_min=0)


def sgd_step(
    heads: torch.nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
) -> dict[str, float]:
    """One cross-entropy step of every head on its kind's feature of the batch; returns each head's loss."""
    device = next(heads.parameters()).device
    labels = labels.to(device)
    inputs = {kind: value.to(device) for kind, value in features.items()}
    losses = {name: F.cross_entropy(head(inputs[head_kind(name)[0]]), labels) for name, head in heads.items()}
    optimizer.zero_grad(set_to_none=True)
    # the heads share no parameter: their summed loss steps each as if it were trained alone
    sum(losses.values()).backward()
    optimizer.step()
    return {name: float(loss.detach()) for name, loss in losses.items()}


def fit_linear_classifier(
    features: torch.Tensor, labels: torch.Tensor, num_labels: int, config: LinearClassificationConfig
) -> torch.nn.Linear:
    """The protocol's training on fixed (N, D) features (what the cached path runs; the first rate of a sweep):
    returns the linear layer."""
    spec = FeatureSpec(1, False, True, features.shape[1])
    heads = new_heads(spec, num_labels, config.seed)
    optimizer, scheduler = dino_optimizer(heads, config)
    for epoch in range(config.epochs):
        order = np.random.default_rng((config.seed, epoch)).permutation(len(features))
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            sgd_step(heads, optimizer, {PROTOCOL: features[batch]}, labels[batch])
        scheduler.step()
    return heads[head_name(PROTOCOL, 0)]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage of rows whose label is among the `k` highest logits (k capped at the number of classes)."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * int(hits.sum()) / len(labels)


# ------------------------------------------------------------------------------------------------------ state
def _fingerprint(
    config: LinearClassificationConfig, spec: FeatureSpec, backbone: FrozenBackbone, sizes
) -> str:
    """What a saved state must match to be resumed: the settings (the epoch count too: it sets the schedule), the
    feature, the split sizes and the backbone's weights (a digest of some of its tensors)."""
    digest = hashlib.sha256()
    for tensor in list(backbone.model.state_dict().values())[
        :: max(1, len(backbone.model.state_dict()) // 8)
    ]:
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
    payload = {
        "config": asdict(config),
        "feature": asdict(spec),
        "sizes": list(sizes),
        "weights": digest.hexdigest(),
    }
    return json.dumps(payload, sort_keys=True)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Written beside `path` and moved over it: a kill leaves the previous state whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved state at `path` (None if there is none); ValueError if it belongs to other settings."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: torch raises many kinds
        raise ValueError(f"cannot read the state {path}: {error}; delete it to start again.") from error
    if (
        not isinstance(state, dict)
        or state.get("version") != STATE_VERSION
        or state.get("fingerprint") != fingerprint
    ):
        raise ValueError(
            f"the state {path} was written for other settings, data or backbone: delete it to start again, or "
            "give another --checkpoint file."
        )
    return state


# ------------------------------------------------------------------------------------------------------ result
@dataclass
class HeadScores:
    top1: float  # percent
    top5: float  # percent
    feature: str
    learning_rate: float | None = None  # per 256 images
    sweep: list[dict[str, float]] | None = None  # every rate's scores, where several were trained

    def to_dict(self) -> dict:
        scores = {
            "top1": self.top1,
            "top5": self.top5,
            "feature": self.feature,
            "learning_rate": self.learning_rate,
        }
        if self.sweep:
            scores["sweep"] = self.sweep
        return scores


@dataclass
class LinearClassificationResult:
    protocol: HeadScores
    exportable: HeadScores | None  # the last block's CLS head where the protocol's feature is another
    num_labels: int
    num_train: int  # readable training images
    num_eval: int  # readable evaluation images (scored)
    skipped_train: int
    skipped_eval: int
    cached_features: bool
    epochs: int
    batch_size: int
    final_train_loss: float  # of the reported protocol head, last epoch
    resumed_from_epoch: int

    @property
    def top1(self) -> float:
        return self.protocol.top1

    @property
    def top5(self) -> float:
        return self.protocol.top5

    def to_dict(self) -> dict:
        return {
            "top1": self.protocol.top1,
            "top5": self.protocol.top5,
            "feature": self.protocol.feature,
            "exportable": self.exportable.to_dict() if self.exportable else None,
            "num_labels": self.num_labels,
            "num_train": self.num_train,
            "num_eval": self.num_eval,
            "skipped_train": self.skipped_train,
            "skipped_eval": self.skipped_eval,
            "cached_features": self.cached_features,
            "learning_rate": self.protocol.learning_rate,
            "sweep": self.protocol.sweep,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "final_train_loss": self.final_train_loss,
        }


@dataclass
class TrainedClassifier:
    """What `save_classifier` needs besides the backbone."""

    heads: torch.nn.ModuleDict
    spec: FeatureSpec
    label_names: list[str]
    result: LinearClassificationResult
    evaluation: LabelledSplit  # the scored split (for scoring a saved folder on the same images)
    best: dict[str, int]  # kind -> index of the reported learning rate

    def head(self, kind: str) -> torch.nn.Linear:
        """The reported head of `kind` (PROTOCOL / EXPORTABLE): the sweep's best on the evaluation split."""
        return self.heads[head_name(kind, self.best[kind])]


# ------------------------------------------------------------------------------------------------------ train
def run_linear_classification(
    backbone: FrozenBackbone,
    train_dataset,
    eval_dataset,
    config: LinearClassificationConfig | None = None,
    *,
    image_column: str = "image",
    label_column: str | None = None,
    checkpoint: str | Path | None = None,
    accelerator=None,
    show_progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> TrainedClassifier:
    """Trains the linear head(s) on `train_dataset` and scores them on `eval_dataset` (`datasets` splits with an
    image and an integer label column). `checkpoint`: a file the training state is written to after every epoch,
    and resumed from when it exists. `log`: called with one line per epoch."""
    config = config or LinearClassificationConfig()
    if config.crop % backbone.patch_size:
        raise ValueError(f"crop {config.crop} must be a multiple of the patch size {backbone.patch_size}.")
    processes = Processes(accelerator)
    spec = resolve_feature_spec(backbone, config)
    train, evaluation, names = prepare_splits(
        train_dataset,
        eval_dataset,
        image_column,
        label_column,
        config.max_train_samples,
        config.max_eval_samples,
    )
    rates = config.learning_rates
    heads = new_heads(spec, len(names), config.seed, len(rates)).to(backbone.device)
    optimizer, scheduler = dino_optimizer(heads, config)
    path = Path(checkpoint) if checkpoint is not None else None
    fingerprint = _fingerprint(config, spec, backbone, (len(train), len(evaluation), len(names)))
    start_epoch, epoch_losses = 0, {name: math.nan for name in heads}
    state = load_state(path, fingerprint) if path is not None else None
    if state is not None:
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, epoch_losses = int(state["epoch"]), dict(state["losses"])
        train.unreadable.update(state["unreadable"])
        if log and start_epoch < config.epochs:
            log(f"resuming from {path} after epoch {start_epoch} of {config.epochs}")

    cached = None
    if not config.augmentation and start_epoch < config.epochs:
        cached_features, cached_labels = extract_split_features(
            backbone, spec, train, config, processes, show_progress, "training features (computed once)"
        )
        # position in the split -> row of the cache (the unreadable images have none)
        readable = np.setdiff1d(np.arange(len(train)), sorted(train.unreadable))
        cached = (
            cached_features,
            torch.as_tensor(cached_labels),
            {int(i): r for r, i in enumerate(readable)},
        )

    epochs_bar = progress_bar(
        config.epochs - start_epoch, "epochs", show_progress and processes.is_main, "epoch"
    )
    for epoch in range(start_epoch, config.epochs):
        rng = np.random.default_rng((config.seed, epoch))
        order = rng.permutation(len(train))
        if cached is not None:
            order = np.asarray([cached[2][i] for i in order if i in cached[2]])
        totals, count = dict.fromkeys(heads, 0.0), 0
        bar = progress_bar(
            len(order), f"epoch {epoch + 1}", show_progress and processes.is_main and cached is None
        )
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            if cached is not None:
                features = {key: value[batch] for key, value in cached[0].items()}
                labels = cached[1][batch]
            else:
                # the views' randomness is drawn here, in batch order, on every process alike
                seeds = rng.integers(0, 2**63, size=len(batch))

                def view(position: int, image: Image.Image, seeds=seeds) -> torch.Tensor:
                    generator = np.random.default_rng(int(seeds[position]))
                    return training_view(image, generator, config.crop, config.min_crop_scale)

                features, kept = _batch_features(backbone, spec, train, batch, view, processes)
                labels = torch.as_tensor(train.labels[kept])
                bar.update(len(batch))
            if not len(labels):
                continue
            for name, loss in sgd_step(heads, optimizer, features, labels).items():
                totals[name] += loss * len(labels)
            count += len(labels)
        bar.close()
        scheduler.step()
        epoch_losses = {name: total / max(count, 1) for name, total in totals.items()}
        if path is not None and processes.is_main:
            _save_state(
                path,
                {
                    "version": STATE_VERSION,
                    "fingerprint": fingerprint,
                    "epoch": epoch + 1,
                    "losses": epoch_losses,
                    "heads": heads.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "unreadable": sorted(train.unreadable),
                },
            )
        processes.wait()
        epochs_bar.update(1)
        if log:
            losses = ", ".join(
                f"{epoch_losses[head_name(PROTOCOL, i)]:.4f}" + (f" (lr {rate:g})" if len(rates) > 1 else "")
                for i, rate in enumerate(rates)
            )
            log(
                f"epoch {epoch + 1}/{config.epochs}: loss {losses}; schedule at {scheduler.get_last_lr()[0] / optimizer.param_groups[0]['initial_lr']:.3f} of the peak"
            )
    epochs_bar.close()

    eval_features, eval_labels = extract_split_features(
        backbone, spec, evaluation, config, processes, show_progress, "evaluation features"
    )
    labels = torch.as_tensor(eval_labels)
    scores, best = {}, {}
    with torch.no_grad():
        for kind, features in eval_features.items():
            sweep = []
            for index, rate in enumerate(rates):
                logits = heads[head_name(kind, index)](features.to(backbone.device)).cpu()
                sweep.append(
                    {
                        "learning_rate": rate,
                        "top1": topk_accuracy(logits, labels, 1),
                        "top5": topk_accuracy(logits, labels, 5),
                    }
                )
            # the first of equal top-1s: the smallest rate where the sweep is given in increasing order
            best[kind] = max(range(len(rates)), key=lambda i, sweep=sweep: (sweep[i]["top1"], -i))
            chosen = sweep[best[kind]]
            scores[kind] = HeadScores(
                chosen["top1"],
                chosen["top5"],
                spec.describe() if kind == PROTOCOL else EXPORTABLE_FEATURE,
                learning_rate=chosen["learning_rate"],
                sweep=sweep if len(rates) > 1 else None,
            )
    result = LinearClassificationResult(
        protocol=scores[PROTOCOL],
        exportable=scores.get(EXPORTABLE),
        num_labels=len(names),
        num_train=len(train) - len(train.unreadable),
        num_eval=len(labels),
        skipped_train=len(train.unreadable),
        skipped_eval=len(evaluation.unreadable),
        cached_features=not config.augmentation,
        epochs=config.epochs,
        batch_size=config.batch_size,
        final_train_loss=epoch_losses[head_name(PROTOCOL, best[PROTOCOL])],
        resumed_from_epoch=start_epoch,
    )
    return TrainedClassifier(heads.cpu(), spec, names, result, evaluation, best)


# ------------------------------------------------------------------------------------------ evaluation view
def classifier_image_processor(backbone: FrozenBackbone | None, config: LinearClassificationConfig):
    """The evaluation view as an image processor: shorter side `resize` (bicubic), centre crop `crop`, the
    backbone's normalisation (without a backbone: ImageNet's), any image mode converted to RGB."""
    from transformers import BitImageProcessorPil

    mean = backbone.image_mean.flatten().tolist() if backbone is not None else list(IMAGENET_MEAN)
    std = backbone.image_std.flatten().tolist() if backbone is not None else list(IMAGENET_STD)
    return BitImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": config.resize},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": config.crop, "width": config.crop},
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


__all__ = [
    "EXPORTABLE",
    "PROTOCOL",
    "FeatureSpec",
    "HeadScores",
    "LinearClassificationResult",
    "TrainedClassifier",
    "classifier_image_processor",
    "dino_optimizer",
    "extract_split_features",
    "fit_linear_classifier",
    "head_name",
    "load_state",
    "new_heads",
    "protocol_features",
    "resolve_feature_spec",
    "run_linear_classification",
    "sgd_step",
    "topk_accuracy",
    "training_view",
]
