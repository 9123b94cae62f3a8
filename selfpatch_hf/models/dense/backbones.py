"""Pretrained ViT backbones as transformers *backbones* (`BackboneMixin`), the input of dense prediction heads.

transformers' dense heads (`UperNetForSemanticSegmentation`, `DPTForDepthEstimation`, ...) take a backbone that
returns feature maps of selected blocks. A plain ViT is not one, but its weights load exactly into
`Dinov2Backbone` (the same pre-norm blocks with a class token; DINOv2's layer scale set to 1, no SwiGLU, no mask
token). So:

- a `ViTModel` (our `export_backbone` folders, converted DINO checkpoints) -> `Dinov2Backbone`, a native class that
  loads with `Dinov2Backbone.from_pretrained` and no code of ours; its `stageN` feature map is the output of block N
  after the ViT's final LayerNorm, without the class token, reshaped to (batch, hidden, height / patch,
  width / patch); the last stage equals the ViT's `last_hidden_state[:, 1:]` exactly;
- a CLS-free `SiglipVisionModel` (converted released SelfPatch checkpoints) -> `SelfPatchSiglipBackbone`
  (`selfpatch_hf.models.dense.siglip_backbone`), which needs this package imported to load.

`out_indices` default to the blocks the ViT dense-prediction literature takes (4, 6, 8, 12 of 12; in general a
third, half, two thirds and all of the depth). In transformers 5.24 `AutoBackbone.from_pretrained(local_folder)`
fails (`HFValidationError`); `load_dense_backbone` picks the class from the folder's `model_type` instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoImageProcessor,
    Dinov2Backbone,
    Dinov2Config,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from selfpatch_hf.models.dense.siglip_backbone import SelfPatchSiglipBackbone, SelfPatchSiglipBackboneConfig

if TYPE_CHECKING:
    from transformers.image_processing_base import ImageProcessingMixin

DenseBackbone = Dinov2Backbone | SelfPatchSiglipBackbone
BackboneSource = str | os.PathLike | PreTrainedModel


def dense_out_indices(num_hidden_layers: int) -> list[int]:
    """The blocks whose outputs feed a dense head: [4, 6, 8, 12] for 12 blocks, in general a third, half, two
    thirds and all of the depth (rounded, kept strictly increasing). Needs at least 4 blocks."""
    if num_hidden_layers < 4:
        raise ValueError(
            f"Default out_indices need at least 4 blocks, the backbone has {num_hidden_layers}: pass out_indices "
            f"explicitly (block numbers 1..{num_hidden_layers})."
        )
    indices: list[int] = []
    for fraction in (1 / 3, 1 / 2, 2 / 3, 1):
        index = max(1, round(num_hidden_layers * fraction))
        indices.append(max(index, indices[-1] + 1) if indices else index)
    return indices


def _checked_out_indices(out_indices: Sequence[int] | None, num_hidden_layers: int) -> list[int]:
    if out_indices is None:
        return dense_out_indices(num_hidden_layers)
    indices = [int(index) for index in out_indices]
    if (
        not indices
        or any(not 1 <= index <= num_hidden_layers for index in indices)
        or indices != sorted(set(indices))
    ):
        raise ValueError(
            f"out_indices must be increasing block numbers in 1..{num_hidden_layers} (0 = the embeddings is not a "
            f"useful feature map), got {list(out_indices)}."
        )
    return indices


# ---------------------------------------------------------------------------------------------------------------
# ViT -> Dinov2Backbone
# ---------------------------------------------------------------------------------------------------------------


def dinov2_config_from_vit(config: ViTConfig, out_indices: Sequence[int] | None = None) -> Dinov2Config:
    """A `Dinov2Config` computing exactly what a `ViTModel` of `config` computes (layer scale 1, GELU MLP)."""
    if config.intermediate_size % config.hidden_size:
        raise ValueError(
            f"Dinov2Backbone needs an integer MLP ratio; intermediate_size {config.intermediate_size} is not a "
            f"multiple of hidden_size {config.hidden_size}."
        )
    return Dinov2Config(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size // config.hidden_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        use_swiglu_ffn=False,
        use_mask_token=False,  # no unused (and so "newly initialised") parameter in the folder
        apply_layernorm=True,
        reshape_hidden_states=True,
        out_indices=_checked_out_indices(out_indices, config.num_hidden_layers),
        architectures=["Dinov2Backbone"],
    )


def _vit_to_dinov2_name(name: str) -> str | None:
    """Live `ViTModel` parameter name -> live `Dinov2Backbone` name (None: not part of the backbone)."""
    if name.startswith("pooler."):
        return None
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        rest = rest.replace("layernorm_before.", "norm1.").replace("layernorm_after.", "norm2.")
        return f"encoder.layer.{index}.{rest}"
    return name  # embeddings.*, layernorm.*


def vit_to_dinov2_backbone(vit: ViTModel, out_indices: Sequence[int] | None = None) -> Dinov2Backbone:
    """A `Dinov2Backbone` holding exactly the weights of `vit` (its pooler, if any, is dropped)."""
    backbone = Dinov2Backbone(dinov2_config_from_vit(vit.config, out_indices))
    state = {}
    for name, tensor in vit.state_dict().items():
        target = _vit_to_dinov2_name(name)
        if target is not None:
            state[target] = tensor.detach().float()
    for layer in range(vit.config.num_hidden_layers):  # DINOv2's layer scale, the identity for a plain ViT
        for which in ("layer_scale1", "layer_scale2"):
            state[f"encoder.layer.{layer}.{which}.lambda1"] = torch.ones(vit.config.hidden_size)
    # live names on both sides: a strict in-memory copy (no file-format renaming involved)
    backbone.load_state_dict(state, strict=True)
    return backbone.eval()


# ---------------------------------------------------------------------------------------------------------------
# CLS-free SigLIP tower -> SelfPatchSiglipBackbone
# ---------------------------------------------------------------------------------------------------------------


def siglip_to_backbone(
    model: SiglipVisionModel, out_indices: Sequence[int] | None = None
) -> SelfPatchSiglipBackbone:
    """A `SelfPatchSiglipBackbone` with the weights of a head-less `SiglipVisionModel` (same module names)."""
    if model.config.vision_use_head:
        raise ValueError(
            "This SiglipVisionModel has an attention-pooling head; SelfPatch conversions have none "
            "(vision_use_head=False). Pass a converted SelfPatch checkpoint."
        )
    fields = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "out_indices", "out_features"):
        fields.pop(key, None)
    config = SelfPatchSiglipBackboneConfig(
        **fields,
        out_indices=_checked_out_indices(out_indices, model.config.num_hidden_layers),
        architectures=["SelfPatchSiglipBackbone"],
    )
    backbone = SelfPatchSiglipBackbone(config)
    backbone.load_state_dict({k: v.detach().float() for k, v in model.state_dict().items()}, strict=True)
    return backbone.eval()


def with_out_indices(backbone: DenseBackbone, out_indices: Sequence[int] | None) -> DenseBackbone:
    """`backbone` itself with other `out_indices` (None: the dense default for its depth)."""
    backbone.config.out_indices = _checked_out_indices(out_indices, backbone.config.num_hidden_layers)
    return backbone


# ---------------------------------------------------------------------------------------------------------------
# From a folder / Hub id / model, and to a folder
# ---------------------------------------------------------------------------------------------------------------


def source_model_type(source: str | os.PathLike) -> str:
    """`model_type` in the config of a folder or Hub repository (read without building anything)."""
    config_dict, _ = PreTrainedConfig.get_config_dict(str(source))
    return config_dict.get("model_type", "")


def load_dense_backbone(source: str | os.PathLike, **kwargs: Any) -> DenseBackbone:
    """`Dinov2Backbone.from_pretrained` or `SelfPatchSiglipBackbone.from_pretrained` by the folder's model type
    (transformers 5.24's `AutoBackbone.from_pretrained` rejects local folders)."""
    model_type = source_model_type(source)
    classes = {"dinov2": Dinov2Backbone, SelfPatchSiglipBackboneConfig.model_type: SelfPatchSiglipBackbone}
    if model_type not in classes:
        raise ValueError(
            f"{source} holds a {model_type!r} model, not a dense backbone (dinov2 or "
            f"{SelfPatchSiglipBackboneConfig.model_type}); convert it with `dense_backbone` / `export_dense_backbone`."
        )
    return classes[model_type].from_pretrained(str(source), **kwargs)


def _has_pooler(source: str | os.PathLike) -> bool:
    """Whether a ViT folder's weights include a pooler (ours and converted DINO do; a Hub id is assumed to)."""
    weights = Path(source) / "model.safetensors"
    if not weights.is_file():
        return True
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return any(key.startswith("pooler.") for key in handle.keys())


def _load_source_model(source: str | os.PathLike) -> PreTrainedModel:
    model_type = source_model_type(source)
    if model_type == "vit":
        # The pooler is not part of a dense backbone, but building the ViT as saved (with or without one) keeps the
        # load free of "unexpected / newly initialised weights" reports.
        return ViTModel.from_pretrained(str(source), add_pooling_layer=_has_pooler(source))
    if model_type == "siglip_vision_model":
        return SiglipVisionModel.from_pretrained(str(source))
    if model_type in ("dinov2", SelfPatchSiglipBackboneConfig.model_type):
        return load_dense_backbone(source)
    from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig

    if (
        model_type == SelfPatchConfig.model_type
    ):  # a pretraining folder: its teacher, what the paper evaluates
        from selfpatch_hf.export.backbone import extract_backbone
        from selfpatch_hf.models.selfpatch.modeling import SelfPatchViTForPretraining

        return extract_backbone(SelfPatchViTForPretraining.from_pretrained(str(source)), "teacher")
    raise ValueError(
        f"{source} holds a {model_type!r} model. Dense backbones come from a ViTModel folder (`selfpatch export`, "
        "`selfpatch-convert` of a DINO checkpoint), a converted SelfPatch SiglipVisionModel, a SelfPatch "
        "pretraining folder, or an existing Dinov2Backbone / SelfPatchSiglipBackbone folder."
    )


def dense_backbone(source: BackboneSource, out_indices: Sequence[int] | None = None) -> DenseBackbone:
    """The dense backbone of `source`: a folder or Hub id (ViT, CLS-free SigLIP, SelfPatch pretraining model, or
    already a dense backbone), or one of those models in memory. `out_indices` None: the dense default."""
    if not isinstance(source, PreTrainedModel):
        source = _load_source_model(source)
    if isinstance(source, (Dinov2Backbone, SelfPatchSiglipBackbone)):
        return with_out_indices(source, out_indices)
    if isinstance(source, ViTModel):
        return vit_to_dinov2_backbone(source, out_indices)
    if isinstance(source, SiglipVisionModel):
        return siglip_to_backbone(source, out_indices)
    if hasattr(source, "teacher") and hasattr(source.teacher, "backbone"):  # SelfPatchViTForPretraining
        from selfpatch_hf.export.backbone import extract_backbone

        return vit_to_dinov2_backbone(extract_backbone(source, "teacher"), out_indices)
    raise TypeError(f"Cannot make a dense backbone of a {type(source).__name__}.")


def _source_image_processor(source: BackboneSource) -> ImageProcessingMixin | None:
    if isinstance(source, PreTrainedModel):
        return None
    try:
        return AutoImageProcessor.from_pretrained(str(source))
    except (OSError, ValueError):  # the source folder has no preprocessor_config.json
        return None


def export_dense_backbone(
    source: BackboneSource,
    output_dir: str | os.PathLike,
    out_indices: Sequence[int] | None = None,
    image_processor: ImageProcessingMixin | None = None,
) -> Path:
    """Writes the dense backbone of `source` as a folder (config, safetensors weights and, from `image_processor`
    or the source folder, the image processor), swapped in atomically.

    A ViT source gives a `Dinov2Backbone` folder that `Dinov2Backbone.from_pretrained` loads with no code of ours;
    a SigLIP source gives a `SelfPatchSiglipBackbone` folder (import `selfpatch_hf.models.dense.siglip_backbone` to load it).
    """
    from selfpatch_hf.atomic_folders import staged_folder

    backbone = dense_backbone(source, out_indices)
    processor = image_processor if image_processor is not None else _source_image_processor(source)
    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(target) as staging:
        backbone.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
    return target


__all__ = [
    "DenseBackbone",
    "dense_backbone",
    "dense_out_indices",
    "dinov2_config_from_vit",
    "export_dense_backbone",
    "load_dense_backbone",
    "siglip_to_backbone",
    "source_model_type",
    "vit_to_dinov2_backbone",
    "with_out_indices",
]
