"""Multi-scale (strides 4, 8, 16, 32) backbones for detection and segmentation heads, all native transformers classes.

The paper's dense tasks (Sec. 4.2: Mask R-CNN + FPN on COCO, Semantic FPN on ADE20K) read a ViT at four blocks and
resample them to strides 4-32 (the reference's `SelfPatch_ViT` detection backbone, BEiT's recipe): ConvTranspose
2x2 -> BatchNorm -> GELU -> ConvTranspose 2x2 (x4), ConvTranspose 2x2 (x2), identity, MaxPool 2x2 (/2), on the raw
block outputs (no output norm). transformers holds exactly this as `BeitBackbone(add_fpn=True)` (`BeitFPNNeck`),
and a plain ViT's weights load into it:

- `BeitConfig(use_absolute_position_embeddings=True, use_relative_position_bias=False, layer_scale_init_value=0,
  use_mean_pooling=False)` computes a ViT: the same pre-norm blocks, class token and absolute position embeddings
  (interpolated bicubically for other input sizes, as `ViTModel(..., interpolate_pos_encoding=True)` does);
- weights `X` -> `beit.X`, except every key-projection bias, which BEiT does not have and does not need: a key
  bias adds the same q . b to all the logits of one query, and softmax ignores a constant shift;
- the neck is new (freshly initialised, as the reference's is at the start of fine-tuning).

Swin needs no neck: `SwinBackbone` returns its four stages (strides 4, 8, 16, 32 for Swin-T), each through a
LayerNorm; the last takes the `SwinModel`'s output norm (the trained patch representation), the others start as
identity norms (as in the Swin detection code, which adds fresh norms to its outputs).

The CLS-free SelfPatch conversions (`SiglipVisionModel`) use `SelfPatchSiglipBackbone(add_fpn=True)`, the same
neck on the same raw block outputs (`selfpatch_hf.models.dense.backbones.siglip_to_backbone`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BeitBackbone, BeitConfig, SwinBackbone, SwinConfig, SwinModel, ViTConfig, ViTModel

from selfpatch_hf.models.dense.block_selection import checked_out_indices

MultiscaleBackbone = BeitBackbone | SwinBackbone


def beit_config_from_vit(config: ViTConfig, out_indices: Sequence[int] | None = None) -> BeitConfig:
    """A `BeitConfig` whose `BeitBackbone` computes a `ViTModel` of `config` and adds the strides 4-32 neck on
    `out_indices` (default: a quarter, half, three quarters and all of the depth)."""
    return BeitConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        use_mask_token=False,
        use_absolute_position_embeddings=True,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=0.0,  # no layer scale: a plain ViT block
        drop_path_rate=0.0,  # BeitConfig's default is 0.1; fine-tuning sets its own
        use_mean_pooling=False,
        reshape_hidden_states=True,
        add_fpn=True,
        out_indices=checked_out_indices(out_indices, config.num_hidden_layers, multi_scale=True),
        architectures=["BeitBackbone"],
    )


def _vit_to_beit_name(name: str) -> str | None:
    """Live `ViTModel` parameter name -> live `BeitBackbone` name (None: BEiT has no such weight)."""
    if name.startswith("pooler.") or name.endswith(".attention.k_proj.bias"):
        return None
    return f"beit.{name}"


def vit_to_beit_backbone(vit: ViTModel, out_indices: Sequence[int] | None = None) -> BeitBackbone:
    """A `BeitBackbone` (strides 4-32 neck freshly initialised) holding the weights of `vit`; its hidden states
    equal the ViT's to float rounding (the dropped key biases change the logits by a per-query constant only)."""
    backbone = BeitBackbone(beit_config_from_vit(vit.config, out_indices))
    state = {}
    for name, tensor in vit.state_dict().items():
        target = _vit_to_beit_name(name)
        if target is not None:
            state[target] = tensor.detach().float()
    if not vit.config.qkv_bias:  # BEiT always has query and value biases: zero is the bias-free ViT
        for layer in range(vit.config.num_hidden_layers):
            for which in ("q_proj", "v_proj"):
                state[f"beit.layers.{layer}.attention.{which}.bias"] = torch.zeros(vit.config.hidden_size)
    neck = {name: tensor for name, tensor in backbone.state_dict().items() if name.startswith("fpn.")}
    # live names on both sides: a strict in-memory copy; the neck keeps its fresh initialisation
    backbone.load_state_dict({**state, **neck}, strict=True)
    return backbone.eval()


def swin_backbone_config(config: SwinConfig, out_indices: Sequence[int] | None = None) -> SwinConfig:
    """The `SwinConfig` of a `SwinBackbone` over the stages `out_indices` of a `SwinModel` (default: all)."""
    num_stages = len(config.depths)
    indices = (
        list(range(1, num_stages + 1))
        if out_indices is None
        else checked_out_indices(out_indices, num_stages, unit="stage")
    )
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "out_indices", "out_features"):
        fields.pop(key, None)
    fields["drop_path_rate"] = 0.0
    return SwinConfig(**fields, out_indices=indices, architectures=["SwinBackbone"])


def swin_to_backbone(swin: SwinModel, out_indices: Sequence[int] | None = None) -> SwinBackbone:
    """A `SwinBackbone` with the weights of `swin`: the last stage's norm is the model's output norm, the earlier
    stages' norms start as the identity (weight 1, bias 0)."""
    backbone = SwinBackbone(swin_backbone_config(swin.config, out_indices))
    state = {f"swin.{name}": tensor.detach().float() for name, tensor in swin.state_dict().items()}
    last_stage = f"stage{len(swin.config.depths)}"
    for stage, norm in backbone.hidden_states_norms.items():
        if stage == last_stage:
            weight, bias = swin.layernorm.weight, swin.layernorm.bias
        else:
            weight, bias = torch.ones_like(norm.weight), torch.zeros_like(norm.bias)
        state[f"hidden_states_norms.{stage}.weight"] = weight.detach().float()
        state[f"hidden_states_norms.{stage}.bias"] = bias.detach().float()
    backbone.load_state_dict(state, strict=True)
    return backbone.eval()


def feature_strides(backbone: MultiscaleBackbone | torch.nn.Module) -> list[int]:
    """The stride (input pixels per feature-map cell) of each feature map a multi-scale backbone returns."""
    config = backbone.config
    if isinstance(backbone, SwinBackbone):
        return [
            config.patch_size * 2 ** (int(stage.removeprefix("stage")) - 1) for stage in backbone.out_features
        ]
    if not getattr(config, "add_fpn", False):
        raise ValueError(f"{type(backbone).__name__} without add_fpn has a single stride (its patch size).")
    patch = config.patch_size
    if patch % 4:
        raise ValueError(f"The strides 4-32 neck needs a patch size divisible by 4, got {patch}.")
    return [patch // 4, patch // 2, patch, patch * 2]


__all__ = [
    "MultiscaleBackbone",
    "beit_config_from_vit",
    "feature_strides",
    "swin_backbone_config",
    "swin_to_backbone",
    "vit_to_beit_backbone",
]
