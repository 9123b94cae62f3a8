"""Pretrained backbones as transformers *backbones* (`BackboneMixin`), the input of dense prediction heads.

transformers' dense heads (`UperNetForSemanticSegmentation`, `Mask2FormerForUniversalSegmentation`, the DETR family,
`DPTForDepthEstimation`, ...) take a backbone that returns feature maps of selected blocks. Our sources are not
backbones, but their weights load into native ones:

- single stride (the patch size), `dense_backbone(source)`:
  - a `ViTModel` (our `export_backbone` folders, converted DINO checkpoints) -> `Dinov2Backbone` (the same pre-norm
    blocks with a class token; DINOv2's layer scale set to 1, no SwiGLU, no mask token). Its `stageN` feature map
    is the output of block N after the ViT's final LayerNorm, without the class token, as (batch, hidden,
    height / patch, width / patch); the last stage equals the ViT's `last_hidden_state[:, 1:]` exactly;
  - a CLS-free `SiglipVisionModel` (converted released SelfPatch checkpoints) -> `SelfPatchSiglipBackbone`
    (`selfpatch_hf.models.dense.siglip_backbone`), which needs this package imported to load;
- multi-scale, strides 4, 8, 16, 32 (`dense_backbone(source, multi_scale=True)`,
  `selfpatch_hf.models.dense.multiscale`):
  - a `ViTModel` -> `BeitBackbone(add_fpn=True)`, the reference detection backbone's neck on four raw block outputs;
  - a CLS-free `SiglipVisionModel` -> `SelfPatchSiglipBackbone(add_fpn=True)`, the same neck;
- a `SwinModel` -> `SwinBackbone`, whose four stages are strides 4-32 already (with either setting).

`out_indices` default to `dense_out_indices` (4, 6, 8, 12 of 12) for a single stride and to
`multiscale_out_indices` (3, 6, 9, 12 of 12) for the neck; Swin's default to all stages. In transformers 5.24
`AutoBackbone.from_pretrained(local_folder)` fails (`HFValidationError`); `load_dense_backbone` picks the class from
the folder's `model_type` (and `architectures`) instead.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoImageProcessor,
    BeitBackbone,
    Dinov2Backbone,
    Dinov2Config,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
    SwinBackbone,
    SwinModel,
    ViTConfig,
    ViTModel,
)

from selfpatch_hf.models.dense.block_selection import (
    checked_out_indices,
    dense_out_indices,
    multiscale_out_indices,
)
from selfpatch_hf.models.dense.multiscale import swin_to_backbone, vit_to_beit_backbone
from selfpatch_hf.models.dense.siglip_backbone import SelfPatchSiglipBackbone, SelfPatchSiglipBackboneConfig

if TYPE_CHECKING:
    from transformers.image_processing_base import ImageProcessingMixin

DenseBackbone = Dinov2Backbone | SelfPatchSiglipBackbone | BeitBackbone | SwinBackbone
BackboneSource = str | os.PathLike | PreTrainedModel


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
        out_indices=checked_out_indices(out_indices, config.num_hidden_layers),
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
    model: SiglipVisionModel | SelfPatchSiglipBackbone,
    out_indices: Sequence[int] | None = None,
    *,
    multi_scale: bool = False,
) -> SelfPatchSiglipBackbone:
    """A `SelfPatchSiglipBackbone` with the weights of a head-less `SiglipVisionModel` (same module names), or of
    another `SelfPatchSiglipBackbone`. `multi_scale`: the strides 4-32 neck (freshly initialised) on the raw outputs
    of four blocks, as the reference's detection backbone reads them; otherwise normalised single-stride maps."""
    if model.config.vision_use_head:
        raise ValueError(
            "This SiglipVisionModel has an attention-pooling head; SelfPatch conversions have none "
            "(vision_use_head=False). Pass a converted SelfPatch checkpoint."
        )
    fields = model.config.to_dict()
    for key in (
        "model_type", "architectures", "transformers_version", "out_indices", "out_features", "stage_names",
        "add_fpn", "apply_layernorm",
    ):  # fmt: skip
        fields.pop(key, None)
    config = SelfPatchSiglipBackboneConfig(
        **fields,
        out_indices=checked_out_indices(out_indices, model.config.num_hidden_layers, multi_scale=multi_scale),
        add_fpn=multi_scale,
        apply_layernorm=not multi_scale,
        architectures=["SelfPatchSiglipBackbone"],
    )
    backbone = SelfPatchSiglipBackbone(config)
    state = {k: v.detach().float() for k, v in model.state_dict().items() if not k.startswith("fpn.")}
    state.update({k: v for k, v in backbone.state_dict().items() if k.startswith("fpn.")})  # a fresh neck
    backbone.load_state_dict(state, strict=True)
    return backbone.eval()


