"""timm-style ViT backbones (DINO, SelfPatch, MoBY's DeiT-S) -> `transformers` models, and their reference forward.

The reference code builds its ViTs from timm's `VisionTransformer` layout: `patch_embed.proj` (a Conv2d), an
optional `cls_token`, `pos_embed` (with the class position when there is a CLS token), pre-norm `blocks.N` with a
fused `attn.qkv` (rows [0:D] query, [D:2D] key, [2D:3D] value; docs/method.md section 11), exact-GELU MLPs, and a
final `norm` for DINO. The architecture is read off the weights (the head count, which weights do not show, comes
from an option, the checkpoint's recorded architecture name, or the standard count for the width).

- With a CLS token (DINO, MoBY's DeiT) the backbone becomes a `ViTModel` whose `pooler_output` is the normalised CLS
  token (an identity pooler, so `AutoModel` adds nothing random).
- Without one (SelfPatch) it becomes a `SiglipVisionModel` without head: `ViTModel` always prepends a CLS token,
  which would take part in attention and change every patch feature.

`reference_backbone_forward` is the reference forward pass written from that layout on the raw state dict: the
converters compare every converted folder, reloaded with `AutoModel`, against it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from selfpatch_hf.conversion.checkpoints import ConversionError, majority, numbered, sizes_of

if TYPE_CHECKING:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTModel

LAYER_NORM_EPS = 1e-6  # timm/DINO ViTs: partial(nn.LayerNorm, eps=1e-6)
# Reference architecture names (`--arch` of the reference scripts; DeiT names are aliases) -> (hidden, heads).
REFERENCE_ARCHS: dict[str, tuple[int, int]] = {
    "vit_tiny": (192, 3),
    "vit_small": (384, 6),
    "vit_base": (768, 12),
    "deit_tiny": (192, 3),
    "deit_small": (384, 6),
}
DEFAULT_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12}


@dataclass
class BackboneArchitecture:
    """The shape of a timm-style ViT backbone."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    image_size: int
    has_cls_token: bool
    arch_name: str

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def describe(self) -> str:
        return (
            f"{self.arch_name}/{self.patch_size}, {self.num_hidden_layers} layers, hidden {self.hidden_size}, "
            f"{self.num_attention_heads} heads, {self.image_size} px grid"
        )


def _arch_from_name(name: str) -> tuple[int, int]:
    name = name.replace("-", "_")
    if name not in REFERENCE_ARCHS:
        raise ConversionError(f"Unknown architecture {name!r}; known: {', '.join(sorted(REFERENCE_ARCHS))}.")
    return REFERENCE_ARCHS[name]


