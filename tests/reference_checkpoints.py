"""Checkpoints in the reference SelfPatch / DINO key formats (docs/method.md section 11), with random weights,
and an independent re-implementation of the reference forward pass to compare converted models with.

Nothing here imports `selfpatch_hf`: the reference side of every comparison is built from the reference code's
published architecture alone (timm / DINO ViTs, SelfPatch's aggregation module; docs/method.md section 11).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TINY = {"hidden": 32, "layers": 2, "heads": 2, "mlp": 64, "patch": 8, "grid": 4}  # 32x32 images


def _randn(generator: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale


def backbone_state(
    *, cls: bool, hidden=32, layers=2, mlp=64, patch=8, grid=4, seed=0
) -> dict[str, torch.Tensor]:
    """timm/DINO-style backbone keys; `cls=True`: DINO (cls_token, class position, final norm), else SelfPatch."""
    g = torch.Generator().manual_seed(seed)
    d = hidden
    state = {
        "patch_embed.proj.weight": _randn(g, d, 3, patch, patch),
        "patch_embed.proj.bias": _randn(g, d),
        "pos_embed": _randn(g, 1, grid * grid + int(cls), d),
    }
    if cls:
        state.update(
            {"cls_token": _randn(g, 1, 1, d), "norm.weight": 1 + _randn(g, d), "norm.bias": _randn(g, d)}
        )
    for n in range(layers):
        b = f"blocks.{n}."
        state.update(
            {
                b + "norm1.weight": 1 + _randn(g, d),
                b + "norm1.bias": _randn(g, d),
                b + "attn.qkv.weight": _randn(g, 3 * d, d),
                b + "attn.qkv.bias": _randn(g, 3 * d),
                b + "attn.proj.weight": _randn(g, d, d),
                b + "attn.proj.bias": _randn(g, d),
                b + "norm2.weight": 1 + _randn(g, d),
                b + "norm2.bias": _randn(g, d),
                b + "mlp.fc1.weight": _randn(g, mlp, d),
                b + "mlp.fc1.bias": _randn(g, mlp),
                b + "mlp.fc2.weight": _randn(g, d, mlp),
                b + "mlp.fc2.bias": _randn(g, d),
            }
        )
    return state


def head_state(
    *, hidden=32, head_hidden=24, bottleneck=12, out_dim=16, seed=1, g_value=1.0
) -> dict[str, torch.Tensor]:
    """DINOHead keys: mlp.{0,2,4} Linear layers, weight-normalised last layer (`weight_g`, `weight_v`)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "mlp.0.weight": _randn(g, head_hidden, hidden),
        "mlp.0.bias": _randn(g, head_hidden),
        "mlp.2.weight": _randn(g, head_hidden, head_hidden),
        "mlp.2.bias": _randn(g, head_hidden),
        "mlp.4.weight": _randn(g, bottleneck, head_hidden),
        "mlp.4.bias": _randn(g, bottleneck),
        "last_layer.weight_g": torch.full((out_dim, 1), g_value),
        "last_layer.weight_v": _randn(g, out_dim, bottleneck),
    }


