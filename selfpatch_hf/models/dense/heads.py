"""transformers' dense prediction models around a pretrained backbone: UperNet for semantic segmentation, DPT for
depth, with the backbone's weights in place and the heads freshly initialised (detection and instance segmentation:
`selfpatch_hf.models.dense.detection`).

    >>> from selfpatch_hf.models.dense.heads import build_upernet
    >>> model = build_upernet("runs/selfpatch/backbone", {0: "wall", 1: "floor"})   # a ViTModel export
    >>> model.save_pretrained("upernet")   # AutoModelForSemanticSegmentation loads it, no code of ours needed

The backbone source is anything `selfpatch_hf.models.dense.backbones.dense_backbone` takes (a ViTModel folder -> a native
`Dinov2Backbone`, or with `multi_scale=True` a native `BeitBackbone` with the strides 4-32 neck; a SwinModel folder
-> `SwinBackbone`; a converted CLS-free SelfPatch `SiglipVisionModel` -> `SelfPatchSiglipBackbone`, whose models need
`selfpatch_hf.models.dense.siglip_backbone` imported to load).

Deviation from the paper's protocol (Sec. 4.2, ADE20K): the paper fine-tunes a Semantic FPN (mmsegmentation) on
features resampled to strides 4, 8, 16 and 32. transformers has no Semantic FPN; `build_upernet(...,
multi_scale=True)` gives UperNet (pyramid pooling + FPN fusion) on those strides-4-32 maps (the reference's neck,
`BeitBackbone(add_fpn=True)`), the default (`multi_scale=False`) UperNet on four blocks at the ViT's single stride.
The logits are upsampled bilinearly to the input size, as `UperNetForSemanticSegmentation` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from transformers import (
    BeitBackbone,
    Dinov2Backbone,
    DPTConfig,
    DPTForDepthEstimation,
    SwinBackbone,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers.image_utils import PILImageResampling

from selfpatch_hf.image_conventions import IMAGENET_MEAN, IMAGENET_STD, as_height_width
from selfpatch_hf.models.dense.backbones import BackboneSource, DenseBackbone, dense_backbone

if TYPE_CHECKING:
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil


def label_maps(
    id2label: Mapping[int, str] | Sequence[str], minimum: int = 2, task: str = "Semantic segmentation"
) -> tuple[dict[int, str], dict[str, int]]:
    """(id2label, label2id) of a list of names or a mapping id -> name, checked: ids 0..K-1, K >= `minimum`, names
    unique."""
    if not isinstance(id2label, Mapping):
        id2label = dict(enumerate(id2label))
    id2label = {int(index): str(name) for index, name in id2label.items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"Label ids must be 0..{len(id2label) - 1}, got {sorted(id2label)}.")
    if len(id2label) < minimum:
        raise ValueError(f"{task} needs at least {minimum} label{'s' if minimum > 1 else ''}.")
    label2id = {name: index for index, name in id2label.items()}
    if len(label2id) != len(id2label):
        raise ValueError(f"Label names must be unique, got {list(id2label.values())}.")
    return id2label, label2id


def set_drop_path(backbone: DenseBackbone, drop_path_rate: float) -> None:
    """Stochastic depth in the backbone's blocks for fine-tuning (ViT and Swin sources; the CLS-free SigLIP tower
    has none)."""
    if not 0 <= drop_path_rate < 1:  # also refuses NaN
        raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}.")
    if drop_path_rate == 0:
        return
    if not isinstance(backbone, (Dinov2Backbone, BeitBackbone, SwinBackbone)):
        raise ValueError(
            f"drop_path_rate needs a ViT or Swin source; {type(backbone).__name__} has no drop-path."
        )
    backbone.config.drop_path_rate = drop_path_rate


def build_upernet(
    backbone: BackboneSource,
    id2label: Mapping[int, str] | Sequence[str],
    *,
    out_indices: Sequence[int] | None = None,
    hidden_size: int = 512,
    use_auxiliary_head: bool = True,
    auxiliary_loss_weight: float = 0.4,
    ignore_index: int = 255,
    drop_path_rate: float = 0.0,
    multi_scale: bool = False,
) -> UperNetForSemanticSegmentation:
    """`UperNetForSemanticSegmentation` with the pretrained backbone of `backbone` and new decode / auxiliary heads.

    `hidden_size` is UperNet's channel width (mmseg's ViT + UperNet uses 512 or 768). The auxiliary FCN head reads the
    third feature map (block 8 of 12, or the stride-16 map); it is dropped when fewer than three are selected.
    `drop_path_rate` (stochastic depth in the backbone; ViT fine-tuning recipes use 0.1) applies to ViT and Swin
    sources. `multi_scale`: UperNet on the strides 4, 8, 16, 32 maps of the reference's neck (four blocks, default
    3, 6, 9, 12 of 12) instead of four blocks at the patch stride (a Swin source is multi-scale either way).
    """
    id2label, label2id = label_maps(id2label)
    pretrained = dense_backbone(backbone, out_indices, multi_scale=multi_scale)
    set_drop_path(pretrained, drop_path_rate)
    config = UperNetConfig(
        backbone_config=pretrained.config.to_dict(),
        hidden_size=hidden_size,
        use_auxiliary_head=use_auxiliary_head and len(pretrained.config.out_indices) >= 3,
        auxiliary_loss_weight=auxiliary_loss_weight,
        loss_ignore_index=ignore_index,
        num_labels=len(id2label),
        id2label=id2label,
        label2id=label2id,
        architectures=["UperNetForSemanticSegmentation"],
    )
    model = UperNetForSemanticSegmentation(config)
    # live names on both sides, after UperNet's own initialisation (which would otherwise overwrite them)
    model.backbone.load_state_dict(pretrained.state_dict(), strict=True)
    return model


def build_dpt(
    backbone: BackboneSource,
    *,
    out_indices: Sequence[int] | None = None,
    fusion_hidden_size: int = 256,
    drop_path_rate: float = 0.0,
) -> DPTForDepthEstimation:
    """`DPTForDepthEstimation` (DPT-DINOv2 layout: reassemble factors 4, 2, 1, 0.5) on the pretrained ViT backbone.

    DPT's reassemble stage reads a class token, so this needs a ViT source (`Dinov2Backbone`); the CLS-free SigLIP
    conversions of released SelfPatch checkpoints are refused.
    """
    pretrained = dense_backbone(backbone, out_indices)
    if not isinstance(pretrained, Dinov2Backbone):
        raise ValueError(
            "DPT's reassemble stage reads a class token; a CLS-free SelfPatch backbone has none. Use build_upernet "
            "for it, or a ViT (DINO / our export) backbone for depth."
        )
    if len(pretrained.config.out_indices) != 4:
        raise ValueError(
            f"DPT takes exactly 4 feature maps, got out_indices {pretrained.config.out_indices}."
        )
    set_drop_path(pretrained, drop_path_rate)
    pretrained.config.reshape_hidden_states = False  # DPT reshapes (and drops the class token) itself
    hidden = pretrained.config.hidden_size
    config = DPTConfig(
        backbone_config=pretrained.config.to_dict(),
        is_hybrid=False,
        hidden_size=hidden,
        patch_size=pretrained.config.patch_size,
        image_size=pretrained.config.image_size,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[hidden // 8, hidden // 4, hidden // 2, hidden],
        fusion_hidden_size=fusion_hidden_size,
        head_in_index=-1,
        use_batch_norm_in_fusion_residual=False,
        use_bias_in_fusion_residual=True,
        readout_type="project",
        architectures=["DPTForDepthEstimation"],
    )
    model = DPTForDepthEstimation(config)
    model.backbone.load_state_dict(pretrained.state_dict(), strict=True)
    return model


def build_segmentation_image_processor(
    size: int | Sequence[int] | Mapping[str, int],
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    reduce_labels: bool = False,
) -> SegformerImageProcessorPil:
    """The processor `AutoImageProcessor` maps UperNet to (Segformer's): resize to `size` (whole-image inference),
    rescale, normalise; `post_process_semantic_segmentation` (what `pipeline("image-segmentation")` calls) resizes
    the logits back to the image. `size` is `(height, width)` (or an int), or a transformers size mapping such as
    `{"shortest_edge": 512, "longest_edge": 2048}` (aspect ratio kept: mmseg's evaluation rescale). `reduce_labels`
    records the ADE20K convention for anyone preparing labels with it. Any image (grayscale, RGBA, palette) is
    converted to RGB first, as the fine-tuning data were.
    """
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    if not isinstance(size, Mapping):
        height, width = as_height_width(size, "size")
        size = {"height": height, "width": width}
    return SegformerImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size=dict(size),
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_reduce_labels=reduce_labels,
    )


__all__ = ["build_dpt", "build_segmentation_image_processor", "build_upernet", "label_maps", "set_drop_path"]
