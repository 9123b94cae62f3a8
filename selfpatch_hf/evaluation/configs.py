"""The settings of every evaluation protocol: one dataclass each, the one home of their defaults.

The library functions take them (`predict_davis(..., PropagationConfig(...))`, `run_linear_probe(...,
LinearProbeConfig(...))`, `run_knn(..., KnnConfig(...))`, ...), and `selfpatch eval` generates its options from
their fields: the name (`short_side` -> `--short-side`, or the field's `option`), the type, the default and the
`help` of each field's metadata (`selfpatch_hf.evaluation.cli.config_options`). A value that makes no sense (zero
epochs, a negative temperature, NaN) fails at construction with a `SettingError` naming the field.

This module imports nothing heavy, so that `selfpatch eval COMMAND --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal


class SettingError(ValueError):
    """A setting has a value the protocol cannot use: `field` must `requirement` (e.g. "be >= 1"), not `value`."""

    def __init__(self, field: str, requirement: str, value: Any):
        super().__init__(f"{field} must {requirement}, got {value!r}.")
        self.field, self.requirement, self.value = field, requirement, value


def setting(default: Any, help: str, *, option: str | None = None) -> Any:  # noqa: A002
    """A dataclass field with the help text (and, where it is not `--field-name`, the option) of its command-line
    option."""
    metadata = {"help": help}
    if option is not None:
        metadata["option"] = option
    return dataclasses.field(default=default, metadata=metadata)


def _check(config: Any, rules: dict[str, tuple[str, Any]]) -> None:
    """`rules`: field -> (what the value must do, e.g. "be >= 1"; the predicate that checks it)."""
    for name, (requirement, valid) in rules.items():
        value = getattr(config, name)
        if not valid(value):
            raise SettingError(name, requirement, value)


def _positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _at_least(minimum: int):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _optional(check):
    return lambda value: value is None or check(value)


@dataclass
class PropagationConfig:
    """Label propagation on frozen patch features (defaults: the DINO / SelfPatch DAVIS protocol)."""

    short_side: int = setting(
        480,
        "frames are resized to this shorter side (frames smaller than it keep their size unless --upscale)",
    )
    upscale: bool = setting(
        False,
        "also enlarge frames whose shorter side is below --short-side (DINO's script does; on DAVIS 480p nothing "
        "changes, on smaller frames it doubles the patch grid)",
    )
    size_multiple: int = setting(64, "the resized longer side is floored to a multiple of this")
    n_last_frames: int = setting(7, "context: this many previous frames plus the first")
    topk: int = setting(5, "labels come from the k most similar context patches")
    temperature: float = setting(0.1, "softmax temperature of the affinities")
    neighborhood: int = setting(12, "window radius in patches around each target patch (0: the whole frame)")
    normalize_channels: bool = setting(
        True, "skip the per-channel min-max of the soft labels before the argmax", option="--no-channel-norm"
    )
    feature_batch_size: int = setting(4, "frames per backbone forward (does not change the results)")
    query_chunk: int = setting(1024, "target patches per affinity block (memory, not results)")

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "short_side": ("be a positive number of pixels", _at_least(1)),
                "size_multiple": ("be a positive number of pixels", _at_least(1)),
                "n_last_frames": ("be >= 0", _at_least(0)),
                "topk": ("be >= 1", _at_least(1)),
                "temperature": ("be a positive number", _positive),
                "neighborhood": ("be >= 0 patches (0: the whole frame)", _at_least(0)),
                "feature_batch_size": ("be >= 1", _at_least(1)),
                "query_chunk": ("be >= 1", _at_least(1)),
            },
        )


@dataclass
class DavisConfig:
    """Where a DAVIS-layout folder keeps a split, and how J and F are scored (the DAVIS 2017 toolkit's settings)."""

    split: str = setting("val", "ImageSets/<year>/<split>.txt lists the sequences")
    year: str = setting("2017", "ImageSets/<year>/")
    resolution: str = setting("480p", "JPEGImages/<resolution>/ and Annotations/<resolution>/")
    bound_th: float = setting(
        0.008, "boundary tolerance of F: a fraction of the image diagonal below 1, else pixels"
    )

    def __post_init__(self) -> None:
        _check(self, {"bound_th": ("be a positive number", _positive)})


@dataclass
class LinearProbeConfig:
    """A linear segmentation head on frozen patch features (BatchNorm + 1x1 convolution, AdamW, cosine schedule)."""

    image_size: int = setting(224, "square input size (a multiple of the patch size)")
    epochs: int = setting(20, "training epochs of the linear head")
    batch_size: int = setting(16, "images per optimiser step")
    feature_batch_size: int = setting(16, "images per backbone forward (does not change the results)")
    learning_rate: float = setting(1e-3, "peak learning rate of the linear head")
    weight_decay: float = setting(1e-4, "AdamW weight decay of the linear head")
    ignore_index: int = setting(255, "mask value that is not scored")
    reduce_labels: bool = setting(False, "0 -> ignore, l -> l-1 (ADE20K)")
    num_labels: int | None = setting(None, "number of classes (default: largest label of both splits + 1)")
    max_train_samples: int | None = setting(None, "use only the first N training examples")
    max_eval_samples: int | None = setting(None, "score only the first N evaluation examples")
    seed: int = setting(0, "seed of the head's initialisation and shuffling")

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "image_size": ("be a positive number of pixels", _at_least(1)),
                "epochs": ("be >= 1", _at_least(1)),
                "batch_size": ("be >= 1", _at_least(1)),
                "feature_batch_size": ("be >= 1", _at_least(1)),
                "learning_rate": ("be a positive number", _positive),
                "weight_decay": ("be >= 0", lambda v: v == 0 or _positive(v)),
                "num_labels": ("be at least 2", _optional(_at_least(2))),
                "max_train_samples": ("be >= 1", _optional(_at_least(1))),
                "max_eval_samples": ("be >= 1", _optional(_at_least(1))),
            },
        )