def infer_vit_architecture(
    state: Mapping[str, torch.Tensor],
    *,
    where: str,
    has_cls_token: bool,
    recorded_arch: str | None = None,
    arch: str | None = None,
    num_heads: int | None = None,
) -> BackboneArchitecture:
    """Reads the architecture off the weights; the head count (invisible in weights) comes from, in order:
    `num_heads`, `arch`, the checkpoint's `recorded_arch` (`args.arch`, MoBY's encoder name), or the standard
    ViT-Ti/S/B head count for the width."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise ConversionError(
            f"{where}: patch_embed.proj.weight must be a (D, 3, p, p) conv kernel, got "
            f"{None if proj is None else tuple(proj.shape)}."
        )
    patch = proj.shape[-1]
    block_ids = numbered(state, r"blocks\.(\d+)\.")
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise ConversionError(f"{where}: transformer blocks must be numbered 0..L-1, found {block_ids}.")
    hidden = majority(
        sizes_of(state, [("patch_embed.proj.weight", 0), ("patch_embed.proj.bias", 0), ("pos_embed", -1)])
        + sizes_of(
            state,
            [
                (f"blocks.{n}.{name}", axis)
                for n in block_ids
                for name, axis in (
                    ("norm1.weight", 0),
                    ("norm1.bias", 0),
                    ("norm2.weight", 0),
                    ("norm2.bias", 0),
                    ("attn.proj.weight", 0),
                    ("attn.proj.bias", 0),
                    ("mlp.fc2.bias", 0),
                )
            ],
        )
    )
    intermediate = majority(
        sizes_of(
            state,
            [
                (f"blocks.{n}.{name}", axis)
                for n in block_ids
                for name, axis in (("mlp.fc1.weight", 0), ("mlp.fc1.bias", 0), ("mlp.fc2.weight", 1))
            ],
        )
    )
    if intermediate is None:
        raise ConversionError(
            f"{where}: no MLP weights (blocks.N.mlp.fc1.weight) to read the MLP width from."
        )
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3:
        raise ConversionError(
            f"{where}: pos_embed must be (1, N, D), got {None if pos is None else tuple(pos.shape)}."
        )
    num_patches = pos.shape[1] - int(has_cls_token)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ConversionError(
            f"{where}: pos_embed has {pos.shape[1]} positions; a square grid needs a square number of patch positions "
            f"({'plus one class position ' if has_cls_token else ''}e.g. 196 for 224/16)."
        )

    recorded = recorded_arch.replace("-", "_") if isinstance(recorded_arch, str) else None
    if num_heads is not None:
        heads, source = num_heads, "--num-heads"
    elif arch is not None:
        arch_hidden, heads = _arch_from_name(arch)
        source = f"--arch {arch}"
        if arch_hidden != hidden:
            raise ConversionError(
                f"--arch {arch} has hidden size {arch_hidden}, but the weights have {hidden}."
            )
    elif recorded in REFERENCE_ARCHS:
        arch_hidden, heads = REFERENCE_ARCHS[recorded]
        source = f"the checkpoint's args.arch={recorded_arch!r}"
        if arch_hidden != hidden:
            raise ConversionError(
                f"args.arch={recorded_arch!r} has hidden size {arch_hidden}, but the weights have {hidden}."
            )
    elif hidden in DEFAULT_HEADS_BY_WIDTH:
        heads, source = DEFAULT_HEADS_BY_WIDTH[hidden], f"the standard head count of width {hidden}"
    else:
        raise ConversionError(
            f"{where}: cannot tell the number of attention heads of a width-{hidden} ViT (weights do not show it); "
            "pass --num-heads."
        )
    if heads < 1 or hidden % heads:
        raise ConversionError(
            f"{heads} attention heads (from {source}) do not divide the hidden size {hidden}."
        )
    name = arch
    if name is None and recorded is not None and REFERENCE_ARCHS.get(recorded, (0,))[0] == hidden:
        name = recorded
    name = name or {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}.get(hidden, f"vit_h{hidden}")
    return BackboneArchitecture(
        hidden_size=hidden,
        num_hidden_layers=len(block_ids),
        num_attention_heads=heads,
        intermediate_size=intermediate,
        patch_size=patch,
        image_size=side * patch,
        has_cls_token=has_cls_token,
        arch_name=name.replace("deit", "vit"),
    )


def expected_backbone_keys(arch: BackboneArchitecture) -> dict[str, tuple[int, ...]]:
    """The reference (timm/DINO style) backbone keys and shapes for `arch`."""
    d, i, p = arch.hidden_size, arch.intermediate_size, arch.patch_size
    keys: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "pos_embed": (1, arch.num_patches + int(arch.has_cls_token), d),
    }
    if arch.has_cls_token:
        keys.update({"cls_token": (1, 1, d), "norm.weight": (d,), "norm.bias": (d,)})
    for n in range(arch.num_hidden_layers):
        keys.update(
            {
                f"blocks.{n}.norm1.weight": (d,),
                f"blocks.{n}.norm1.bias": (d,),
                f"blocks.{n}.attn.qkv.weight": (3 * d, d),
                f"blocks.{n}.attn.qkv.bias": (3 * d,),
                f"blocks.{n}.attn.proj.weight": (d, d),
                f"blocks.{n}.attn.proj.bias": (d,),
                f"blocks.{n}.norm2.weight": (d,),
                f"blocks.{n}.norm2.bias": (d,),
                f"blocks.{n}.mlp.fc1.weight": (i, d),
                f"blocks.{n}.mlp.fc1.bias": (i,),
                f"blocks.{n}.mlp.fc2.weight": (d, i),
                f"blocks.{n}.mlp.fc2.bias": (d,),
            }
        )
    return keys


# ---------------------------------------------------------------------------------------------------------------
# Building the transformers backbones
# ---------------------------------------------------------------------------------------------------------------


def _split_qkv(state: Mapping[str, torch.Tensor], n: int, dim: int) -> dict[str, torch.Tensor]:
    # The fused projection stacks rows [0:D] query, [D:2D] key, [2D:3D] value.
    weight, bias = state[f"blocks.{n}.attn.qkv.weight"], state[f"blocks.{n}.attn.qkv.bias"]
    return {
        "q.weight": weight[:dim],
        "k.weight": weight[dim : 2 * dim],
        "v.weight": weight[2 * dim :],
        "q.bias": bias[:dim],
        "k.bias": bias[dim : 2 * dim],
        "v.bias": bias[2 * dim :],
    }


def _block_weights(
    state: Mapping[str, torch.Tensor], arch: BackboneArchitecture, layer_prefix: str, names: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Every transformer block's weights under a transformers model's names.

    `names` maps the target model's module names for the attention (`"attention"`: the prefix of its q/k/v
    projections), its output projection and the block's norms/MLP to the reference names; the fused qkv is split.
    """
    converted = {}
    d = arch.hidden_size
    for n in range(arch.num_hidden_layers):
        layer, block = f"{layer_prefix}{n}.", f"blocks.{n}."
        for name, value in _split_qkv(state, n, d).items():
            converted[f"{layer}{names['attention']}.{name[0]}_proj.{name[2:]}"] = value
        for ours, theirs in names.items():
            if ours == "attention":
                continue
            for kind in ("weight", "bias"):
                converted[f"{layer}{ours}.{kind}"] = state[f"{block}{theirs}.{kind}"]
    return converted


