"""Conversion of released MoBY checkpoints (Xie et al. 2021, public code "Transformer-SSL") into Hugging Face backbones.

MoBY's `save_checkpoint` writes `{"model": state_dict, "optimizer", "lr_scheduler", "max_accuracy", "epoch",
"config"}`; the model's keys are (`models/moby.py`):

- `encoder.*` (online encoder) and `encoder_k.*` (momentum/target encoder): a Swin Transformer (`patch_embed.proj`,
  `patch_embed.norm`, `layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj, attn.relative_position_bias_table,
  attn.relative_position_index, attn_mask, norm2, mlp.fc1, mlp.fc2}`, `layers.{i}.downsample.{reduction, norm}`,
  `norm`) or a timm ViT for DeiT-S (`cls_token`, `pos_embed` with the class position, `blocks.*`, `norm`);
- `projector.*`, `projector_k.*`, `predictor.*`: `MoBYMLP`s (`linear_hidden.{1,2}` Linear + BatchNorm,
  `linear_out`);
- `queue1`, `queue2` (out_dim x K keys), `queue_ptr`.

The `config` entry is a pickled yacs `CfgNode` (a dict subclass); `convert._torch_load` reads it as a plain
`OrderedDict` under the weights-only unpickler, never importing yacs.

Backbones (exact, verified against a re-implementation of the reference forward pass):

- Swin -> `transformers.SwinModel`: `last_hidden_state` is the last stage's tokens after the final norm, and
  `pooler_output` their average, which is MoBY's image representation for Swin.
- DeiT-S -> `transformers.ViTModel` (like a DINO backbone): `pooler_output` (identity pooler) is the normalised CLS
  token, MoBY's image representation for ViTs.

MoBY's own linear evaluation loads the ONLINE encoder (`encoder.*`), so that is the default network here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import SwinConfig, SwinModel

from selfpatch_hf.conversion.dino_selfpatch import (
    BackboneArchitecture,
    ConversionError,
    ReferenceCheckpoint,
    _check_keys,
    _listing,
    _strip_prefix,
    expected_backbone_keys,
    infer_architecture,
)

MOBY_PARTS = ("encoder", "encoder_k", "projector", "projector_k", "predictor")
MOBY_BUFFERS = ("queue1", "queue2", "queue_ptr")
SWIN_LAYER_NORM_EPS = 1e-5  # the reference Swin's nn.LayerNorm default
DEFAULT_IMAGE_SIZE = 224
# released Swin sizes by (embed_dim, depths) -> a name for the card
SWIN_NAMES = {
    (96, (2, 2, 6, 2)): "swin-tiny",
    (96, (2, 2, 18, 2)): "swin-small",
    (128, (2, 2, 18, 2)): "swin-base",
}


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def _model_state(obj: Any) -> Mapping[str, Any] | None:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(key, str) for key in obj):
        return None
    return _strip_prefix(obj, "module.")


def is_moby_checkpoint(obj: Any) -> bool:
    """True for a MoBY training checkpoint (or its bare `model` state dict): online and target encoder keys."""
    state = _model_state(obj)
    if state is None:
        return False
    return any(key.startswith("encoder.") for key in state) and any(
        key.startswith("encoder_k.") for key in state
    )


@dataclass
class MoBYCheckpoint:
    path: Path
    parts: dict[str, dict[str, torch.Tensor]]  # MOBY_PARTS -> state without the prefix
    buffers: dict[str, torch.Tensor]  # queue1, queue2, queue_ptr
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None

    @property
    def backbone_type(self) -> Literal["swin", "vit"]:
        return "swin" if any(key.startswith("layers.") for key in self.parts["encoder"]) else "vit"

    def config_value(self, *names: str) -> Any:
        value: Any = self.config
        for name in names:
            if not isinstance(value, Mapping) or name not in value:
                return None
            value = value[name]
        return value


def read_moby_checkpoint(obj: Any, path: Path) -> MoBYCheckpoint:
    """Splits a loaded MoBY checkpoint into its parts; every key must belong to one of them."""
    state = _model_state(obj)
    if state is None:
        raise ConversionError(f"{path} is not a MoBY checkpoint (no model state dict).")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    buffers: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in MOBY_PARTS and rest and isinstance(value, torch.Tensor):
            parts.setdefault(prefix, {})[rest] = value
        elif key in MOBY_BUFFERS and isinstance(value, torch.Tensor):
            buffers[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"Unexpected keys in the MoBY checkpoint {path.name} (expected encoder.*, encoder_k.*, projector.*, "
            f"projector_k.*, predictor.*, queue1, queue2, queue_ptr): {_listing(unknown)}"
        )
    missing = [f"{name}.*" for name in MOBY_PARTS if name not in parts] + [
        name for name in MOBY_BUFFERS if name not in buffers
    ]
    if missing:
        raise ConversionError(f"The MoBY checkpoint {path.name} lacks {', '.join(missing)}.")
    config = obj.get("config") if isinstance(obj, Mapping) else None
    epoch = obj.get("epoch") if isinstance(obj, Mapping) else None
    return MoBYCheckpoint(
        path=path,
        parts=parts,
        buffers=buffers,
        config=_plain(config) if isinstance(config, Mapping) else {},
        epoch=epoch if isinstance(epoch, int) else None,
    )


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _plain(value) if isinstance(value, Mapping) else value for key, value in config.items()}


# ---------------------------------------------------------------------------------------------------------------
# Swin architecture, keys and the transformers model
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SwinArchitecture:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_hidden: tuple[int, ...]  # fc1 width per stage
    patch_size: int
    image_size: int
    qkv_bias: bool
    absolute_embedding: bool

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden[0] / self.embed_dim

    @property
    def arch_name(self) -> str:
        name = SWIN_NAMES.get(
            (self.embed_dim, self.depths), f"swin-e{self.embed_dim}-d{'-'.join(map(str, self.depths))}"
        )
        return f"{name}-patch{self.patch_size}-window{self.window_size}"

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def stage_resolution(self, stage: int) -> int:
        return self.grid // 2**stage

    def block_window(self, stage: int, block: int) -> tuple[int, int]:
        """(window, shift) of a block: odd blocks shift by half a window, except where one window covers the grid."""
        resolution = self.stage_resolution(stage)
        if resolution <= self.window_size:
            return resolution, 0
        return self.window_size, 0 if block % 2 == 0 else self.window_size // 2

    def describe(self) -> str:
        return (
            f"{self.arch_name}: embed {self.embed_dim}, depths {list(self.depths)}, heads {list(self.num_heads)}, "
            f"{self.image_size} px, {self.num_features}-d last stage"
        )


def _stage_ids(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for key in state if (m := re.match(pattern, key))})


def infer_swin_architecture(
    state: Mapping[str, torch.Tensor], where: str, image_size: int | None = None
) -> SwinArchitecture:
    """Reads the Swin's shape off its weights. The image size shows in the shifted-window masks (or the absolute
    position embedding); without either it comes from `image_size` (the checkpoint's config) or 224."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise ConversionError(f"{where}: patch_embed.proj.weight must be a (C, 3, p, p) conv kernel.")
    embed_dim, patch = proj.shape[0], proj.shape[-1]
    stages = _stage_ids(state, r"layers\.(\d+)\.")
    if not stages or stages != list(range(len(stages))):
        raise ConversionError(f"{where}: Swin stages must be numbered layers.0..N-1, found {stages}.")
    depths, heads, hidden = [], [], []
    for i in stages:
        blocks = _stage_ids(state, rf"layers\.{i}\.blocks\.(\d+)\.")
        if not blocks or blocks != list(range(len(blocks))):
            raise ConversionError(f"{where}: blocks of stage {i} must be numbered 0..D-1, found {blocks}.")
        table = state.get(f"layers.{i}.blocks.0.attn.relative_position_bias_table")
        fc1 = state.get(f"layers.{i}.blocks.0.mlp.fc1.weight")
        if table is None or table.ndim != 2 or fc1 is None:
            raise ConversionError(
                f"{where}: stage {i} lacks blocks.0.attn.relative_position_bias_table (a (2w-1)^2 x heads table) or "
                "blocks.0.mlp.fc1.weight; a Swin with another block layout cannot be converted."
            )
        depths.append(len(blocks))
        heads.append(table.shape[1])
        hidden.append(fc1.shape[0])
    side = math.isqrt(state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
    if side * side != state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0] or side % 2 == 0:
        raise ConversionError(f"{where}: the relative position table of stage 0 is not (2w-1)^2 rows long.")
    window = (side + 1) // 2

    grid = None
    for i in stages:
        for j in range(depths[i]):
            mask = state.get(f"layers.{i}.blocks.{j}.attn_mask")
            if mask is not None and grid is None:
                windows_per_side = math.isqrt(mask.shape[0])
                grid = windows_per_side * window * 2**i
    if grid is None and "absolute_pos_embed" in state:
        grid = math.isqrt(state["absolute_pos_embed"].shape[1])
    if grid is None:
        grid = (image_size or DEFAULT_IMAGE_SIZE) // patch
    return SwinArchitecture(
        embed_dim=embed_dim,
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_size=window,
        mlp_hidden=tuple(hidden),
        patch_size=patch,
        image_size=grid * patch,
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state,
        absolute_embedding="absolute_pos_embed" in state,
    )


def expected_swin_keys(arch: SwinArchitecture) -> dict[str, tuple[int, ...]]:
    """The reference Swin's keys and shapes (parameters and the persistent buffers the reference saves)."""
    c, p = arch.embed_dim, arch.patch_size
    keys: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (c, 3, p, p),
        "patch_embed.proj.bias": (c,),
        "patch_embed.norm.weight": (c,),
        "patch_embed.norm.bias": (c,),
    }
    if arch.absolute_embedding:
        keys["absolute_pos_embed"] = (1, arch.grid**2, c)
    for i, depth in enumerate(arch.depths):
        d, h = arch.stage_dim(i), arch.mlp_hidden[i]
        for j in range(depth):
            window, shift = arch.block_window(i, j)
            b = f"layers.{i}.blocks.{j}."
            keys.update(
                {
                    b + "norm1.weight": (d,),
                    b + "norm1.bias": (d,),
                    b + "attn.qkv.weight": (3 * d, d),
                    b + "attn.proj.weight": (d, d),
                    b + "attn.proj.bias": (d,),
                    b + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, arch.num_heads[i]),
                    b + "attn.relative_position_index": (window**2, window**2),
                    b + "norm2.weight": (d,),
                    b + "norm2.bias": (d,),
                    b + "mlp.fc1.weight": (h, d),
                    b + "mlp.fc1.bias": (h,),
                    b + "mlp.fc2.weight": (d, h),
                    b + "mlp.fc2.bias": (d,),
                }
            )
            if arch.qkv_bias:
                keys[b + "attn.qkv.bias"] = (3 * d,)
            if shift:
                windows = (arch.stage_resolution(i) // window) ** 2
                keys[b + "attn_mask"] = (windows, window**2, window**2)
        if i < len(arch.depths) - 1:
            keys[f"layers.{i}.downsample.reduction.weight"] = (2 * d, 4 * d)
            keys[f"layers.{i}.downsample.norm.weight"] = (4 * d,)
            keys[f"layers.{i}.downsample.norm.bias"] = (4 * d,)
    keys["norm.weight"] = (arch.num_features,)
    keys["norm.bias"] = (arch.num_features,)
    return keys


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)^2 bias table: (dy + w-1) * (2w-1) + (dx + w-1) for every token pair."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])
    delta = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return delta[0] * (2 * window - 1) + delta[1]


