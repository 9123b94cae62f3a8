"""The backbone f of both networks (docs/method.md section 2): a `transformers.ViTModel` or `SwinModel`, with the
student's stochastic depth, and what the rest of the model reads from it.

Both stay plain transformers backbones: the same modules, names and weights, so `export_backbone` copies them into
a fresh `ViTModel` / `SwinModel` key for key and the exported folder needs nothing from this package. Two of their
layers are replaced by subclasses that change only how a layer computes, never what it holds:

- `StochasticDepthViTLayer`: a `ViTLayer` with per-sample stochastic depth on its two residual branches (the
  student's drop-path, linear in depth; DINO / timm); the teacher keeps plain `ViTLayer`s.
- `WindowKeepingSwinLayer`: a `SwinLayer` that keeps its window on grids smaller than the window and pads the grid
  into it (docs/moby_swin.md, "Small crops"), where transformers' own layer would shrink the window below its
  relative-position table and fail.

Both are built around the modules of the layer they replace (`_rebuilt_around`), so building the model draws the
same random numbers and initialises every weight exactly as plain transformers backbones do.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn
from transformers import SwinConfig, SwinModel, ViTConfig, ViTModel
from transformers.models.swin.modeling_swin import SwinLayer
from transformers.models.vit.modeling_vit import ViTLayer

if TYPE_CHECKING:
    from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig

LayerType = TypeVar("LayerType", bound=nn.Module)


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, zeroes a residual branch for a random `drop_prob` share of the
    samples and scales the others by `1 / (1 - drop_prob)`. No weights."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class StochasticDepthViTLayer(ViTLayer):
    """A `ViTLayer` whose two residual branches (attention, MLP) go through stochastic depth (`drop_path`).

    Same submodules and weights as `ViTLayer` (`DropPath` has none). Stochastic depth takes the place of the
    layer's residual dropout, which the config requires to be 0 with it (`hidden_dropout_prob`), as in DINO.
    """

    def __init__(self, config: ViTConfig, drop_path_rate: float):
        super().__init__(config)
        self.drop_path = DropPath(drop_path_rate)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = self.drop_path(hidden_states) + residual
        residual = hidden_states
        hidden_states = self.mlp(self.layernorm_after(hidden_states))
        return self.drop_path(hidden_states) + residual


class WindowKeepingSwinLayer(SwinLayer):
    """A `SwinLayer` that attends in its configured window on every grid.

    `SwinLayer.forward` starts with `set_shift_and_window_size(grid)`; transformers' version shrinks the window to
    a grid smaller than it (which then no longer matches the relative-position table: an error) and never restores
    a window or shift it changed for an earlier, smaller input. Here every call sets the configured window, padded
    when the grid is smaller, and the configured shift unless the grid fits in one window (no shift then, as in
    `SwinModel` and the reference Swin). On grids at least one window wide this is exactly what `SwinModel`
    computes. Being part of `forward`, it also holds when activation checkpointing recomputes the layer.
    """

    def __init__(
        self,
        config: SwinConfig,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        drop_path_rate: float = 0.0,
        shift_size: int = 0,
    ):
        super().__init__(config, dim, input_resolution, num_heads, drop_path_rate, shift_size)
        self.configured_window_size = config.window_size
        self.configured_shift_size = shift_size

    def set_shift_and_window_size(self, input_resolution: tuple[int, int]) -> None:
        self.window_size = self.configured_window_size
        fits_in_one_window = min(input_resolution) <= self.configured_window_size
        self.shift_size = 0 if fits_in_one_window else self.configured_shift_size


def _rebuilt_around(layer: nn.Module, layer_class: type[LayerType], *args) -> LayerType:
    """A `layer_class(*args)` (a subclass of `type(layer)`) that holds `layer`'s own submodules.

    Built on the meta device, so that it allocates nothing and draws no random numbers, then given the submodules
    (and with them every parameter and buffer) of `layer`: the weights stay those that the backbone's own
    initialisation gave them."""
    with torch.device("meta"):
        rebuilt = layer_class(*args)
    for name, child in layer.named_children():
        setattr(rebuilt, name, child)
    return rebuilt.train(layer.training)


def build_backbone(config: SelfPatchConfig, drop_path_rate: float = 0.0) -> ViTModel | SwinModel:
    """The backbone of `config`, without pooler, with stochastic depth up to `drop_path_rate` (linear in depth).

    ViT: `drop_path_rate > 0` gives `StochasticDepthViTLayer`s. Swin: its own stochastic depth (linear over all
    blocks, as in Swin and MoBY) from a copy of the backbone config, so the stored one keeps 0 and exported backbones
    have none; every block is a `WindowKeepingSwinLayer`.
    """
    if config.backbone_type == "swin":
        backbone_config = copy.deepcopy(config.backbone_config)
        backbone_config.drop_path_rate = drop_path_rate
        backbone = SwinModel(backbone_config, add_pooling_layer=False)
        for stage_index, stage in enumerate(backbone.encoder.layers):
            for index, block in enumerate(stage.blocks):
                stage.blocks[index] = _rebuilt_around(
                    block,
                    WindowKeepingSwinLayer,
                    backbone_config,
                    block.layernorm_before.normalized_shape[0],
                    block.input_resolution,
                    backbone_config.num_heads[stage_index],
                    0.0,  # the block's own drop-path module is kept
                    block.shift_size,
                )
        return backbone
    backbone = ViTModel(config.backbone_config, add_pooling_layer=False)
    if drop_path_rate > 0:
        rates = torch.linspace(0, drop_path_rate, config.backbone_config.num_hidden_layers).tolist()
        for index, rate in enumerate(rates):
            backbone.layers[index] = _rebuilt_around(
                backbone.layers[index], StochasticDepthViTLayer, config.backbone_config, rate
            )
    return backbone


def encode(backbone: ViTModel | SwinModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, 3, H, W)` -> raw patch features f `(B, N, D)` (last layer / last stage, before the output norm) and the
    backbone's `last_hidden_state` `(B, prefix + N, D)` (output norm applied; a ViT's CLS first): what an exported
    backbone returns."""
    if isinstance(backbone, SwinModel):
        # SwinModel.forward without its pooler: embeddings, stages, output norm
        embeddings, grid = backbone.embeddings(pixel_values)
        features = backbone.encoder(embeddings, grid).last_hidden_state
        return features, backbone.layernorm(features)
    outputs = backbone(pixel_values, interpolate_pos_encoding=True, output_hidden_states=[-1])
    # hidden_states are taken before the final layernorm (tie_last_hidden_states=False in ViTModel)
    return outputs.hidden_states[-1][:, 1:], outputs.last_hidden_state


__all__ = [
    "DropPath",
    "StochasticDepthViTLayer",
    "WindowKeepingSwinLayer",
    "build_backbone",
    "encode",
]