@dataclass
class KnnConfig:
    """Weighted k-NN classification on frozen image representations (DINO's `eval_knn.py`)."""

    k: int = setting(20, "number of neighbours that vote")
    temperature: float = setting(0.07, "temperature of the vote weights")
    resize: int = setting(256, "shorter side before the centre crop")
    crop: int = setting(224, "centre crop size (a multiple of the patch size)")
    pooling: Literal["auto", "cls", "mean"] = setting(
        "auto", "image representation: CLS token, mean of patch tokens, or auto (CLS when the model has one)"
    )
    batch_size: int = setting(32, "images per backbone forward (does not change the results)")
    max_train_samples: int | None = setting(None, "use only the first N training examples")
    max_eval_samples: int | None = setting(None, "classify only the first N evaluation examples")

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "k": ("be >= 1", _at_least(1)),
                "temperature": ("be a positive number", _positive),
                "resize": ("be a positive number of pixels", _at_least(1)),
                "crop": ("be a positive number of pixels", _at_least(1)),
                "pooling": ("be 'auto', 'cls' or 'mean'", lambda v: v in ("auto", "cls", "mean")),
                "batch_size": ("be >= 1", _at_least(1)),
                "max_train_samples": ("be >= 1", _optional(_at_least(1))),
                "max_eval_samples": ("be >= 1", _optional(_at_least(1))),
            },
        )


@dataclass
class LinearClassificationConfig:
    """A linear classifier on frozen image features (DINO's `eval_linear.py`): SGD with momentum 0.9, the learning
    rate scaled by batch / 256, a cosine schedule over the epochs, no batch norm."""

    n_last_blocks: int | None = setting(
        None,
        "concatenate the CLS tokens (after the final norm) of this many last blocks (default: 4 for models narrower "
        "than 768, e.g. ViT-S, or all blocks of shallower ones; 1 otherwise, e.g. ViT-B; CLS-free models: 1)",
    )
    avgpool: Literal["auto", "on", "off"] = setting(
        "auto",
        "also concatenate the average-pooled last-block patch tokens (DINO: off for ViT-S, on for ViT-B; auto "
        "follows --n-last-blocks: on where it is 1); CLS-free models (Swin) always use the average pool alone",
    )
    epochs: int = setting(100, "training epochs of the linear layer")
    batch_size: int = setting(128, "images per optimiser step (and per backbone forward)")
    learning_rate: float = setting(
        0.001, "learning rate per 256 images: the optimiser's is LEARNING_RATE x BATCH_SIZE / 256"
    )
    lr_sweep: str | None = setting(
        None,
        "comma-separated learning rates per 256 images (e.g. 0.001,0.01,0.1), one head each, trained side by side "
        "on the same batches; the best on the evaluation split is reported, as DINOv2's linear evaluation chooses "
        "(an optimistic estimate: say so); replaces --learning-rate",
    )
    weight_decay: float = setting(0.0, "SGD weight decay")
    augmentation: bool = setting(
        True,
        "train on centre crops of fixed features (cached once) instead of DINO's random resized crop + flip "
        "(much faster; not DINO's protocol)",
        option="--no-augmentation",
    )
    resize: int = setting(256, "evaluation: shorter side before the centre crop")
    crop: int = setting(224, "crop size of training and evaluation (a multiple of the patch size)")
    min_crop_scale: float = setting(0.08, "training: smallest area fraction of the random resized crop")
    max_train_samples: int | None = setting(None, "use only the first N training examples")
    max_eval_samples: int | None = setting(None, "score only the first N evaluation examples")
    seed: int = setting(0, "seed of the initialisation, the shuffling and the augmentation")

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "n_last_blocks": ("be >= 1", _optional(_at_least(1))),
                "avgpool": ("be 'auto', 'on' or 'off'", lambda v: v in ("auto", "on", "off")),
                "epochs": ("be >= 1", _at_least(1)),
                "batch_size": ("be >= 1", _at_least(1)),
                "learning_rate": ("be a positive number", _positive),
                "weight_decay": ("be >= 0", lambda v: v == 0 or _positive(v)),
                "resize": ("be a positive number of pixels", _at_least(1)),
                "crop": ("be a positive number of pixels", _at_least(1)),
                "min_crop_scale": ("lie in (0, 1]", lambda v: _positive(v) and v <= 1),
                "max_train_samples": ("be >= 1", _optional(_at_least(1))),
                "max_eval_samples": ("be >= 1", _optional(_at_least(1))),
                "seed": ("be >= 0", _at_least(0)),
            },
        )
        if self.lr_sweep is not None:
            try:
                rates = [float(part) for part in self.lr_sweep.split(",")]
            except ValueError:
                rates = []
            if not rates or not all(_positive(rate) for rate in rates) or len(set(rates)) < len(rates):
                raise SettingError(
                    "lr_sweep", "be distinct positive numbers separated by commas", self.lr_sweep
                )
        if self.avgpool == "on" and (self.n_last_blocks or 1) > 1:
            # DINO pools the patch tokens beside one block's CLS token only (its code cannot concatenate more)
            raise SettingError("avgpool", "be 'off' or 'auto' with more than one block", self.avgpool)

    @property
    def learning_rates(self) -> tuple[float, ...]:
        """The learning rates per 256 images, one head each: the sweep's, else `learning_rate`."""
        if self.lr_sweep is None:
            return (self.learning_rate,)
        return tuple(float(part) for part in self.lr_sweep.split(","))

    def scaled(self, learning_rate: float) -> float:
        """The optimiser's learning rate of a rate per 256 images: DINO's linear scaling rule."""
        return learning_rate * self.batch_size / 256


