"""The Swin Transformer of MoBY's public code (Transformer-SSL) -> `transformers.SwinModel`, and its reference forward.

The reference Swin's keys: `patch_embed.proj`, `patch_embed.norm`, optional `absolute_pos_embed`,
`layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj, attn.relative_position_bias_table, attn.relative_position_index,
attn_mask, norm2, mlp.fc1, mlp.fc2}`, `layers.{i}.downsample.{reduction, norm}` and the final `norm`. The shape is
read off the weights: heads from the relative position tables, the window from their length, the image size from
the shifted-window masks (or the absolute position embedding, or the checkpoint's config). The converted
`SwinModel`'s `last_hidden_state` is the last stage's tokens after the final norm and its `pooler_output` their
average, MoBY's image representation for Swin.

`reference_swin_forward` runs the reference architecture on the raw state dict, with the checkpoint's own saved
relative position indices and attention masks: the converter compares the converted folder against it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import SwinConfig, SwinModel

from selfpatch_hf.conversion.checkpoints import ConversionError, check_keys, numbered

SWIN_LAYER_NORM_EPS = 1e-5  # the reference Swin's nn.LayerNorm default
DEFAULT_IMAGE_SIZE = 224
# released Swin sizes by (embed_dim, depths) -> a name for the card
SWIN_NAMES = {
    (96, (2, 2, 6, 2)): "swin-tiny",
    (96, (2, 2, 18, 2)): "swin-small",
    (128, (2, 2, 18, 2)): "swin-base",
}


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


def infer_swin_architecture(
    state: Mapping[str, torch.Tensor], where: str, image_size: int | None = None
) -> SwinArchitecture:
    """Reads the Swin's shape off its weights. The image size shows in the shifted-window masks (or the absolute
    position embedding); without either it comes from `image_size` (the checkpoint's config) or 224."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise ConversionError(f"{where}: patch_embed.proj.weight must be a (C, 3, p, p) conv kernel.")
    embed_dim, patch = proj.shape[0], proj.shape[-1]
    stages = numbered(state, r"layers\.(\d+)\.")
    if not stages or stages != list(range(len(stages))):
        raise ConversionError(f"{where}: Swin stages must be numbered layers.0..N-1, found {stages}.")
    depths, heads, hidden = [], [], []
    for i in stages:
        blocks = numbered(state, rf"layers\.{i}\.blocks\.(\d+)\.")
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
    check_keys(
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


__all__ = [
    "SwinArchitecture",
    "expected_swin_keys",
    "infer_swin_architecture",
    "reference_swin_forward",
    "relative_position_index",
    "swin_backbone_to_hf",
    "swin_config",
    "validate_swin",
]