def with_out_indices(backbone: DenseBackbone, out_indices: Sequence[int] | None) -> DenseBackbone:
    """`backbone` itself with other `out_indices` (None: keep a multi-scale backbone's, else the dense default).

    A `SwinBackbone` holds one norm per selected stage, so its stages are fixed when it is built: re-export it
    from the `SwinModel` for others."""
    config = backbone.config
    if isinstance(backbone, SwinBackbone):
        if out_indices is not None and list(out_indices) != list(config.out_indices):
            raise ValueError(
                f"This SwinBackbone was built for stages {list(config.out_indices)}; build one for stages "
                f"{list(out_indices)} from the SwinModel folder instead."
            )
        return backbone
    multi_scale = bool(getattr(config, "add_fpn", False))
    if multi_scale and out_indices is None:
        return backbone
    config.out_indices = checked_out_indices(out_indices, config.num_hidden_layers, multi_scale=multi_scale)
    return backbone


# ---------------------------------------------------------------------------------------------------------------
# From a folder / Hub id / model, and to a folder
# ---------------------------------------------------------------------------------------------------------------


def source_model_type(source: str | os.PathLike) -> str:
    """`model_type` in the config of a folder or Hub repository (read without building anything)."""
    return _source_config(source).get("model_type", "")


def _source_config(source: str | os.PathLike) -> dict[str, Any]:
    text = os.fspath(source)
    # a Hub id is `name` or `namespace/name`: anything else can only be a folder, which transformers would report
    # as an invalid repo id
    if (text.startswith(("/", ".", "~")) or text.count("/") > 1) and not os.path.exists(
        os.path.expanduser(text)
    ):
        raise ValueError("no such folder; give an exported backbone folder or a Hub id")
    config_dict, _ = PreTrainedConfig.get_config_dict(text)
    return config_dict


_BACKBONE_CLASSES: dict[str, type[PreTrainedModel]] = {
    "dinov2": Dinov2Backbone,
    "beit": BeitBackbone,
    "swin": SwinBackbone,
    SelfPatchSiglipBackboneConfig.model_type: SelfPatchSiglipBackbone,
}


def _is_backbone_folder(config_dict: dict[str, Any]) -> bool:
    model_type = config_dict.get("model_type", "")
    if model_type in ("dinov2", SelfPatchSiglipBackboneConfig.model_type):
        return True
    # beit and swin folders may hold full models (BeitModel, SwinModel, ...): their architectures say which
    return model_type in _BACKBONE_CLASSES and any(
        name.endswith("Backbone") for name in config_dict.get("architectures") or ()
    )


def load_dense_backbone(source: str | os.PathLike, **kwargs: Any) -> DenseBackbone:
    """`from_pretrained` of the backbone class a folder holds: `Dinov2Backbone`, `BeitBackbone`, `SwinBackbone` or
    `SelfPatchSiglipBackbone` (transformers 5.24's `AutoBackbone.from_pretrained` rejects local folders)."""
    config_dict = _source_config(source)
    model_type = config_dict.get("model_type", "")
    if not _is_backbone_folder(config_dict):
        raise ValueError(
            f"{source} holds a {model_type!r} model ({', '.join(config_dict.get('architectures') or ['?'])}), not a "
            f"dense backbone (Dinov2Backbone, BeitBackbone, SwinBackbone, {SelfPatchSiglipBackbone.__name__}); "
            "convert it with `dense_backbone` / `export_dense_backbone`."
        )
    return _complete_from_pretrained(_BACKBONE_CLASSES[model_type], source, **kwargs)