def validate_swin(state: Mapping[str, torch.Tensor], arch: SwinArchitecture, where: str) -> None:
    problems = [
        f"stage {i} has a {arch.stage_resolution(i)}x{arch.stage_resolution(i)} grid"
        for i in range(len(arch.depths))
        if arch.stage_resolution(i) < arch.window_size
        or arch.stage_resolution(i) % arch.block_window(i, 0)[0]
    ]
    if arch.grid * arch.patch_size != arch.image_size or problems:
        raise ConversionError(
            f"{where}: at {arch.image_size} px with window {arch.window_size}, {', '.join(problems)}; the reference "
            "needs every stage grid to be a multiple of the window, and transformers' SwinModel cannot run a stage "
            "smaller than its window."
        )
    _check_keys(
        state,
        expected_swin_keys(arch),
        where,
        f" of a {arch.arch_name} Swin at {arch.image_size} px (image size read from the shifted-window masks or "
        "the checkpoint's config; a Swin with BatchNorm before the MLP, MoBY's `_bn` variant, is not supported)",
    )
    for i, depth in enumerate(arch.depths):
        for j in range(depth):
            key = f"layers.{i}.blocks.{j}.attn.relative_position_index"
            if not torch.equal(state[key].long(), relative_position_index(arch.block_window(i, j)[0])):
                raise ConversionError(f"{where}: {key} is not the standard Swin relative position index.")