def vit_config(arch: BackboneArchitecture) -> ViTConfig:
    from transformers import ViTConfig

    # pooler_act "linear": with an identity `pooler.dense` (see `dino_backbone_to_vit`), pooler_output is the CLS
    # token after the final norm, DINO's image representation.
    return ViTConfig(
        pooler_act="linear",
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        num_channels=3,
        qkv_bias=True,
        hidden_act="gelu",  # nn.GELU: exact erf GELU
        layer_norm_eps=LAYER_NORM_EPS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        architectures=["ViTModel"],
    )


def siglip_config(arch: BackboneArchitecture) -> SiglipVisionConfig:
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        num_channels=3,
        hidden_act="gelu",
        layer_norm_eps=LAYER_NORM_EPS,
        attention_dropout=0.0,
        vision_use_head=False,
        architectures=["SiglipVisionModel"],
    )


def dino_backbone_to_vit(
    state: Mapping[str, torch.Tensor], arch: BackboneArchitecture, identity_pooler: bool = True
) -> ViTModel:
    """A `ViTModel` holding a timm ViT with a CLS token (DINO, MoBY's DeiT): CLS, position grid with class
    position, final norm.

    `AutoModel` builds a `ViTModel` with a pooler, which would be randomly initialised if the file had none. With
    `identity_pooler` the saved pooler is the identity (pooler_act "linear"), so `pooler_output` (and
    `pipeline(..., pool=True)`) is the normalised CLS token, DINO's and MoBY's image representation, and nothing is
    random.
    """
    import torch
    from transformers import ViTModel

    d = arch.hidden_size
    converted = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    converted.update(
        _block_weights(
            state,
            arch,
            "layers.",
            {
                "attention": "attention",
                "attention.o_proj": "attn.proj",
                "layernorm_before": "norm1",
                "layernorm_after": "norm2",
                "mlp.fc1": "mlp.fc1",
                "mlp.fc2": "mlp.fc2",
            },
        )
    )
    if identity_pooler:
        converted["pooler.dense.weight"] = torch.eye(d)
        converted["pooler.dense.bias"] = torch.zeros(d)
    model = ViTModel(vit_config(arch), add_pooling_layer=identity_pooler)
    # live module names of a model built in memory: a strict in-memory copy, no file-format renaming involved
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return model.eval()