def _complete_from_pretrained(model_class: type[PreTrainedModel], source: str | os.PathLike, **kwargs: Any):
    """`model_class.from_pretrained(source)` whose weights file holds every tensor of the model. transformers only
    reports missing tensors (and initialises them at random), so weights of another model, or a state dict of other
    keys, would otherwise fine-tune or evaluate a random backbone without a word."""
    try:
        model, info = model_class.from_pretrained(str(source), output_loading_info=True, **kwargs)
    except (SafetensorError, pickle.UnpicklingError, EOFError) as error:
        # truncated or damaged weights, or a pickle that torch's weights-only loader refuses to run
        lines = [
            line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()
        ]
        # torch's refusal of a pickle names the offending global on its "WeightsUnpickler error" line
        reason = next((line for line in lines if line.startswith("WeightsUnpickler error")), " ".join(lines))
        raise ValueError(
            f"its weights cannot be read ({type(error).__name__}: {reason[:300]}); the file is damaged, "
            "truncated or not a plain tensor file: export or download the backbone again."
        ) from None
    missing = sorted(key for key in info["missing_keys"] if not key.startswith("pooler."))
    non_finite = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if non_finite:  # training on them gives a NaN loss in the first step, which would blame the learning rate
        raise ValueError(
            f"its weights hold NaN or infinite values in {len(non_finite)} tensor(s) "
            f"({', '.join(non_finite[:3])}): the backbone is damaged; export or download it again."
        )
    if missing:
        raise ValueError(
            f"its weights lack {len(missing)} of the {model_class.__name__}'s tensors (e.g. "
            f"{', '.join(missing[:3])}), so they are not this model's weights: export, convert or download the "
            "backbone again."
        )
    return model


def _has_pooler(source: str | os.PathLike) -> bool:
    """Whether a ViT folder's weights include a pooler (ours and converted DINO do; a Hub id is assumed to)."""
    weights = Path(source) / "model.safetensors"
    if not weights.is_file():
        return True
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            return any(key.startswith("pooler.") for key in handle.keys())
    except SafetensorError:  # damaged: the load that follows says so in one line
        return True


def load_source_model(source: str | os.PathLike) -> PreTrainedModel:
    """The model a backbone source folder or Hub id holds: a `ViTModel`, `SwinModel`, CLS-free
    `SiglipVisionModel`, an existing dense backbone, or the teacher backbone of a SelfPatch pretraining folder."""
    config_dict = _source_config(source)
    model_type = config_dict.get("model_type", "")
    if _is_backbone_folder(config_dict):
        return load_dense_backbone(source)
    if model_type == "vit":
        # The pooler is not part of a dense backbone, but building the ViT as saved (with or without one) keeps the
        # load free of "unexpected / newly initialised weights" reports.
        return _complete_from_pretrained(ViTModel, source, add_pooling_layer=_has_pooler(source))
    if model_type == "swin":
        return _complete_from_pretrained(SwinModel, source, add_pooling_layer=False)
    if model_type == "siglip_vision_model":
        return _complete_from_pretrained(SiglipVisionModel, source)
    from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig

    if (
        model_type == SelfPatchConfig.model_type
    ):  # a pretraining folder: its teacher, what the paper evaluates
        from selfpatch_hf.models.selfpatch.modeling import SelfPatchForPretraining

        return SelfPatchForPretraining.from_pretrained(str(source))
    raise ValueError(
        f"{source} holds a {model_type!r} model. Dense backbones come from a ViTModel or SwinModel folder "
        "(`selfpatch export`, `selfpatch-convert` of a DINO or MoBY checkpoint), a converted SelfPatch "
        "SiglipVisionModel, a SelfPatch pretraining folder, or an existing Dinov2Backbone / BeitBackbone / "
        "SwinBackbone / SelfPatchSiglipBackbone folder."
    )