def aggregation_state(*, hidden=32, seed=2) -> dict[str, torch.Tensor]:
    """SelfPatch `ca_head`: class token, two class-attention blocks, the output norm."""
    g = torch.Generator().manual_seed(seed)
    d = hidden
    state = {"cls_token": _randn(g, 1, 1, d), "norm.weight": 1 + _randn(g, d), "norm.bias": _randn(g, d)}
    for n in range(2):
        b = f"cls_blocks.{n}."
        for name in ("attn.q", "attn.k", "attn.v", "attn.proj"):
            state[b + name + ".weight"] = _randn(g, d, d)
            state[b + name + ".bias"] = _randn(g, d)
        for name in ("norm1", "norm2"):
            state[b + name + ".weight"] = 1 + _randn(g, d)
            state[b + name + ".bias"] = _randn(g, d)
        state.update(
            {
                b + "mlp.fc1.weight": _randn(g, 4 * d, d),
                b + "mlp.fc1.bias": _randn(g, 4 * d),
                b + "mlp.fc2.weight": _randn(g, d, 4 * d),
                b + "mlp.fc2.bias": _randn(g, d),
            }
        )
    return state


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def reference_args(**overrides) -> argparse.Namespace:
    values = {
        "arch": "vit_small",
        "patch_size": 8,
        "out_dim": 16,
        "local_crops_number": 2,
        "lr": 0.0005,
        "epochs": 3,
        "batch_size_per_gpu": 4,
        "world_size": 2,
        "norm_last_layer": True,
        "k_num": 4,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def dino_training_checkpoint(*, center=True, **backbone_kwargs) -> dict:
    """DINO `checkpoint.pth`: student under DDP (`module.`), teacher plain, args, dino_loss.center."""
    teacher = {
        **prefixed("backbone.", backbone_state(cls=True, seed=10, **backbone_kwargs)),
        **prefixed("head.", head_state(seed=11)),
    }
    student = {
        **prefixed("module.backbone.", backbone_state(cls=True, seed=20, **backbone_kwargs)),
        **prefixed("module.head.", head_state(seed=21)),
    }
    checkpoint = {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "args": reference_args(arch="vit_tiny"),
    }
    if center:
        checkpoint["dino_loss"] = {"center": torch.randn(1, 16, generator=torch.Generator().manual_seed(3))}
    return checkpoint


def selfpatch_training_checkpoint() -> dict:
    """SelfPatch `checkpoint.pth`: backbone (no CLS, no norm), ca_head, c_head, p_head; student under DDP."""

    def network(seed: int) -> dict[str, torch.Tensor]:
        return {
            **prefixed("backbone.", backbone_state(cls=False, seed=seed)),
            **prefixed("ca_head.", aggregation_state(seed=seed + 1)),
            **prefixed("c_head.", head_state(seed=seed + 2)),
            **prefixed("p_head.", head_state(seed=seed + 3, out_dim=8)),
        }

    return {
        "student": prefixed("module.", network(30)),
        "teacher": network(40),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "args": reference_args(),
        "dino_loss": {"center": torch.zeros(1, 1, 16), "patch_center": torch.zeros(1, 8)},
        "fp16_scaler": {"scale": 65536.0},
    }


# ------------------------------------------------------------------------------------------------------------------
# The reference forward pass, as timm-style modules loaded with the reference keys
# ------------------------------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # fused rows: [0:D] query, [D:2D] key, [2D:3D] value, each split into heads
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pre-norm residual block
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReferenceViT(nn.Module):
    """The reference backbone: `cls=True` is DINO's ViT (CLS + final `norm`), `cls=False` SelfPatch's (neither)."""

    def __init__(self, *, cls: bool, hidden=32, layers=2, heads=2, mlp=64, patch=8, grid=4):
        super().__init__()
        self.cls, self.patch = cls, patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, hidden, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + int(cls), hidden))
        if cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
            self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.blocks = nn.ModuleList(_Block(hidden, heads, mlp) for _ in range(layers))

    def position_embedding(self, height: int, width: int, mode: str) -> torch.Tensor:
        """`mode="dino"`: the reference code's interpolation (scale factor with a +0.1 offset); `"size"`: bicubic
        to the exact target grid (what transformers' ViT and SigLIP do)."""
        grid = self.pos_embed[:, int(self.cls) :]
        side = int(math.sqrt(grid.shape[1]))
        rows, cols = height // self.patch, width // self.patch
        if rows == cols == side:
            return self.pos_embed
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if mode == "dino":
            grid = F.interpolate(
                grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic"
            )
        else:
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1) if self.cls else grid

    def forward(self, pixels: torch.Tensor, interpolation: str = "size") -> torch.Tensor:
        """Raw output of the last block (before any output norm), all tokens."""
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        if self.cls:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embedding(pixels.shape[-2], pixels.shape[-1], interpolation)
        for block in self.blocks:
            x = block(x)
        return x


def reference_vit(state: dict[str, torch.Tensor], *, cls: bool, **arch) -> ReferenceViT:
    model = ReferenceViT(cls=cls, **arch)
    model.load_state_dict(state, strict=True)
    return model.eval()


def reference_dino_head(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """DINOHead forward: Linear-GELU-Linear-GELU-Linear, L2 normalise, weight-normalised Linear (g * v / |v|)."""
    h = F.gelu(F.linear(x, state["mlp.0.weight"], state["mlp.0.bias"]))
    h = F.gelu(F.linear(h, state["mlp.2.weight"], state["mlp.2.bias"]))
    h = F.normalize(F.linear(h, state["mlp.4.weight"], state["mlp.4.bias"]), dim=-1)
    v = state["last_layer.weight_v"]
    weight = state["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    return F.linear(h, weight)