def swin_config(arch: SwinArchitecture) -> SwinConfig:
    for i, hidden in enumerate(arch.mlp_hidden):
        if int(arch.mlp_ratio * arch.stage_dim(i)) != hidden:
            raise ConversionError(
                f"Stage {i}'s MLP is {hidden} wide, not {arch.mlp_ratio:g} x {arch.stage_dim(i)}: one MLP ratio must "
                "hold for every stage."
            )
    return SwinConfig(
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        num_channels=3,
        embed_dim=arch.embed_dim,
        depths=list(arch.depths),
        num_heads=list(arch.num_heads),
        window_size=arch.window_size,
        mlp_ratio=arch.mlp_ratio,
        qkv_bias=arch.qkv_bias,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        hidden_act="gelu",  # nn.GELU: exact erf GELU
        use_absolute_embeddings=arch.absolute_embedding,
        layer_norm_eps=SWIN_LAYER_NORM_EPS,
        architectures=["SwinModel"],
    )


def swin_backbone_to_hf(state: Mapping[str, torch.Tensor], arch: SwinArchitecture) -> SwinModel:
    """A `SwinModel` holding the reference Swin; the fused qkv is split into q/k/v (rows [0:D], [D:2D], [2D:3D])."""
    converted = {
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "embeddings.norm.weight": state["patch_embed.norm.weight"],
        "embeddings.norm.bias": state["patch_embed.norm.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if arch.absolute_embedding:
        converted["embeddings.position_embeddings"] = state["absolute_pos_embed"]
    renames = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i, depth in enumerate(arch.depths):
        d = arch.stage_dim(i)
        for j in range(depth):
            ours, theirs = f"encoder.layers.{i}.blocks.{j}.", f"layers.{i}.blocks.{j}."
            for ref, name in renames.items():  # reference name -> ours
                for kind in ("weight", "bias"):
                    converted[f"{ours}{name}.{kind}"] = state[f"{theirs}{ref}.{kind}"]
            kinds = ("weight", "bias") if arch.qkv_bias else ("weight",)
            for kind in kinds:
                fused = state[f"{theirs}attn.qkv.{kind}"]
                for n, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                    converted[f"{ours}attention.{projection}.{kind}"] = fused[n * d : (n + 1) * d]
            converted[f"{ours}attention.relative_position_bias.relative_position_bias_table"] = state[
                f"{theirs}attn.relative_position_bias_table"
            ]
        if i < len(arch.depths) - 1:
            for name in ("reduction.weight", "norm.weight", "norm.bias"):
                converted[f"encoder.layers.{i}.downsample.{name}"] = state[f"layers.{i}.downsample.{name}"]
    model = SwinModel(swin_config(arch), add_pooling_layer=True)  # the pooler is a parameter-free average
    # live module names of a model built in memory: a strict in-memory copy (the non-persistent relative position
    # index is recomputed by the model and checked equal to the reference's in `validate_swin`)
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return model.eval()


def _window_split(x: torch.Tensor, window: int) -> torch.Tensor:
    b, h, w, c = x.shape
    return (
        x.view(b, h // window, window, w // window, window, c).transpose(2, 3).reshape(-1, window * window, c)
    )


def _window_merge(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    c = x.shape[-1]
    return x.view(-1, h // window, w // window, window, window, c).transpose(2, 3).reshape(-1, h, w, c)


@torch.no_grad()
def reference_swin_forward(
    state: Mapping[str, torch.Tensor], arch: SwinArchitecture, pixel_values: torch.Tensor
) -> torch.Tensor:
    """The reference Swin forward on its own state dict at its native size, using the checkpoint's saved relative
    position indices and shifted-window masks: the last stage's tokens after the final norm (B, L, C)."""
    s = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    eps = SWIN_LAYER_NORM_EPS
    x = F.conv2d(
        pixel_values, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=arch.patch_size
    )
    x = x.flatten(2).transpose(1, 2)
    x = F.layer_norm(x, (arch.embed_dim,), s["patch_embed.norm.weight"], s["patch_embed.norm.bias"], eps)
    if arch.absolute_embedding:
        x = x + s["absolute_pos_embed"]
    batch = x.shape[0]
    for i, depth in enumerate(arch.depths):
        d, r, heads = arch.stage_dim(i), arch.stage_resolution(i), arch.num_heads[i]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            window, shift = arch.block_window(i, j)
            h = F.layer_norm(x, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps).view(batch, r, r, d)
            if shift:
                h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
            windows = _window_split(h, window)  # (B * nW, w*w, d)
            n = window * window
            qkv = F.linear(windows, s[p + "attn.qkv.weight"], s.get(p + "attn.qkv.bias"))
            q, k, v = qkv.view(-1, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            logits = (q * (d // heads) ** -0.5) @ k.transpose(-2, -1)
            table = s[p + "attn.relative_position_bias_table"]
            logits = logits + table[s[p + "attn.relative_position_index"].reshape(-1)].view(
                n, n, heads
            ).permute(2, 0, 1)
            if shift:
                mask = s[p + "attn_mask"]  # (nW, n, n): 0 within a region, -100 across
                logits = (logits.view(batch, mask.shape[0], heads, n, n) + mask[None, :, None]).view(
                    -1, heads, n, n
                )
            attended = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, d)
            attended = F.linear(attended, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
            h = _window_merge(attended, window, r, r)
            if shift:
                h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
            x = x + h.reshape(batch, r * r, d)
            h = F.layer_norm(x, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps)
            x = x + F.linear(
                F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
                s[p + "mlp.fc2.weight"],
                s[p + "mlp.fc2.bias"],
            )
        if i < len(arch.depths) - 1:
            g = x.view(batch, r, r, d)
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], dim=-1)
            g = F.layer_norm(
                g.view(batch, -1, 4 * d),
                (4 * d,),
                s[f"layers.{i}.downsample.norm.weight"],
                s[f"layers.{i}.downsample.norm.bias"],
                eps,
            )
            x = F.linear(g, s[f"layers.{i}.downsample.reduction.weight"])
    return F.layer_norm(x, (arch.num_features,), s["norm.weight"], s["norm.bias"], eps)


# ---------------------------------------------------------------------------------------------------------------
# Heads and queues (validated so that a damaged file fails as a whole, not only where the backbone reads it)
# ---------------------------------------------------------------------------------------------------------------


def expected_moby_mlp_keys(
    state: Mapping[str, torch.Tensor], in_dim: int, where: str
) -> dict[str, tuple[int, ...]]:
    """`MoBYMLP(num_layers=L)`: linear_hidden = [Identity, (Linear, BatchNorm1d, ReLU) x (L-1)], linear_out."""
    out = state.get("linear_out.weight")
    if out is None or out.ndim != 2:
        raise ConversionError(f"{where} has no linear_out.weight (a MoBYMLP).")
    hidden_linears = _stage_ids(state, r"linear_hidden\.(\d+)\.weight$")
    linears = [n for n in hidden_linears if n % 3 == 1]
    inner = out.shape[1] if linears else in_dim
    keys: dict[str, tuple[int, ...]] = {}
    for layer, n in enumerate(linears):
        keys[f"linear_hidden.{n}.weight"] = (inner, in_dim if layer == 0 else inner)
        keys[f"linear_hidden.{n}.bias"] = (inner,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"linear_hidden.{n + 1}.{name}"] = (inner,)
        keys[f"linear_hidden.{n + 1}.num_batches_tracked"] = ()
    keys["linear_out.weight"] = (out.shape[0], inner)
    keys["linear_out.bias"] = (out.shape[0],)
    return keys


def validate_moby_heads(checkpoint: MoBYCheckpoint, feature_dim: int) -> None:
    name = checkpoint.path.name
    projector = expected_moby_mlp_keys(checkpoint.parts["projector"], feature_dim, f"{name} projector")
    _check_keys(checkpoint.parts["projector"], projector, f"{name} projector.* keys")
    _check_keys(checkpoint.parts["projector_k"], projector, f"{name} projector_k.* keys")
    out_dim = projector["linear_out.weight"][0]
    predictor = expected_moby_mlp_keys(checkpoint.parts["predictor"], out_dim, f"{name} predictor")
    _check_keys(checkpoint.parts["predictor"], predictor, f"{name} predictor.* keys")
    queue = checkpoint.buffers["queue1"]
    expected = {"queue1": (out_dim, queue.shape[-1]), "queue2": (out_dim, queue.shape[-1]), "queue_ptr": (1,)}
    _check_keys(checkpoint.buffers, expected, f"{name} queues")


# ---------------------------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MoBYBackbone:
    """A converted encoder and what is needed to check it."""

    model: Any  # SwinModel or ViTModel
    architecture: SwinArchitecture | BackboneArchitecture
    state: dict[str, torch.Tensor]
    model_type: Literal["swin", "vit"]

    @torch.no_grad()
    def reference_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from selfpatch_hf.conversion.dino_selfpatch import reference_backbone_forward

        if self.model_type == "swin":
            return reference_swin_forward(self.state, self.architecture, pixel_values)
        norm = (self.state["norm.weight"], self.state["norm.bias"])
        return reference_backbone_forward(self.state, self.architecture, pixel_values, norm)


def moby_backbone(
    checkpoint: MoBYCheckpoint,
    network: Literal["online", "target"] = "online",
    arch: str | None = None,
    num_heads: int | None = None,
) -> MoBYBackbone:
    """Validates the whole checkpoint (both encoders, heads, queues) and builds the chosen encoder's backbone."""
    side = {"online": "encoder", "target": "encoder_k"}[network]
    state = checkpoint.parts[side]
    name = checkpoint.path.name
    if checkpoint.backbone_type == "swin":
        if arch is not None or num_heads is not None:
            raise ConversionError(
                "--arch / --num-heads are for ViT checkpoints; a Swin's heads show in its weights."
            )
        image_size = checkpoint.config_value("DATA", "IMG_SIZE")
        architecture = infer_swin_architecture(
            state, f"{name} {side}.*", image_size if isinstance(image_size, int) else None
        )
        for part in ("encoder", "encoder_k"):
            validate_swin(checkpoint.parts[part], architecture, f"{name} {part}.* keys")
        validate_moby_heads(checkpoint, architecture.num_features)
        return MoBYBackbone(swin_backbone_to_hf(state, architecture), architecture, state, "swin")

    from selfpatch_hf.conversion.dino_selfpatch import dino_backbone_to_vit

    encoder_name = checkpoint.config_value("MODEL", "MOBY", "ENCODER")
    args = {"arch": encoder_name} if isinstance(encoder_name, str) else {}
    reference = ReferenceCheckpoint(format="dino-backbone", path=checkpoint.path, backbone=state, args=args)
    architecture = infer_architecture(reference, arch=arch, num_heads=num_heads)
    for part in ("encoder", "encoder_k"):
        _check_keys(
            checkpoint.parts[part],
            expected_backbone_keys(architecture),
            f"{name} {part}.* keys",
            f" of a {architecture.num_hidden_layers}-layer, width-{architecture.hidden_size} timm ViT (DeiT)",
        )
    validate_moby_heads(checkpoint, architecture.hidden_size)
    return MoBYBackbone(dino_backbone_to_vit(state, architecture), architecture, state, "vit")


def moby_card_info(checkpoint: MoBYCheckpoint, backbone: MoBYBackbone, network: str, notes: list[str]):
    from selfpatch_hf.hub.cards.backbone import BackboneCardInfo

    arch = backbone.architecture
    lr = checkpoint.config_value("TRAIN", "BASE_LR")
    epochs = checkpoint.config_value("TRAIN", "EPOCHS")
    common = {
        "source": "converted",
        "converted_from": checkpoint.path.name,
        "objective": "moby",
        # the online encoder is what MoBY's linear evaluation loads; the card's wording: student / teacher
        "exported_network": "student" if network == "online" else "teacher",
        "warnings": list(notes),
        "epochs": checkpoint.epoch + 1 if checkpoint.epoch is not None else epochs,
        "learning_rate": lr if isinstance(lr, float) else None,
        "image_representation": "average of the last stage" if backbone.model_type == "swin" else "cls",
        "global_crop_size": arch.image_size,
        "num_global_crops": 2,
    }
    if backbone.model_type == "swin":
        return BackboneCardInfo(
            architecture=arch.arch_name,
            patch_size=arch.patch_size,
            hidden_size=arch.num_features,
            num_hidden_layers=sum(arch.depths),
            image_size=arch.image_size,
            model_class="SwinModel",
            num_prefix_tokens=0,
            feature_stride=arch.patch_size * 2 ** (len(arch.depths) - 1),
            notes=(
                "`last_hidden_state` holds the last stage's tokens after the final norm (stride "
                f"{arch.patch_size * 2 ** (len(arch.depths) - 1)}); `pooler_output` is their average, MoBY's image "
                "representation. Earlier stages: `output_hidden_states=True` and `reshaped_hidden_states`."
            ),
            **common,
        )
    return BackboneCardInfo(
        architecture=f"{arch.arch_name}/{arch.patch_size}",
        patch_size=arch.patch_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        image_size=arch.image_size,
        model_class="ViTModel",
        num_prefix_tokens=1,
        **common,
    )


# ---------------------------------------------------------------------------------------------------------------
# Pretraining checkpoint (continued training)
# ---------------------------------------------------------------------------------------------------------------


def _mlp_widths(state: Mapping[str, torch.Tensor], where: str) -> tuple[int, int]:
    """(hidden, out) of a two-layer MoBYMLP; other depths have no counterpart in `SelfPatchConfig`."""
    linears = _stage_ids(state, r"linear_hidden\.(\d+)\.weight$")
    if linears != [1, 2]:  # Linear at 1, BatchNorm at 2
        raise ConversionError(
            f"{where} is not a two-layer MoBYMLP (Linear - BatchNorm - ReLU - Linear), the only depth "
            "SelfPatchConfig builds; convert with --no-pretraining."
        )
    return state["linear_hidden.1.weight"].shape[0], state["linear_out.weight"].shape[0]


def moby_to_pretraining_model(
    checkpoint: MoBYCheckpoint,
    backbone: MoBYBackbone,
    recipe: Literal["selfpatch", "moby"] = "selfpatch",
):
    """A `SelfPatchForPretraining` (image_objective "moby") initialised from a MoBY checkpoint.

    - Online encoder, projector and predictor -> the student; momentum encoder and projector -> the teacher; the
      queues and their pointer as they were. Temperature, momentum, queue size and drop-path come from the
      checkpoint's config where it has them.
    - `recipe="moby"`: plain MoBY (`patch_loss_weight=0`; the CLS token on a ViT, the average pool on a Swin as the
      image representation): an exact restart.
    - `recipe="selfpatch"` (default): the SelfPatch objective (`image_representation="aggregation"`, lambda 0.1);
      the aggregation modules and patch projectors/predictor start fresh, and the projectors now read the aggregation
      module's summary instead of the representation they were trained on.
    """
    from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining
    from selfpatch_hf.conversion.dino_selfpatch import dino_backbone_to_vit, vit_config

    arch = backbone.architecture
    hidden, out_dim = _mlp_widths(checkpoint.parts["projector"], "projector")
    predictor_hidden, _ = _mlp_widths(checkpoint.parts["predictor"], "predictor")
    swin = backbone.model_type == "swin"
    overrides: dict[str, Any] = {
        "image_objective": "moby",
        "global_crop_size": arch.image_size,
        "moby_projection_dim": out_dim,
        "moby_projector_hidden_dim": hidden,
        "moby_predictor_hidden_dim": predictor_hidden,
        "moby_queue_size": checkpoint.buffers["queue1"].shape[1],
    }
    for field_name, key in (
        ("moby_temperature", "CONTRAST_TEMPERATURE"),
        ("moby_momentum", "CONTRAST_MOMENTUM"),
        ("drop_path_rate", "ONLINE_DROP_PATH_RATE"),
    ):
        value = checkpoint.config_value("MODEL", "MOBY", key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            overrides[field_name] = float(value)
    if recipe == "moby":
        overrides.update(patch_loss_weight=0.0, image_representation="average_pool" if swin else "cls")
    else:
        overrides.update(patch_loss_weight=0.1, image_representation="aggregation")
    backbone_config = swin_config(arch) if swin else vit_config(arch)
    config = SelfPatchConfig(backbone_config=backbone_config, **overrides)
    model = SelfPatchForPretraining(config).eval()
    with torch.no_grad():
        for network, side, projector in (
            (model.student, "encoder", "projector"),
            (model.teacher, "encoder_k", "projector_k"),
        ):
            state = checkpoint.parts[side]
            converted = swin_backbone_to_hf(state, arch) if swin else dino_backbone_to_vit(state, arch, False)
            # our backbones have no pooler (a Swin's is parameter-free): the same parameters either way
            network.backbone.load_state_dict(converted.state_dict(), strict=True)
            network.projector.load_state_dict(
                {
                    k: v.float() if v.is_floating_point() else v
                    for k, v in checkpoint.parts[projector].items()
                },
                strict=True,
            )
        model.student.predictor.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in checkpoint.parts["predictor"].items()},
            strict=True,
        )
        model.objective.queue1.copy_(checkpoint.buffers["queue1"])
        model.objective.queue2.copy_(checkpoint.buffers["queue2"])
        model.objective.queue_ptr.copy_(checkpoint.buffers["queue_ptr"].reshape(1) % config.moby_queue_size)
    model.teacher.requires_grad_(False)  # the target only moves by momentum
    return model


def write_moby_pretraining_card(folder: Path, checkpoint: MoBYCheckpoint, recipe: str) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        license="apache-2.0", tags=["selfpatch", "moby", "self-supervised", "pretraining-checkpoint"]
    )
    if recipe == "selfpatch":
        plan = (
            'It is set up to continue with the SelfPatch objective (`image_representation="aggregation"`, '
            "`patch_loss_weight=0.1`): the aggregation modules and the patch projectors and predictor are freshly "
            "initialised, and MoBY's projectors now read the aggregation module's summary."
        )
    else:
        plan = "It is set up to continue plain MoBY training (`patch_loss_weight=0`), an exact restart."
    content = (
        f"---\n{data.to_yaml()}\n---\n\n# SelfPatch pretraining checkpoint converted from `{checkpoint.path.name}`\n\n"
        "Online network (encoder, projector, predictor), momentum network (encoder, projector) and the two key "
        'queues of `selfpatch_hf.SelfPatchForPretraining` with `image_objective="moby"`, converted from a MoBY '
        f"checkpoint. {plan}\n\n"
        "```python\nimport selfpatch_hf  # registers the model with the Auto classes\n"
        "from selfpatch_hf import SelfPatchForPretraining\n\n"
        'model = SelfPatchForPretraining.from_pretrained("path/or/repo")\n```\n'
    )
    ModelCard(content).save(folder / "README.md")


__all__ = [
    "MoBYBackbone",
    "MoBYCheckpoint",
    "SwinArchitecture",
    "expected_swin_keys",
    "infer_swin_architecture",
    "is_moby_checkpoint",
    "moby_backbone",
    "moby_to_pretraining_model",
    "read_moby_checkpoint",
    "reference_swin_forward",
    "swin_backbone_to_hf",
]
