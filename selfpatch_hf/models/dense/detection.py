"""transformers' detection and instance-segmentation models around a pretrained multi-scale backbone, with the
backbone's weights in place and the heads freshly initialised, plus their image processors.

    >>> from selfpatch_hf.models.dense.detection import build_deformable_detr, build_mask2former
    >>> detector = build_deformable_detr("runs/selfpatch/backbone", ["person", "car"])   # a ViTModel export
    >>> segmenter = build_mask2former("runs/selfpatch/backbone", ["person", "car"])
    >>> detector.save_pretrained("detector")   # AutoModelForObjectDetection loads it, no code of ours needed

The paper's COCO task (Sec. 4, Table 1) fine-tunes Mask R-CNN + FPN on the strides 4-32 maps of the reference's
neck. transformers has no Mask R-CNN; its counterparts that take a `backbone_config` are:

- `Mask2FormerForUniversalSegmentation` (instance masks, and boxes from them): a multi-scale deformable-attention
  pixel decoder over the stride 8-32 maps, mask features from the stride-4 map, 100 mask queries;
- `DeformableDetrForObjectDetection` (boxes): multi-scale deformable attention over all four maps. Of the DETR
  family it is the one that fits: RT-DETR and D-FINE expect three maps at strides 8-32 (the neck gives four), and
  DETR, Conditional DETR and DAB-DETR read the stride-32 map only; from fresh heads on the offline instances it
  learns the most per step and no less per CPU second (`benchmarks/detector_choice_study.py`, BENCHMARKS.md).

The backbone source is anything `selfpatch_hf.models.dense.backbones.dense_backbone` takes; by default the
multi-scale one (`BeitBackbone(add_fpn=True)` for a ViT, `SwinBackbone` for a Swin, `SelfPatchSiglipBackbone(
add_fpn=True)` for a CLS-free SelfPatch conversion, which needs this package imported to load). The neck starts
freshly initialised, as the reference's does. DETR-family models freeze every BatchNorm of their backbone (transformers
swaps them for frozen copies); in the neck that is the one between fpn1's transposed convolutions, which then stays
at its initial identity statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import (
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DeformableDetrImageProcessorPil,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessorPil,
    PreTrainedModel,
    SwinBackbone,
)
from transformers.image_utils import PILImageResampling

from selfpatch_hf.image_conventions import IMAGENET_MEAN, IMAGENET_STD
from selfpatch_hf.models.dense.backbones import BackboneSource, DenseBackbone, dense_backbone
from selfpatch_hf.models.dense.heads import label_maps, set_drop_path
from selfpatch_hf.models.dense.multiscale import feature_strides

# COCO's evaluation scale (DETR's and the reference Mask R-CNN's test resize)
COCO_SHORTEST_EDGE = 800
COCO_LONGEST_EDGE = 1333


def _strides(backbone: DenseBackbone) -> list[int]:
    if isinstance(backbone, SwinBackbone) or getattr(backbone.config, "add_fpn", False):
        return feature_strides(backbone)
    return [backbone.config.patch_size] * len(backbone.config.out_indices)  # single-stride maps


def _pretrained(
    backbone: BackboneSource, out_indices: Sequence[int] | None, multi_scale: bool, drop_path_rate: float
) -> DenseBackbone:
    pretrained = dense_backbone(backbone, out_indices, multi_scale=multi_scale)
    set_drop_path(pretrained, drop_path_rate)
    return pretrained


def load_backbone_weights(model: PreTrainedModel, pretrained: DenseBackbone) -> None:
    """Copy `pretrained` into the backbone inside `model` (found by its class), after the model's own
    initialisation. Every pretrained weight must land; only the neck's BatchNorm may differ (the DETR family swaps
    it for a frozen one, whose buffers keep their initial identity statistics)."""
    target = next((m for m in model.modules() if type(m) is type(pretrained)), None)
    if target is None:
        raise TypeError(f"{type(model).__name__} holds no {type(pretrained).__name__}.")
    own = target.state_dict()
    state = {k: v for k, v in pretrained.state_dict().items() if k in own and own[k].shape == v.shape}
    result = target.load_state_dict(state, strict=False)
    unloaded = [k for k in pretrained.state_dict() if k not in state and not k.startswith("fpn.")]
    missing = [k for k in result.missing_keys if not k.startswith("fpn.")]
    if unloaded or missing:
        raise RuntimeError(f"backbone weights did not line up: unused {unloaded[:3]}, missing {missing[:3]}")


def build_mask2former(
    backbone: BackboneSource,
    id2label: Mapping[int, str] | Sequence[str],
    *,
    out_indices: Sequence[int] | None = None,
    multi_scale: bool = True,
    num_queries: int = 100,
    hidden_dim: int = 256,
    feature_size: int = 256,
    encoder_layers: int = 6,
    decoder_layers: int = 10,
    drop_path_rate: float = 0.0,
    **config_overrides: Any,
) -> Mask2FormerForUniversalSegmentation:
    """`Mask2FormerForUniversalSegmentation` (instance segmentation) on the pretrained backbone of `backbone`, with
    a new pixel decoder, transformer decoder and class / mask heads (Mask2Former's COCO instance defaults).

    `out_indices`: the four ViT blocks of the neck (default 3, 6, 9, 12 of 12; the reference's Mask R-CNN took 4, 6,
    8, 12) or Swin stages. `multi_scale=False`: four maps at the patch stride (`Dinov2Backbone`), masks at that
    stride. `config_overrides`: any other `Mask2FormerConfig` field (e.g. `train_num_points`)."""
    id2label, label2id = label_maps(id2label, minimum=1, task="Instance segmentation")
    pretrained = _pretrained(backbone, out_indices, multi_scale, drop_path_rate)
    strides = _strides(pretrained)
    config = Mask2FormerConfig(
        backbone_config=pretrained.config.to_dict(),
        feature_strides=strides,
        common_stride=min(strides),  # mask features at the finest map
        num_queries=num_queries,
        hidden_dim=hidden_dim,
        feature_size=feature_size,
        mask_feature_size=feature_size,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        num_labels=len(id2label),
        id2label=id2label,
        label2id=label2id,
        architectures=["Mask2FormerForUniversalSegmentation"],
        **config_overrides,
    )
    model = Mask2FormerForUniversalSegmentation(config)
    load_backbone_weights(model, pretrained)
    return model


def build_deformable_detr(
    backbone: BackboneSource,
    id2label: Mapping[int, str] | Sequence[str],
    *,
    out_indices: Sequence[int] | None = None,
    multi_scale: bool = True,
    num_queries: int = 300,
    d_model: int = 256,
    encoder_layers: int = 6,
    decoder_layers: int = 6,
    with_box_refine: bool = False,
    two_stage: bool = False,
    drop_path_rate: float = 0.0,
    **config_overrides: Any,
) -> DeformableDetrForObjectDetection:
    """`DeformableDetrForObjectDetection` on the pretrained backbone of `backbone` (all four feature maps as
    Deformable DETR's four levels), with a new encoder, decoder and heads (Deformable DETR's defaults, auxiliary
    decoding losses on). `with_box_refine` / `two_stage`: the paper's refinements (two_stage needs box refine).
    `config_overrides`: any other `DeformableDetrConfig` field (e.g. `encoder_ffn_dim`)."""
    id2label, label2id = label_maps(id2label, minimum=1, task="Detection")
    if decoder_layers < 2:
        raise ValueError(
            f"decoder_layers must be >= 2 (transformers' Deformable DETR ties its box heads across layers), got "
            f"{decoder_layers}."
        )
    pretrained = _pretrained(backbone, out_indices, multi_scale, drop_path_rate)
    config = DeformableDetrConfig(
        backbone_config=pretrained.config.to_dict(),
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_feature_levels=len(pretrained.config.out_indices),
        num_queries=num_queries,
        d_model=d_model,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        with_box_refine=with_box_refine,
        two_stage=two_stage,
        auxiliary_loss=config_overrides.pop("auxiliary_loss", True),
        num_labels=len(id2label),
        id2label=id2label,
        label2id=label2id,
        architectures=["DeformableDetrForObjectDetection"],
        **config_overrides,
    )
    model = DeformableDetrForObjectDetection(config)
    load_backbone_weights(model, pretrained)
    return model


def _evaluation_size(shortest_edge: int, longest_edge: int) -> dict[str, int]:
    if not 1 <= shortest_edge <= longest_edge:
        raise ValueError(
            f"need 1 <= shortest_edge <= longest_edge, got shortest_edge {shortest_edge}, longest_edge {longest_edge}."
        )
    return {"shortest_edge": int(shortest_edge), "longest_edge": int(longest_edge)}


def build_detection_image_processor(
    shortest_edge: int = COCO_SHORTEST_EDGE,
    longest_edge: int = COCO_LONGEST_EDGE,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> DeformableDetrImageProcessorPil:
    """The processor `AutoImageProcessor` maps Deformable DETR to: RGB, resize (shorter side `shortest_edge`,
    longer at most `longest_edge`, bilinear), rescale, ImageNet normalisation; `post_process_object_detection`
    (what `pipeline("object-detection")` calls) scales the boxes back to the image."""
    return DeformableDetrImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size=_evaluation_size(shortest_edge, longest_edge),
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_pad=True,
        format="coco_detection",
    )


def build_instance_segmentation_image_processor(
    shortest_edge: int = COCO_SHORTEST_EDGE,
    longest_edge: int = COCO_LONGEST_EDGE,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> Mask2FormerImageProcessorPil:
    """The processor `AutoImageProcessor` maps Mask2Former to: RGB, resize (as the detection one), rescale, ImageNet
    normalisation, padding to multiples of 32; `post_process_instance_segmentation` (what
    `pipeline("image-segmentation", subtask="instance")` calls) resizes the masks back to the image."""
    return Mask2FormerImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size=_evaluation_size(shortest_edge, longest_edge),
        resample=PILImageResampling.BILINEAR,
        size_divisor=32,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
        ignore_index=255,
        do_reduce_labels=False,
    )


__all__ = [
    "COCO_LONGEST_EDGE",
    "COCO_SHORTEST_EDGE",
    "build_deformable_detr",
    "build_detection_image_processor",
    "build_instance_segmentation_image_processor",
    "build_mask2former",
    "load_backbone_weights",
]
