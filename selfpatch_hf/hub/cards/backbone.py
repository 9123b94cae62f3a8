"""Model cards of published backbones: what the weights are, where they came from, how they were trained.

The card is rendered from the package's Jinja template (`selfpatch_hf/hub/cards/backbone_template.md`, its only copy) with
`huggingface_hub.ModelCard.from_template`, so its YAML metadata (`library_name`, `pipeline_tag`, tags, license,
datasets, `model-index`) is what the Hub validates. Only Hub dataset ids go into the `datasets` metadata (the Hub
links them); data that is not on the Hub (local files, the offline sample) is described in the card's body.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from selfpatch_hf.hub.cards.shared import (
    LICENSE,
    REPO_ID_PLACEHOLDER,
    citations,
    render_card,
    save_card,
)

TEMPLATE_NAME = "backbone_template.md"
BASE_TAGS = ("selfpatch", "dino", "self-supervised", "vision-transformer", "dense-features")

METHOD_NAMES = {
    "selfpatch": "SelfPatch",
    "selfpatch_moby": "SelfPatch (MoBY)",
    "dino": "DINO",
    "moby": "MoBY",
}

# Short keys accepted in `BackboneCardInfo.eval_results` -> `huggingface_hub.EvalResult` fields.
_EVAL_KEY_ALIASES = {
    "task": "task_type",
    "dataset": "dataset_type",
    "metric": "metric_type",
    "value": "metric_value",
    "split": "dataset_split",
}


def check_hub_dataset_ids(datasets: list[str]) -> None:
    """Raises a ValueError naming the first entry of `datasets` that is not a Hub dataset id."""
    for dataset in datasets:
        try:
            validate_repo_id(dataset)
        except HFValidationError as error:
            raise ValueError(
                f"datasets lists {dataset!r}, which is not a Hub dataset id ({error}). `datasets` becomes the "
                "card's metadata, which the Hub links to its dataset pages: describe local data with "
                "training_data=... instead."
            ) from error


@dataclass
class BackboneCardInfo:
    """Everything a backbone's model card states. Unknown recipe values stay `None` and are left out of the card.

    `eval_results` entries are dicts with `task_type`, `dataset_type`, `metric_type`, `metric_value` (short forms
    `task`, `dataset`, `metric`, `value` are accepted) and optionally `dataset_name`, `task_name`, `metric_name`,
    `dataset_split`, `source_name`, `source_url`; they become the card's `model-index`.
    """

    # ---- architecture
    architecture: str  # preset name (e.g. "vit-small-patch16") or a reference arch name ("vit_small")
    patch_size: int
    hidden_size: int
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    image_size: int | None = None
    # the transformers class `AutoModel` builds: "ViTModel", "SiglipVisionModel" or "SwinModel"
    model_class: str = "ViTModel"
    num_prefix_tokens: int = 1  # tokens before the patch tokens in last_hidden_state (1 = CLS, 0 = none)
    # pixels per token of last_hidden_state when it is not the patch size (a Swin's last stage: patch * 2**(stages-1))
    feature_stride: int | None = None
    # ---- provenance
    source: Literal["trained", "converted"] = "trained"
    converted_from: str | None = None  # file name / URL of a converted checkpoint
    # the pretraining objective that produced the weights
    objective: Literal["selfpatch", "selfpatch_moby", "dino", "moby"] = "selfpatch"
    exported_network: Literal["teacher", "student"] = "teacher"
    warnings: list[str] = field(default_factory=list)  # stated prominently at the top of the card
    # ---- training recipe
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids only: they become the card's metadata
    training_data: str | None = None  # training data that is not a Hub dataset, described in the card's body
    epochs: float | None = None
    steps: int | None = None
    global_batch_size: int | None = None
    learning_rate: float | None = None
    patch_loss_weight: float | None = None  # lambda
    num_positives: int | None = None  # k
    neighborhood_size: int | str | None = None
    image_representation: str | None = None
    global_crop_size: int | tuple[int, int] | list[int] | None = None
    local_crop_size: int | tuple[int, int] | list[int] | None = None
    num_global_crops: int | None = None
    num_local_crops: int | None = None
    # ---- publishing
    license: str = LICENSE
    eval_results: list[dict[str, Any]] = field(default_factory=list)
    model_name: str | None = None  # title of the card and name of the model-index entry
    repo_id: str | None = None  # where it is published, if known (else a placeholder in the usage snippet)
    extra_tags: list[str] = field(default_factory=list)
    notes: str | None = None  # free text appended to the description

    def __post_init__(self) -> None:
        check_hub_dataset_ids(self.datasets)

    @classmethod
    def from_selfpatch_config(cls, config: Any, **fields: Any) -> BackboneCardInfo:
        """Fills the architecture and method fields from a `SelfPatchConfig`; `fields` add or override the rest (the
        training's crop recipe: `**CropRecipe.card_fields()`)."""
        backbone = config.backbone_config
        image_size = backbone.image_size if isinstance(backbone.image_size, int) else backbone.image_size[0]
        patch_size = backbone.patch_size if isinstance(backbone.patch_size, int) else backbone.patch_size[0]
        use_patch = config.patch_loss_weight > 0
        image_objective = getattr(config, "image_objective", "dino")
        values: dict[str, Any] = {
            "patch_size": patch_size,
            "hidden_size": config.hidden_size,
            "image_size": image_size,
            "objective": (
                ("selfpatch" if image_objective == "dino" else f"selfpatch_{image_objective}")
                if use_patch
                else image_objective
            ),
            "patch_loss_weight": config.patch_loss_weight,
            "num_positives": config.num_positives if use_patch else None,
            "neighborhood_size": config.neighborhood_size if use_patch else None,
            "image_representation": config.image_representation,
        }
        if config.backbone_type == "swin":
            depths = "-".join(str(depth) for depth in backbone.depths)
            values |= {
                "architecture": f"swin-e{backbone.embed_dim}-d{depths}-patch{patch_size}-window{backbone.window_size}",
                "num_hidden_layers": sum(backbone.depths),
                "num_attention_heads": backbone.num_heads[-1],
                "model_class": "SwinModel",
                "num_prefix_tokens": 0,
                "feature_stride": config.patch_size,
            }
        else:
            values |= {
                "architecture": f"vit-h{backbone.hidden_size}-l{backbone.num_hidden_layers}-patch{patch_size}",
                "num_hidden_layers": backbone.num_hidden_layers,
                "num_attention_heads": backbone.num_attention_heads,
            }
        values.update(fields)
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------- template
def _size(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value) if len(set(value)) > 1 else str(value[0])
    return str(value)


def _eval_results(info: BackboneCardInfo) -> list[EvalResult]:
    results = []
    for entry in info.eval_results:
        values = {_EVAL_KEY_ALIASES.get(key, key): value for key, value in entry.items()}
        missing = [
            key for key in ("task_type", "dataset_type", "metric_type", "metric_value") if key not in values
        ]
        if missing:
            raise ValueError(
                f"Evaluation result {entry!r} lacks {missing}: each needs a task, a dataset, a metric and a value "
                "(e.g. {'task': 'video-object-segmentation', 'dataset': 'davis-2017', 'metric': 'j_and_f_mean', "
                "'value': 62.7})."
            )
        values.setdefault("dataset_name", values["dataset_type"])
        results.append(EvalResult(**values))
    return results


def _title(info: BackboneCardInfo) -> str:
    if info.model_name:
        return info.model_name
    return f"{METHOD_NAMES.get(info.objective, 'DINO')} {info.architecture} backbone"


def _usage_code(info: BackboneCardInfo) -> str:
    model_id = info.repo_id or REPO_ID_PLACEHOLDER
    prefix = info.num_prefix_tokens
    if prefix == 1:
        token_comment = "(1, 1 + N, C): the CLS token, then the N patch tokens in row-major order"
        drop = "[:, 1:]"
    elif prefix == 0:
        token_comment = "(1, N, C): the N patch tokens in row-major order (this backbone has no CLS token)"
        drop = ""
    else:
        token_comment = f"(1, {prefix} + N, C): {prefix} prefix tokens, then the N patch tokens"
        drop = f"[:, {prefix}:]"
    if info.feature_stride:
        stride_name, stride_line = (
            "stride",
            f"stride = {info.feature_stride}  # pixels per token of the last stage",
        )
    else:
        stride_name, stride_line = "patch_size", "patch_size = model.config.patch_size"
    return textwrap.dedent(
        f"""\
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel

        model_id = "{model_id}"
        processor = AutoImageProcessor.from_pretrained(model_id)
        model = AutoModel.from_pretrained(model_id).eval()

        image = Image.open("image.jpg").convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            tokens = model(**inputs).last_hidden_state  # {token_comment}

        {stride_line}
        height, width = inputs["pixel_values"].shape[-2:]
        patch_tokens = tokens{drop}  # (1, N, C)
        feature_map = patch_tokens[0].reshape(height // {stride_name}, width // {stride_name}, -1)  # (H/s, W/s, C)
        """
    )


def _provenance(info: BackboneCardInfo) -> str:
    network = f"the {info.exported_network} network"
    if info.source == "converted":
        origin = info.converted_from or "an unnamed checkpoint"
        reference = {
            "selfpatch": "SelfPatch reference code",
            "moby": "MoBY public code (Transformer-SSL)",
        }.get(info.objective, "DINO reference code")
        return (
            f"Converted with `selfpatch-convert` from `{origin}` (a checkpoint of the {reference}; {network}'s "
            f"backbone). The conversion is exact: the converted `{info.model_class}` reproduces the reference "
            "backbone's features (max abs difference <= 1e-4 in float32)."
        )
    return f"Trained with `selfpatch-hf`; this is {network}'s backbone (the EMA teacher is what evaluations load)."


def _training_data(info: BackboneCardInfo) -> str | None:
    parts = [f"[{dataset}](https://huggingface.co/datasets/{dataset})" for dataset in info.datasets]
    if info.training_data:
        parts.append(info.training_data)
    return "; ".join(parts) or None


def _recipe_rows(info: BackboneCardInfo) -> list[tuple[str, str]]:
    rows: list[tuple[str, Any]] = [
        (
            "objective",
            {
                "selfpatch": "SelfPatch (DINO + patch-level loss)",
                "selfpatch_moby": "SelfPatch (MoBY + patch-level loss)",
                "moby": "MoBY",
            }.get(info.objective, "DINO"),
        ),
        ("training data", _training_data(info)),
        ("epochs", info.epochs),
        ("optimisation steps", info.steps),
        ("global batch size", info.global_batch_size),
        ("peak learning rate", info.learning_rate),
        ("patch loss weight (lambda)", info.patch_loss_weight),
        ("positives per patch (k)", info.num_positives),
        (
            "neighbourhood",
            f"{info.neighborhood_size}x{info.neighborhood_size}"
            if isinstance(info.neighborhood_size, int)
            else info.neighborhood_size,
        ),
        ("image-level representation", info.image_representation),
    ]
    if info.num_global_crops is not None or info.global_crop_size is not None:
        rows.append(
            (
                "global crops",
                f"{info.num_global_crops if info.num_global_crops is not None else '?'} x {_size(info.global_crop_size)} px",
            )
        )
    if info.num_local_crops is not None or info.local_crop_size is not None:
        rows.append(
            (
                "local crops",
                f"{info.num_local_crops if info.num_local_crops is not None else '?'} x {_size(info.local_crop_size)} px",
            )
        )
    kept = [(name, str(value)) for name, value in rows if value is not None]
    return kept if len(kept) > 1 else []  # the objective alone is no recipe


def render_backbone_card(info: BackboneCardInfo) -> ModelCard:
    """Renders the model card of a published backbone (metadata validated by `huggingface_hub`)."""
    eval_results = _eval_results(info)
    title = _title(info)
    tags = list(dict.fromkeys([*BASE_TAGS, *info.extra_tags]))
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=info.license,
        tags=tags,
        datasets=list(info.datasets) or None,
        model_name=title if eval_results else None,
        eval_results=eval_results or None,
    )
    architecture_rows = [
        ("transformers class", f"`{info.model_class}` (loads with `AutoModel`, no remote code)"),
        ("architecture", info.architecture),
        ("patch size", info.patch_size),
        ("hidden size", info.hidden_size),
        ("layers", info.num_hidden_layers),
        ("attention heads", info.num_attention_heads),
        (
            "position grid",
            f"{info.image_size // info.patch_size}x{info.image_size // info.patch_size} ({info.image_size} px)"
            if info.image_size
            else None,
        ),
        (
            "prefix tokens",
            {0: "0 (no CLS token)", 1: "1 (CLS)"}.get(info.num_prefix_tokens, str(info.num_prefix_tokens)),
        ),
    ]
    return render_card(
        TEMPLATE_NAME,
        card_data,
        title=title,
        info=info,
        warnings=list(info.warnings),
        architecture_rows=[(name, str(value)) for name, value in architecture_rows if value is not None],
        provenance=_provenance(info),
        recipe_rows=_recipe_rows(info),
        eval_rows=[
            (
                result.task_name or result.task_type,
                result.dataset_name,
                result.dataset_split or "",
                result.metric_name or result.metric_type,
                result.metric_value,
            )
            for result in eval_results
        ],
        usage_code=_usage_code(info),
        citations=citations(info.objective),
    )


def write_backbone_card(folder: str | Path, info: BackboneCardInfo) -> Path:
    """Renders the card and writes it as `folder/README.md`; returns the path."""
    return save_card(render_backbone_card(info), folder)


__all__ = [
    "BASE_TAGS",
    "REPO_ID_PLACEHOLDER",
    "BackboneCardInfo",
    "check_hub_dataset_ids",
    "render_backbone_card",
    "write_backbone_card",
]