def selfpatch_backbone_to_siglip(
    state: Mapping[str, torch.Tensor],
    arch: BackboneArchitecture,
    output_norm: tuple[torch.Tensor, torch.Tensor] | None,
) -> SiglipVisionModel:
    """A `SiglipVisionModel` (no head) holding a CLS-free SelfPatch backbone; `output_norm` = `ca_head.norm`
    (weight, bias) becomes `post_layernorm`. `None` leaves a parameter-free standardisation (weight 1, bias 0)."""
    import torch
    from transformers import SiglipVisionModel

    d = arch.hidden_size
    if output_norm is None:
        output_norm = (torch.ones(d), torch.zeros(d))
    converted = {
        "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state["patch_embed.proj.bias"],
        # (1, N, D) grid without class position -> nn.Embedding(N, D) indexed by position ids 0..N-1 (row-major)
        "embeddings.position_embedding.weight": state["pos_embed"][0],
        "post_layernorm.weight": output_norm[0],
        "post_layernorm.bias": output_norm[1],
    }
    converted.update(
        _block_weights(
            state,
            arch,
            "encoder.layers.",
            {
                "attention": "self_attn",
                "self_attn.out_proj": "attn.proj",
                "layer_norm1": "norm1",
                "layer_norm2": "norm2",
                "mlp.fc1": "mlp.fc1",
                "mlp.fc2": "mlp.fc2",
            },
        )
    )
    model = SiglipVisionModel(siglip_config(arch))
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Reference forward pass (the converters' self-check)
# ---------------------------------------------------------------------------------------------------------------


def reference_backbone_forward(
    state: Mapping[str, torch.Tensor],
    arch: BackboneArchitecture,
    pixel_values: torch.Tensor,
    output_norm: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The timm/DINO ViT forward of the reference code on its own state dict, at the native resolution:
    patch conv, [CLS,] + pos_embed, pre-norm blocks with fused qkv, then `output_norm` (DINO's `norm` or
    SelfPatch's `ca_head.norm`; `None` = LayerNorm without affine). Returns every token, (B, [1 +] N, D)."""
    import torch
    import torch.nn.functional as F

    d, heads = arch.hidden_size, arch.num_attention_heads
    with torch.no_grad():
        x = F.conv2d(
            pixel_values,
            state["patch_embed.proj.weight"].float(),
            state["patch_embed.proj.bias"].float(),
            stride=arch.patch_size,
        )
        x = x.flatten(2).transpose(1, 2)
        if arch.has_cls_token:
            x = torch.cat([state["cls_token"].float().expand(x.shape[0], -1, -1), x], dim=1)
        x = x + state["pos_embed"].float()
        batch, tokens, _ = x.shape
        for n in range(arch.num_hidden_layers):
            p = {
                key[len(f"blocks.{n}.") :]: value.float()
                for key, value in state.items()
                if key.startswith(f"blocks.{n}.")
            }
            h = F.layer_norm(x, (d,), p["norm1.weight"], p["norm1.bias"], LAYER_NORM_EPS)
            qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(
                batch, tokens, 3, heads, d // heads
            )
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
            x = x + F.linear(
                (attn @ v).transpose(1, 2).reshape(batch, tokens, d),
                p["attn.proj.weight"],
                p["attn.proj.bias"],
            )
            h = F.layer_norm(x, (d,), p["norm2.weight"], p["norm2.bias"], LAYER_NORM_EPS)
            x = x + F.linear(
                F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
                p["mlp.fc2.weight"],
                p["mlp.fc2.bias"],
            )
        if output_norm is None:
            return F.layer_norm(x, (d,), eps=LAYER_NORM_EPS)
        return F.layer_norm(x, (d,), output_norm[0].float(), output_norm[1].float(), LAYER_NORM_EPS)


__all__ = [
    "REFERENCE_ARCHS",
    "BackboneArchitecture",
    "dino_backbone_to_vit",
    "expected_backbone_keys",
    "infer_vit_architecture",
    "reference_backbone_forward",
    "selfpatch_backbone_to_siglip",
    "siglip_config",
    "vit_config",
]
