"""MoBY checkpoints in the key format of its public code (Transformer-SSL: `models/moby.py`, `models/swin_transformer.py`,
timm's `VisionTransformer` for DeiT-S; saved by `save_checkpoint` as `{"model": state_dict, "optimizer",
"lr_scheduler", "epoch", "config", ...}`), with random weights, and the two encoders written as modules with the
reference code's structure (their state dicts are the checkpoints' keys, their forward passes the expected outputs).

Nothing here imports `selfpatch_hf`: the reference side of every comparison is written from the published
architectures alone (Swin: shifted windows, relative position bias, patch merging; DeiT: timm 0.3.2's
`VisionTransformer`, the version Transformer-SSL installs).
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from reference_checkpoints import prefixed

# A tiny Swin: 32 px images, patch 2 -> stage grids 16, 8, 4 (window 4: shifted windows in stages 0-1, one window
# in the last stage, where the reference turns the shift off).
TINY_SWIN = {
    "image_size": 32,
    "patch_size": 2,
    "embed_dim": 8,
    "depths": (2, 2, 2),
    "num_heads": (1, 2, 4),
    "window_size": 4,
}


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _unwindows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    c = x.shape[-1]
    x = x.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, w*w
        delta = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # 2, w*w, w*w, each in [0, 2w-2]
        self.register_buffer("relative_position_index", delta[0] * (2 * window - 1) + delta[1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n_windows_batch, n, c = x.shape
        q, k, v = (
            self.qkv(x).reshape(n_windows_batch, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        )
        logits = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()].view(n, n, -1)
        logits = logits + bias.permute(2, 0, 1)
        if mask is not None:  # the same (0 / -100) mask for the same window of every image
            logits = logits.view(-1, mask.shape[0], self.heads, n, n) + mask[None, :, None]
            logits = logits.view(-1, self.heads, n, n)
        return self.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(n_windows_batch, n, c))


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int):
        super().__init__()
        if resolution <= window:  # one window covers the grid: no shift (as the reference does)
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        mask = None
        if shift:
            # label the 3x3 regions that the cyclic shift brings together; tokens of different regions never attend
            regions = torch.zeros(1, resolution, resolution, 1)
            cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for label, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
                regions[:, rows, cols] = label
            labels = _windows(regions, window).squeeze(-1)  # windows, w*w
            mask = (labels[:, None, :] != labels[:, :, None]).float() * -100.0
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, c = x.shape
        r = self.resolution
        h = self.norm1(x).view(b, r, r, c)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = _unwindows(self.attn(_windows(h, self.window), self.attn_mask), self.window, r, r)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(b, length, c)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class _PatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        # the four members of each 2x2 cell, in the order (top-left, bottom-left, top-right, bottom-right)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class ReferenceSwin(nn.Module):
    """The Swin encoder of MoBY's public code (classification head removed, `num_classes=0`)."""

    def __init__(
        self, *, image_size, patch_size, embed_dim, depths, num_heads, window_size, absolute_embedding=False
    ):
        super().__init__()
        grid = image_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        if absolute_embedding:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim))
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim, resolution = embed_dim * 2**i, grid // 2**i
            stage = nn.Module()
            stage.blocks = nn.ModuleList(
                _SwinBlock(dim, resolution, heads, window_size, 0 if j % 2 == 0 else window_size // 2)
                for j in range(depth)
            )
            stage.downsample = _PatchMerging(dim, resolution) if i < len(depths) - 1 else None
            self.layers.append(stage)
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))

    def stages(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's tokens (B, L_i, C_i) after its blocks and before its patch merging."""
        x = self.patch_embed.norm(self.patch_embed.proj(pixels).flatten(2).transpose(1, 2))
        if hasattr(self, "absolute_pos_embed"):
            x = x + self.absolute_pos_embed
        outputs = []
        for stage in self.layers:
            for block in stage.blocks:
                x = block(x)
            outputs.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        return outputs

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last stage tokens after the final norm (B, L, C), their average: MoBY's image representation (B, C))."""
        tokens = self.norm(self.stages(pixels)[-1])
        return tokens, tokens.mean(dim=1)


def random_swin(seed: int = 0, **overrides) -> ReferenceSwin:
    arch = {**TINY_SWIN, **overrides}
    torch.manual_seed(seed)
    model = ReferenceSwin(**arch)
    with torch.no_grad():  # every parameter random (biases, norms and position tables too), buffers untouched
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(1.0)
    return model.eval()


def moby_mlp_state(in_dim: int, inner: int = 16, out: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """`MoBYMLP` with two layers: linear_hidden = [Identity, Linear, BatchNorm1d, ReLU], linear_out = Linear."""
    g = torch.Generator().manual_seed(seed)
    return {
        "linear_hidden.1.weight": torch.randn(inner, in_dim, generator=g),
        "linear_hidden.1.bias": torch.randn(inner, generator=g),
        "linear_hidden.2.weight": torch.rand(inner, generator=g) + 0.5,
        "linear_hidden.2.bias": torch.randn(inner, generator=g),
        "linear_hidden.2.running_mean": torch.randn(inner, generator=g),
        "linear_hidden.2.running_var": torch.rand(inner, generator=g) + 0.5,
        "linear_hidden.2.num_batches_tracked": torch.tensor(7),
        "linear_out.weight": torch.randn(out, inner, generator=g),
        "linear_out.bias": torch.randn(out, generator=g),
    }


# ------------------------------------------------------------------------------------------------------------------
# DeiT-S as MoBY builds it: `timm.models.vit_deit_small_patch16_224(num_classes=0, drop_path_rate=...)` (timm 0.3.2)
# ------------------------------------------------------------------------------------------------------------------


class _TimmAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)  # qkv_bias=True for DeiT
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class _TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _TimmBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _TimmAttention(dim, num_heads)
        self.drop_path = nn.Identity()  # stochastic depth is off in evaluation
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _TimmMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _TimmPatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ReferenceDeiT(nn.Module):
    """timm's `VisionTransformer` with `num_classes=0` (head = Identity): patch embedding, CLS token, position
    embedding with the class position, pre-norm blocks with a fused qkv, final norm. Its forward is what MoBY's
    encoder returns: the CLS token after the final norm."""

    def __init__(self, *, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = _TimmPatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList(_TimmBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Every token (CLS first) after the final norm, (B, 1 + N, D)."""
        x = self.patch_embed(pixels)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokens(pixels)[:, 0]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(pixels))


def random_deit(seed: int = 0) -> ReferenceDeiT:
    torch.manual_seed(seed)
    model = ReferenceDeiT()
    with torch.no_grad():  # every parameter random (CLS, positions, biases and norms too)
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(1.0)
    return model.eval()


class FakeYacsConfig(dict):
    """Pickles like yacs' `CfgNode` (module `yacs.config`, a dict subclass with attributes in `__dict__`), which
    MoBY's `save_checkpoint` stores under "config"; yacs itself is not installed here."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__.update(
            {
                "__immutable__": True,
                "__deprecated_keys__": set(),
                "__renamed_keys__": {},
                "__new_allowed__": False,
            }
        )


FakeYacsConfig.__module__ = "yacs.config"
FakeYacsConfig.__qualname__ = FakeYacsConfig.__name__ = "CfgNode"


def save_with_yacs_config(checkpoint: dict, path) -> None:
    """`torch.save` with the fake `yacs.config.CfgNode` importable under its real name (as on the training machine)."""
    module = types.ModuleType("yacs.config")
    module.CfgNode = FakeYacsConfig
    package = types.ModuleType("yacs")
    package.config = module
    saved = {name: sys.modules.get(name) for name in ("yacs", "yacs.config")}
    sys.modules.update({"yacs": package, "yacs.config": module})
    try:
        torch.save(checkpoint, path)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def moby_checkpoint(
    online: dict[str, torch.Tensor], target: dict[str, torch.Tensor], feature_dim: int, *, image_size: int
) -> dict:
    """A Transformer-SSL `ckpt_epoch_N.pth` around two encoder state dicts (online `encoder`, target `encoder_k`)."""
    model = {
        **prefixed("encoder.", online),
        **prefixed("encoder_k.", target),
        **prefixed("projector.", moby_mlp_state(feature_dim, seed=1)),
        **prefixed("projector_k.", moby_mlp_state(feature_dim, seed=2)),
        **prefixed("predictor.", moby_mlp_state(8, seed=3)),
        "queue1": F.normalize(torch.randn(8, 32), dim=0),
        "queue2": F.normalize(torch.randn(8, 32), dim=0),
        "queue_ptr": torch.tensor([16]),
    }
    config = FakeYacsConfig(
        DATA=FakeYacsConfig(IMG_SIZE=image_size, BATCH_SIZE=4), MODEL=FakeYacsConfig(TYPE="moby", NAME="tiny")
    )
    return {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]},
        "lr_scheduler": {"t_initial": 300, "warmup_t": 5},
        "max_accuracy": 0.0,
        "epoch": 99,
        "config": config,
    }


def moby_swin_checkpoint(**overrides) -> tuple[dict, ReferenceSwin, ReferenceSwin]:
    online, target = random_swin(seed=10, **overrides), random_swin(seed=20, **overrides)
    arch = {**TINY_SWIN, **overrides}
    features = arch["embed_dim"] * 2 ** (len(arch["depths"]) - 1)
    checkpoint = moby_checkpoint(
        online.state_dict(), target.state_dict(), features, image_size=arch["image_size"]
    )
    return checkpoint, online, target


def moby_deit_checkpoint() -> tuple[dict, ReferenceDeiT, ReferenceDeiT]:
    """A tiny DeiT (32 px, patch 8, width 32, 2 blocks of 2 heads) as MoBY's online and target encoders."""
    online, target = random_deit(seed=30), random_deit(seed=40)
    checkpoint = moby_checkpoint(online.state_dict(), target.state_dict(), online.num_features, image_size=32)
    return checkpoint, online, target
