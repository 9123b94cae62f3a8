"""A transformers backbone (`BackboneMixin`) over the CLS-free SigLIP vision tower that holds released SelfPatch
checkpoints, so that dense heads (`UperNetForSemanticSegmentation`, `DPTForDepthEstimation`) can use them.

The reference SelfPatch backbone has no class token (the paper's Sec. 3.2 aggregates the patch tokens instead), so
its exact conversion is a `SiglipVisionModel` without a head (see `selfpatch_hf.conversion.dino_selfpatch`); it cannot be loaded into
`Dinov2Backbone`, whose sequence always starts with a class token. `SelfPatchSiglipBackbone` has the same modules
and weight names as `SiglipVisionModel` and returns the hidden states after the selected blocks, normalised by the
tower's output norm (`post_layernorm`, the aggregation module's final norm in the reference checkpoint) and
reshaped to `(batch, hidden_size, height / patch, width / patch)` feature maps, as `Dinov2Backbone` does.

With `add_fpn=True` it is the multi-scale backbone of the reference's detection and segmentation code: four blocks'
raw outputs (no output norm, as there) go through transformers' `BeitFPNNeck` (the same module and weight names as
`BeitBackbone(add_fpn=True)`), giving strides patch / 4, patch / 2, patch and 2 x patch (4, 8, 16, 32 for 16-pixel
patches).

It is not a transformers class: loading a model that contains it needs this module imported first, which
registers it with `AutoConfig` and `AutoBackbone`:

    >>> import selfpatch_hf.models.dense.siglip_backbone  # or selfpatch_hf.register_auto_classes()
    >>> model = AutoModelForSemanticSegmentation.from_pretrained("runs/upernet-selfpatch")
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoBackbone, AutoConfig, SiglipVisionConfig
from transformers import initialization as init
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin
from transformers.modeling_outputs import BackboneOutput
from transformers.models.beit.modeling_beit import BeitFPNNeck
from transformers.models.siglip.modeling_siglip import (
    SiglipEncoder,
    SiglipPreTrainedModel,
    SiglipVisionEmbeddings,
)


class SelfPatchSiglipBackboneConfig(BackboneConfigMixin, SiglipVisionConfig):
    """`SiglipVisionConfig` plus the backbone fields: `out_indices` / `out_features` over the stages `stem`
    (the embeddings) and `stage1` ... `stageN` (the output of block N), `apply_layernorm` (normalise each
    feature map with `post_layernorm`) and `add_fpn` (resample four feature maps to strides patch / 4 ... 2 x patch
    with BEiT's neck)."""

    model_type = "selfpatch_siglip_backbone"
    base_config_key = ""
    apply_layernorm: bool = True
    add_fpn: bool = False
    vision_use_head: bool = False

    def __post_init__(self, **kwargs):
        if self.vision_use_head:
            raise ValueError(
                "A SelfPatch backbone has no attention-pooling head: vision_use_head must be False."
            )
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        if self.add_fpn and len(self.out_indices) != 4:
            raise ValueError(
                f"add_fpn resamples exactly 4 feature maps; got out_indices {list(self.out_indices)}."
            )
        super().__post_init__(**kwargs)


class SelfPatchSiglipBackbone(BackboneMixin, SiglipPreTrainedModel):
    """Feature maps of selected blocks of a CLS-free SigLIP vision tower, for dense prediction heads.

    Any input size whose sides are multiples of the patch size works: the position grid is interpolated
    (bicubic, as `SiglipVisionModel(..., interpolate_pos_encoding=True)` does). With `add_fpn`, other sizes are
    accepted as `BeitBackbone` accepts them: the rows and columns past the last whole patch are not seen.
    """

    config: SelfPatchSiglipBackboneConfig
    config_class = SelfPatchSiglipBackboneConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "vision_model"
    # UperNet asks backbones with attentions for them; this one returns feature maps (and hidden states) only.
    has_attentions = False

    def __init__(self, config: SelfPatchSiglipBackboneConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fpn = BeitFPNNeck(config) if config.add_fpn else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The neck starts as BEiT's does (normal with BeitConfig's default initializer_range 0.02; SigLIP's config
        # has no such field), so that both multi-scale backbones begin fine-tuning alike.
        if isinstance(module, nn.ConvTranspose2d):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        else:
            super()._init_weights(module)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        batch_size, _, height, width = pixel_values.shape
        patch = self.config.patch_size
        if (height % patch or width % patch) and not self.config.add_fpn:
            raise ValueError(f"Input sides ({height}, {width}) must be multiples of the patch size {patch}.")
        # (batch, height / patch * width / patch, hidden), row-major patches, no class token
        hidden_state = self.embeddings(pixel_values, interpolate_pos_encoding=True)
        hidden_states = [hidden_state]
        for layer in self.encoder.layers:
            hidden_state = layer(hidden_state, None)
            hidden_states.append(hidden_state)

        feature_maps = []
        for stage, state in zip(self.stage_names, hidden_states):
            if stage not in self.out_features:
                continue
            if self.config.apply_layernorm:
                state = self.post_layernorm(state)
            # (batch, tokens, hidden) -> (batch, hidden, height / patch, width / patch)
            state = state.reshape(batch_size, height // patch, width // patch, -1).permute(0, 3, 1, 2)
            feature_maps.append(state.contiguous())
        if self.fpn is not None:
            # (batch, hidden, h, w) x 4 -> strides patch / 4, patch / 2, patch, 2 x patch
            feature_maps = list(self.fpn(tuple(feature_maps)))

        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output = BackboneOutput(
            feature_maps=tuple(feature_maps),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


def register() -> None:
    """Make `AutoConfig` / `AutoBackbone` (and so `UperNetForSemanticSegmentation.from_pretrained`) know the class.
    Idempotent: importing this module calls it."""
    try:
        AutoConfig.register(SelfPatchSiglipBackboneConfig.model_type, SelfPatchSiglipBackboneConfig)
    except ValueError:  # already registered (a re-import)
        pass
    try:
        AutoBackbone.register(SelfPatchSiglipBackboneConfig, SelfPatchSiglipBackbone)
    except ValueError:
        pass


register()

__all__ = ["SelfPatchSiglipBackbone", "SelfPatchSiglipBackboneConfig", "register"]