@dataclass
class AttentionFigureConfig:
    """What an attention figure shows of each query's last-layer attention (the paper's Figure 1)."""

    fraction: float = setting(
        0.1,
        "share of the attention to show: the top FRACTION of patches (--mode patches) or of the attention mass "
        "(--mode mass)",
    )
    mode: Literal["patches", "mass"] = setting(
        "patches",
        "patches: the ceil(FRACTION x patches) most attended patches (the paper's Figure 1); mass: the fewest "
        "patches holding FRACTION of the attention (DINO's figures)",
    )
    layer: int = setting(
        -1, "transformer layer whose attention is drawn (0-based; negative counts from the last)"
    )
    per_head: bool = setting(False, "also draw one column per attention head")

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "fraction": ("lie in (0, 1]", lambda v: _positive(v) and v <= 1),
                "mode": ("be 'patches' or 'mass'", lambda v: v in ("patches", "mass")),
            },
        )


def _fraction(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    )  # NaN fails


@dataclass
class CocoEvalConfig:
    """COCO box / mask AP of a saved detector or instance segmenter (`evaluate_coco`, `selfpatch eval coco`)."""

    threshold: float = setting(
        0.0, "keep predictions scoring at least this (0: all; COCOeval keeps the 100 best per image)"
    )
    mask_threshold: float = setting(0.5, "a mask pixel is on when its probability exceeds this")
    overlap_mask_area_threshold: float = setting(
        0.8, "--pipeline-masks: drop a mask mostly covered by others"
    )
    overlapping_masks: bool = setting(
        True,
        "score masks as pipeline('image-segmentation', subtask='instance') gives them (one segmentation map) "
        "instead of each query's own mask",
        option="--pipeline-masks",
    )
    pipeline_boxes: bool = setting(
        False,
        "round boxes down to whole pixels, as pipeline('object-detection') returns them (the AP a pipeline user "
        "measures)",
        option="--pipeline-boxes",
    )
    batch_size: int = setting(
        8, "images per forward pass (of one processed size; does not change the results)"
    )
    max_samples: int | None = setting(None, "evaluate only the first N images")
    device: str = setting("cpu", "torch device to run the model on")

    def __post_init__(self) -> None:
        _check(
            self,
            {
                "threshold": ("lie in [0, 1]", _fraction),
                "mask_threshold": ("lie in [0, 1]", _fraction),
                "overlap_mask_area_threshold": ("lie in [0, 1]", _fraction),
                "batch_size": ("be >= 1", _at_least(1)),
                "max_samples": ("be >= 1", _optional(_at_least(1))),
            },
        )


__all__ = [
    "AttentionFigureConfig",
    "CocoEvalConfig",
    "DavisConfig",
    "KnnConfig",
    "LinearClassificationConfig",
    "LinearProbeConfig",
    "PropagationConfig",
    "SettingError",
    "setting",
]