def dense_backbone(
    source: BackboneSource, out_indices: Sequence[int] | None = None, *, multi_scale: bool = False
) -> DenseBackbone:
    """The dense backbone of `source`: a folder or Hub id (ViT, Swin, CLS-free SigLIP, SelfPatch pretraining model,
    or already a dense backbone), or one of those models in memory.

    `multi_scale`: feature maps at strides 4, 8, 16, 32 (`BeitBackbone` / `SelfPatchSiglipBackbone` with the neck)
    instead of the patch size (`Dinov2Backbone` / `SelfPatchSiglipBackbone`). A Swin source always gives a
    `SwinBackbone` (its stages are multi-scale by construction). `out_indices` None: the default for the depth.
    """
    if not isinstance(source, PreTrainedModel):
        source = load_source_model(source)
    if hasattr(source, "teacher") and hasattr(source.teacher, "backbone"):  # SelfPatchForPretraining
        from selfpatch_hf.export.backbone import extract_backbone

        source = extract_backbone(source, "teacher")
    if isinstance(source, SwinBackbone):
        return with_out_indices(source, out_indices)
    if isinstance(source, SwinModel):
        return swin_to_backbone(source, out_indices)
    if isinstance(source, (Dinov2Backbone, BeitBackbone)):
        if isinstance(source, BeitBackbone) != multi_scale:
            raise ValueError(
                f"A {type(source).__name__} gives {'strides 4-32' if not multi_scale else 'a single stride'}; for "
                f"{'multi-scale' if multi_scale else 'single-stride'} features build the backbone from the ViTModel "
                "folder it came from."
            )
        return with_out_indices(source, out_indices)
    if isinstance(source, SelfPatchSiglipBackbone) and source.config.add_fpn == multi_scale:
        return with_out_indices(source, out_indices)
    if isinstance(source, ViTModel):
        convert = vit_to_beit_backbone if multi_scale else vit_to_dinov2_backbone
        return convert(source, out_indices)
    if isinstance(source, (SiglipVisionModel, SelfPatchSiglipBackbone)):
        return siglip_to_backbone(source, out_indices, multi_scale=multi_scale)
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
    *,
    multi_scale: bool = False,
) -> Path:
    """Writes the dense backbone of `source` (see `dense_backbone`) as a folder (config, safetensors weights and,
    from `image_processor` or the source folder, the image processor), swapped in atomically.

    A ViT source gives a `Dinov2Backbone` folder (`multi_scale`: a `BeitBackbone` one), a Swin source a
    `SwinBackbone` folder, all loaded by their class's `from_pretrained` with no code of ours; a SigLIP source gives
    a `SelfPatchSiglipBackbone` folder (import `selfpatch_hf.models.dense.siglip_backbone` to load it).
    """
    from selfpatch_hf.atomic_folders import staged_folder
    from selfpatch_hf.export.backbone import check_finite

    backbone = dense_backbone(source, out_indices, multi_scale=multi_scale)
    check_finite(
        backbone, f"the dense backbone of {source if isinstance(source, (str, os.PathLike)) else 'the model'}"
    )
    processor = image_processor if image_processor is not None else _source_image_processor(source)
    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(target) as staging:
        backbone.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
    return target


def random_vit(preset: str, image_size: int) -> ViTModel:
    """A randomly initialised ViT of one of `BACKBONE_PRESETS` (the fine-tuning scripts' `--backbone random:PRESET`,
    the baseline without pretraining) with position embeddings for `image_size`."""
    from selfpatch_hf.models.selfpatch.configuration import BACKBONE_PRESETS

    if preset not in BACKBONE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(BACKBONE_PRESETS))}.")
    return ViTModel(
        ViTConfig(**{**BACKBONE_PRESETS[preset], "image_size": int(image_size)}), add_pooling_layer=False
    )


__all__ = [
    "random_vit",
    "BackboneSource",
    "DenseBackbone",
    "dense_backbone",
    "dense_out_indices",
    "dinov2_config_from_vit",
    "export_dense_backbone",
    "load_dense_backbone",
    "load_source_model",
    "multiscale_out_indices",
    "siglip_to_backbone",
    "source_model_type",
    "vit_to_dinov2_backbone",
    "with_out_indices",
]
