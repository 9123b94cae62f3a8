"""Conversion of released SelfPatch and DINO checkpoints into Hugging Face folders.

Inputs (read with `torch.load(weights_only=True)`; the format is detected from the keys):

- SelfPatch reference training checkpoints (`student`/`teacher` with `backbone.`, `ca_head.`, `c_head.`,
  `p_head.` and DDP's `module.` prefixes) and flat backbone-only files (docs/method.md section 11);
- DINO training checkpoints (`student`/`teacher` with `backbone.` and `head.`) and flat backbone files (with
  `cls_token` and the final `norm`).
- MoBY training checkpoints (Transformer-SSL: `encoder.`, `encoder_k.`, `projector*.`, `predictor.`, queues) with
  Swin or DeiT encoders: converted by `convert_moby` into a `SwinModel` / `ViTModel` backbone.

Outputs:

- `backbone/`: a folder that plain `AutoModel.from_pretrained` loads and that reproduces the reference backbone's
  features exactly, with its image processor and model card. DINO backbones become `ViTModel`s. The SelfPatch
  reference backbone has no CLS token, which `ViTModel` always prepends (and which would change every patch feature
  through attention), so it becomes a `SiglipVisionModel` (`vision_use_head=False`): patch embedding + learned
  position embedding, pre-norm blocks, a final LayerNorm (`ca_head.norm`, the reference's output norm), no CLS.
- `pretraining/` (DINO inputs only): a `SelfPatchViTForPretraining` checkpoint with student, teacher, heads and
  centres, ready for continued training with the patch objective. Our pretraining model is built on `ViTModel`,
  so a CLS-free SelfPatch backbone cannot become one exactly.

`selfpatch-convert CHECKPOINT OUTPUT_DIR` (or `python -m selfpatch_hf.conversion.dino_selfpatch`) runs it from the command line.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import shutil
import sys
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from selfpatch_hf.cli.errors import CommandFailure, HelpFormatter, UsageError, run_command

# torch and transformers are imported inside the functions that use them, so `selfpatch-convert --help` is fast.
if TYPE_CHECKING:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTModel

    from selfpatch_hf.hub.cards.backbone import BackboneCardInfo

logger = logging.getLogger(__name__)

CheckpointFormat = Literal[
    "selfpatch-training",
    "selfpatch-backbone",
    "dino-training",
    "dino-backbone",
    "moby-swin-training",
    "moby-vit-training",
]
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
# Tolerance of the converter's self-check against the reference forward pass (float32).
VERIFY_TOLERANCE = 1e-4


class ConversionError(ValueError):
    """The file is not a supported checkpoint, or its keys do not match the reference format."""


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ReferenceCheckpoint:
    """The parts of a reference checkpoint, with prefixes removed (`backbone` holds timm-style keys)."""

    format: CheckpointFormat
    path: Path
    backbone: dict[str, torch.Tensor]
    network: str | None = None  # "teacher" / "student" for training checkpoints
    aggregation: dict[str, torch.Tensor] | None = None  # SelfPatch `ca_head.*`
    image_head: dict[str, torch.Tensor] | None = None  # SelfPatch `c_head.*`, DINO `head.*`
    patch_head: dict[str, torch.Tensor] | None = None  # SelfPatch `p_head.*`
    # the student when `network` is the teacher, and vice versa
    other_network: ReferenceCheckpoint | None = None
    image_center: torch.Tensor | None = None
    patch_center: torch.Tensor | None = None
    args: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None

    @property
    def family(self) -> Literal["selfpatch", "dino"]:
        return "selfpatch" if self.format.startswith("selfpatch") else "dino"

    @property
    def is_training_checkpoint(self) -> bool:
        return self.format.endswith("training")


# MoBY's `save_checkpoint` pickles its yacs `CfgNode` config (a dict subclass): read it as a plain OrderedDict, so
# that neither yacs nor any code of the file's is needed. Nothing else outside torch's allow-list is accepted.
_YACS_CONFIG_AS_DICT = (OrderedDict, "yacs.config.CfgNode")


def _torch_load(path: Path) -> Any:
    import torch

    # Reference scripts save `args` as an argparse.Namespace: the only other non-tensor global we allow.
    try:
        with torch.serialization.safe_globals([argparse.Namespace, _YACS_CONFIG_AS_DICT]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # UnpicklingError for disallowed globals, RuntimeError for non-torch files
        raise ConversionError(
            f"{path} cannot be read as a PyTorch checkpoint with torch.load(weights_only=True): {error}\n"
            "Only tensors, plain containers and argparse.Namespace are accepted; this converter never runs an "
            "unrestricted unpickler on downloaded files."
        ) from error


def _is_tensor_dict(value: Any) -> bool:
    import torch

    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Removes `prefix` from every key when all keys carry it (DDP's `module.`, wrappers' `backbone.`)."""
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return dict(state)


def _split_network(state: Mapping[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    state = _strip_prefix(state, "module.")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in ("backbone", "head", "ca_head", "c_head", "p_head") and rest:
            parts.setdefault(prefix, {})[rest] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"Unexpected keys in {where} (expected only backbone.*, head.* for DINO or backbone.*, ca_head.*, "
            f"c_head.*, p_head.* for SelfPatch): {_listing(unknown)}"
        )
    if "backbone" not in parts:
        raise ConversionError(f"{where} has no backbone.* keys; found prefixes {sorted(parts)}.")
    return parts


def _network_checkpoint(
    parts: dict[str, dict[str, torch.Tensor]], path: Path, network: str, where: str
) -> ReferenceCheckpoint:
    selfpatch_parts = {"ca_head", "c_head", "p_head"}
    if selfpatch_parts & set(parts):
        missing = selfpatch_parts - set(parts)
        if missing or "head" in parts:
            raise ConversionError(
                f"{where} mixes SelfPatch and DINO heads or lacks some: has {sorted(parts)}, a SelfPatch network "
                "has backbone, ca_head, c_head, p_head."
            )
        return ReferenceCheckpoint(
            format="selfpatch-training",
            path=path,
            network=network,
            backbone=parts["backbone"],
            aggregation=parts["ca_head"],
            image_head=parts["c_head"],
            patch_head=parts["p_head"],
        )
    if "head" not in parts:
        raise ConversionError(
            f"{where} has a backbone but no head (DINO: head.*; SelfPatch: ca_head/c_head/p_head)."
        )
    return ReferenceCheckpoint(
        format="dino-training",
        path=path,
        network=network,
        backbone=parts["backbone"],
        image_head=parts["head"],
    )


def _training_args(args: Any, path: Path) -> dict[str, Any]:
    """The reference scripts' `args` (an argparse.Namespace) as a dict. They only fill in metadata and head
    settings, so anything else (a string, a list) is ignored with a warning instead of stopping the conversion."""
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping) and all(isinstance(key, str) for key in args):
        return dict(args)
    if args is not None:
        logger.warning(
            "%s: ignoring its 'args' entry (a %s, not the reference scripts' argparse.Namespace); the "
            "architecture comes from the weights and the model card lacks the training settings.",
            path.name,
            type(args).__name__,
        )
    return {}


def load_reference_checkpoint(
    path: str | Path, network: Literal["teacher", "student"] = "teacher"
) -> ReferenceCheckpoint:
    """Reads a SelfPatch or DINO checkpoint and detects its format (no conversion yet, keys not yet validated).

    For training checkpoints, `network` picks the side converted into the backbone (the teacher is what the papers
    evaluate); the other side is kept in `other_network` for the pretraining checkpoint.
    """
    path = Path(path)
    return _reference_checkpoint(_torch_load(path), path, network)


def _reference_checkpoint(
    obj: Any, path: Path, network: Literal["teacher", "student"] = "teacher"
) -> ReferenceCheckpoint:
    if network not in ("teacher", "student"):
        raise ValueError(f'network must be "teacher" or "student", got {network!r}.')
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary.")
    # Some tools wrap a state dict one level down.
    for wrapper in ("state_dict", "model"):
        if wrapper in obj and _is_tensor_dict(obj[wrapper]) and not ("student" in obj or "teacher" in obj):
            obj = obj[wrapper]
            break

    if "student" in obj or "teacher" in obj:
        if not isinstance(obj.get(network), Mapping):
            raise ConversionError(
                f"{path} is a training checkpoint without a {network!r} network: keys {sorted(obj)}."
            )
        checkpoints = {}
        for side in ("teacher", "student"):
            if isinstance(obj.get(side), Mapping):
                where = f"{path.name}[{side!r}]"
                checkpoints[side] = _network_checkpoint(_split_network(obj[side], where), path, side, where)
        main = checkpoints[network]
        other = checkpoints.get("student" if network == "teacher" else "teacher")
        if other is not None and other.format != main.format:
            raise ConversionError(f"{path}: student is {other.format} but teacher is {main.format}.")
        main.other_network = other
        main.args = _training_args(obj.get("args"), path)
        main.epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
        loss_state = obj.get("dino_loss")
        if isinstance(loss_state, Mapping):
            main.image_center = loss_state.get("center")
            main.patch_center = loss_state.get("patch_center")
        return main

    if not _is_tensor_dict(obj):
        raise ConversionError(
            f"{path} is neither a training checkpoint (with 'student'/'teacher') nor a flat dictionary of tensors; "
            f"top-level keys: {_listing(list(obj))}."
        )
    state = _strip_prefix(_strip_prefix(obj, "module."), "backbone.")
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise ConversionError(
            f"{path} is not a SelfPatch or DINO ViT checkpoint: no pos_embed / patch_embed.proj.weight among "
            f"{_listing(list(state))}."
        )
    fmt: CheckpointFormat = "dino-backbone" if "cls_token" in state else "selfpatch-backbone"
    return ReferenceCheckpoint(format=fmt, path=path, backbone=state)


# ---------------------------------------------------------------------------------------------------------------
# Architecture and key validation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BackboneArchitecture:
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


def _listing(keys: list[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_keys(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], where: str, hint: str = ""
) -> None:
    """Fails listing every missing, unexpected and mis-shaped key (never a silent non-strict load)."""
    missing = [key for key in expected if key not in actual]
    unexpected = [key for key in actual if key not in expected]
    misshaped = [
        f"{key}: {tuple(actual[key].shape)} (expected {expected[key]})"
        for key in expected
        if key in actual and tuple(actual[key].shape) != tuple(expected[key])
    ]
    if missing or unexpected or misshaped:
        lines = [f"{where} does not match the reference format{hint}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped keys ({len(misshaped)}): {_listing(misshaped)}")
        raise ConversionError("\n".join(lines))


def _arch_from_name(name: str) -> tuple[int, int]:
    name = name.replace("-", "_")
    if name not in REFERENCE_ARCHS:
        raise ConversionError(f"Unknown architecture {name!r}; known: {', '.join(sorted(REFERENCE_ARCHS))}.")
    return REFERENCE_ARCHS[name]


def _dims(state: Mapping[str, torch.Tensor], where: Iterable[tuple[str, int]]) -> list[int]:
    """The size along `axis` of each named tensor that exists and has that axis."""
    sizes = []
    for key, axis in where:
        tensor = state.get(key)
        if tensor is not None and tensor.ndim > (axis if axis >= 0 else -axis - 1):
            sizes.append(int(tensor.shape[axis]))
    return sizes


def _majority(sizes: list[int]) -> int | None:
    """The most frequent size (ties: the first seen); None when nothing shows it."""
    return Counter(sizes).most_common(1)[0][0] if sizes else None


def infer_architecture(
    checkpoint: ReferenceCheckpoint, arch: str | None = None, num_heads: int | None = None
) -> BackboneArchitecture:
    """Reads the architecture off the weights; the head count (invisible in weights) comes from, in order:
    `num_heads`, `arch`, the checkpoint's `args.arch`, or the standard ViT-Ti/S/B head count for the width."""
    state = checkpoint.backbone
    where = f"{checkpoint.path.name} ({checkpoint.format})"
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise ConversionError(
            f"{where}: patch_embed.proj.weight must be a (D, 3, p, p) conv kernel, got "
            f"{None if proj is None else tuple(proj.shape)}."
        )
    patch = proj.shape[-1]
    block_ids = sorted({int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))})
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise ConversionError(f"{where}: transformer blocks must be numbered 0..L-1, found {block_ids}.")
    # Sizes are read off every tensor that shows them and the majority wins, so that one damaged tensor is
    # reported as the one mis-shaped key instead of making all of its well-shaped siblings look wrong.
    hidden = _majority(
        _dims(state, [("patch_embed.proj.weight", 0), ("patch_embed.proj.bias", 0), ("pos_embed", -1)])
        + _dims(
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
    intermediate = _majority(
        _dims(
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
    has_cls = checkpoint.family == "dino"
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3:
        raise ConversionError(
            f"{where}: pos_embed must be (1, N, D), got {None if pos is None else tuple(pos.shape)}."
        )
    num_patches = pos.shape[1] - int(has_cls)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ConversionError(
            f"{where}: pos_embed has {pos.shape[1]} positions; a square grid needs a square number of patch positions "
            f"({'plus one class position ' if has_cls else ''}e.g. 196 for 224/16)."
        )

    args_arch = checkpoint.args.get("arch")
    if num_heads is not None:
        heads, source = num_heads, "--num-heads"
    elif arch is not None:
        arch_hidden, heads = _arch_from_name(arch)
        source = f"--arch {arch}"
        if arch_hidden != hidden:
            raise ConversionError(
                f"--arch {arch} has hidden size {arch_hidden}, but the weights have {hidden}."
            )
    elif isinstance(args_arch, str) and args_arch.replace("-", "_") in REFERENCE_ARCHS:
        arch_hidden, heads = REFERENCE_ARCHS[args_arch.replace("-", "_")]
        source = f"the checkpoint's args.arch={args_arch!r}"
        if arch_hidden != hidden:
            raise ConversionError(
                f"args.arch={args_arch!r} has hidden size {arch_hidden}, but the weights have {hidden}."
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
    if (
        name is None
        and isinstance(args_arch, str)
        and REFERENCE_ARCHS.get(args_arch.replace("-", "_"), (0,))[0] == hidden
    ):
        name = args_arch.replace("-", "_")
    name = name or {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}.get(hidden, f"vit_h{hidden}")
    return BackboneArchitecture(
        hidden_size=hidden,
        num_hidden_layers=len(block_ids),
        num_attention_heads=heads,
        intermediate_size=intermediate,
        patch_size=patch,
        image_size=side * patch,
        has_cls_token=has_cls,
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


def expected_aggregation_keys(
    hidden: int, num_blocks: int = 2, mlp_ratio: float = 4.0
) -> dict[str, tuple[int, ...]]:
    d, i = hidden, int(hidden * mlp_ratio)
    keys: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "norm.weight": (d,), "norm.bias": (d,)}
    for n in range(num_blocks):
        prefix = f"cls_blocks.{n}."
        for name in ("attn.q", "attn.k", "attn.v", "attn.proj"):
            keys[f"{prefix}{name}.weight"] = (d, d)
            keys[f"{prefix}{name}.bias"] = (d,)
        for name in ("norm1", "norm2"):
            keys[f"{prefix}{name}.weight"] = (d,)
            keys[f"{prefix}{name}.bias"] = (d,)
        keys.update(
            {
                f"{prefix}mlp.fc1.weight": (i, d),
                f"{prefix}mlp.fc1.bias": (i,),
                f"{prefix}mlp.fc2.weight": (d, i),
            }
        )
        keys[f"{prefix}mlp.fc2.bias"] = (d,)
    return keys


@dataclass
class HeadArchitecture:
    in_dim: int
    hidden_dim: int
    bottleneck_dim: int
    out_dim: int
    num_layers: int

    def expected_keys(self) -> dict[str, tuple[int, ...]]:
        keys: dict[str, tuple[int, ...]] = {}
        if self.num_layers == 1:
            keys = {"mlp.weight": (self.bottleneck_dim, self.in_dim), "mlp.bias": (self.bottleneck_dim,)}
        else:
            dims = [self.in_dim] + [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
            for n in range(self.num_layers):
                keys[f"mlp.{2 * n}.weight"] = (dims[n + 1], dims[n])
                keys[f"mlp.{2 * n}.bias"] = (dims[n + 1],)
        keys["last_layer.weight_g"] = (self.out_dim, 1)
        keys["last_layer.weight_v"] = (self.out_dim, self.bottleneck_dim)
        return keys


def infer_head(state: Mapping[str, torch.Tensor], in_dim: int, where: str) -> HeadArchitecture:
    """DINO projection head: Linear/GELU MLP at even indices (no BatchNorm), then the weight-normalised layer."""
    odd = [key for key in state if re.match(r"mlp\.\d*[13579]\.", key)]
    if odd:
        raise ConversionError(
            f"{where} has parameters at odd MLP indices ({_listing(odd)}): "
            "a head with BatchNorm (use_bn_in_head=True) is not supported; only the backbone can be converted "
            "(pass --no-pretraining)."
        )
    linear_ids = sorted({int(m.group(1)) for key in state if (m := re.match(r"mlp\.(\d+)\.weight$", key))})
    v = state.get("last_layer.weight_v")
    if v is None:
        raise ConversionError(f"{where} has no last_layer.weight_v (a weight-normalised last layer).")
    if not linear_ids:
        if "mlp.weight" not in state:
            raise ConversionError(f"{where} has no MLP weights (mlp.0.weight or mlp.weight).")
        head = HeadArchitecture(
            in_dim, state["mlp.weight"].shape[0], state["mlp.weight"].shape[0], v.shape[0], 1
        )
    else:
        last = linear_ids[-1]
        inner = [i for i in linear_ids if i != last]
        # majority of every tensor that shows a size (see `infer_architecture`)
        hidden = _dims(state, [(f"mlp.{i}.{kind}", 0) for i in inner for kind in ("weight", "bias")])
        hidden += _dims(state, [(f"mlp.{i}.weight", 1) for i in linear_ids if i != 0])
        bottleneck = _dims(
            state, [(f"mlp.{last}.weight", 0), (f"mlp.{last}.bias", 0), ("last_layer.weight_v", 1)]
        )
        head = HeadArchitecture(
            in_dim=in_dim,
            hidden_dim=_majority(hidden) or state["mlp.0.weight"].shape[0],
            bottleneck_dim=_majority(bottleneck),
            out_dim=_majority(_dims(state, [("last_layer.weight_v", 0), ("last_layer.weight_g", 0)])),
            num_layers=len(linear_ids),
        )
    _check_keys(state, head.expected_keys(), where)
    return head


def validate_checkpoint(checkpoint: ReferenceCheckpoint, arch: BackboneArchitecture) -> None:
    """Every key of every converted part must be known and well shaped."""
    sides = [checkpoint] + ([checkpoint.other_network] if checkpoint.other_network is not None else [])
    for side in sides:
        label = f"{checkpoint.path.name}" + (f"[{side.network!r}]" if side.network else "")
        prefix = "backbone." if side.is_training_checkpoint else ""
        _check_keys(
            side.backbone,
            expected_backbone_keys(arch),
            f"{label} {prefix or 'backbone '}keys",
            f" of a {arch.num_hidden_layers}-layer, width-{arch.hidden_size}, patch-{arch.patch_size} "
            f"{'DINO' if arch.has_cls_token else 'SelfPatch'} ViT",
        )
        if side.aggregation is not None:
            _check_keys(
                side.aggregation, expected_aggregation_keys(arch.hidden_size), f"{label} ca_head keys"
            )
        if side.image_head is not None:
            infer_head(
                side.image_head,
                arch.hidden_size,
                f"{label} {'c_head' if side.family == 'selfpatch' else 'head'}",
            )
        if side.patch_head is not None:
            infer_head(side.patch_head, arch.hidden_size, f"{label} p_head")
    non_finite = []
    for side in sides:
        label = f"[{side.network!r}] " if side.network else ""
        parts = {
            "backbone.": side.backbone,
            "ca_head.": side.aggregation,
            ("c_head." if side.family == "selfpatch" else "head."): side.image_head,
            "p_head.": side.patch_head,
        }
        for prefix, part in parts.items():
            non_finite += [f"{label}{prefix}{key}" for key in _non_finite_keys(part or {})]
    centers = {"dino_loss.center": checkpoint.image_center, "dino_loss.patch_center": checkpoint.patch_center}
    non_finite += [
        f"{name}" for name in _non_finite_keys({k: v for k, v in centers.items() if v is not None})
    ]
    if non_finite:
        raise ConversionError(
            f"{checkpoint.path} holds non-finite weights (NaN or infinity) in {len(non_finite)} tensor(s): "
            f"{_listing(non_finite)}. The checkpoint is damaged or was saved after training diverged; convert an "
            "earlier checkpoint of the run."
        )


def _non_finite_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    import torch

    return [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


# ---------------------------------------------------------------------------------------------------------------
# Building the transformers backbones
# ---------------------------------------------------------------------------------------------------------------


def _split_qkv(state: Mapping[str, torch.Tensor], n: int, dim: int) -> dict[str, torch.Tensor]:
    # The fused projection stacks rows [0:D] query, [D:2D] key, [2D:3D] value (docs/method.md section 11).
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
    """A `ViTModel` holding a DINO backbone: CLS, position grid with class position, final norm.

    `AutoModel` builds a `ViTModel` with a pooler, which would be randomly initialised if the file had none. With
    `identity_pooler` the saved pooler is the identity (pooler_act "linear"), so `pooler_output` (and
    `pipeline(..., pool=True)`) is DINO's image representation, the normalised CLS token, and nothing is random.
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
# Reference forward pass (the converter's self-check)
# ---------------------------------------------------------------------------------------------------------------


def reference_backbone_forward(
    state: Mapping[str, torch.Tensor],
    arch: BackboneArchitecture,
    pixel_values: torch.Tensor,
    output_norm: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The timm/DINO ViT forward of the reference code on its own state dict, at the native resolution:
    patch conv, [CLS,] + pos_embed, pre-norm blocks with fused qkv, then `output_norm` (DINO's `norm` or
    SelfPatch's `ca_head.norm`; `None` = LayerNorm without affine)."""
    import torch

    with torch.no_grad():
        return _reference_forward(state, arch, pixel_values, output_norm)


def _reference_forward(
    state: Mapping[str, torch.Tensor],
    arch: BackboneArchitecture,
    pixel_values: torch.Tensor,
    output_norm: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    d, heads = arch.hidden_size, arch.num_attention_heads
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
            (attn @ v).transpose(1, 2).reshape(batch, tokens, d), p["attn.proj.weight"], p["attn.proj.bias"]
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


# ---------------------------------------------------------------------------------------------------------------
# Pretraining checkpoint (DINO inputs)
# ---------------------------------------------------------------------------------------------------------------


def _head_state(head: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference `nn.utils.weight_norm` keys -> `nn.utils.parametrizations.weight_norm` keys (g = original0)."""
    renamed = {
        "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
        "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
    }
    return {renamed.get(key, key): value.float() for key, value in head.items()}


def dino_to_pretraining_model(
    checkpoint: ReferenceCheckpoint,
    arch: BackboneArchitecture,
    recipe: Literal["selfpatch", "dino"] = "selfpatch",
):
    """A `SelfPatchViTForPretraining` initialised from a DINO checkpoint, ready for continued training.

    - Backbones: teacher and student from the checkpoint (a backbone-only file initialises both).
    - Image head: DINO's `head` (training checkpoints; fresh otherwise). Image centre: `dino_loss.center`.
    - `recipe="selfpatch"` (default): the SelfPatch objective, `image_representation="aggregation"`, lambda = 0.1;
      the aggregation module and the patch head start fresh (DINO has none). The image head then reads the
      aggregation module's summary instead of the CLS token it was trained on: with a CLS image representation the
      aggregation module would receive no gradient at all (it only learns through the image-level path).
    - `recipe="dino"`: plain DINO continuation (`image_representation="cls"`, lambda = 0), an exact restart.
    """
    import torch

    from selfpatch_hf import SelfPatchConfig, SelfPatchViTForPretraining

    teacher = checkpoint if checkpoint.network in (None, "teacher") else checkpoint.other_network
    student = checkpoint.other_network if checkpoint.network == "teacher" else checkpoint
    teacher, student = teacher or student, student or teacher
    args = checkpoint.args
    backbone_config = vit_config(arch)
    overrides: dict[str, Any] = {
        "global_crop_size": arch.image_size,
        "image_representation": "aggregation" if recipe == "selfpatch" else "cls",
        "patch_loss_weight": 0.1 if recipe == "selfpatch" else 0.0,
    }
    if isinstance(args.get("local_crops_number"), int):
        overrides["num_local_crops"] = args["local_crops_number"]
    if isinstance(args.get("drop_path_rate"), (int, float)):
        overrides["drop_path_rate"] = float(args["drop_path_rate"])
    head = None
    if checkpoint.image_head is not None:
        head = infer_head(checkpoint.image_head, arch.hidden_size, "head")
        g = checkpoint.image_head["last_layer.weight_g"]
        norm_last_layer = args.get("norm_last_layer")
        if not isinstance(norm_last_layer, bool):
            norm_last_layer = bool(torch.all(g == 1))
        overrides.update(
            image_out_dim=head.out_dim,
            head_hidden_dim=head.hidden_dim,
            head_bottleneck_dim=head.bottleneck_dim,
            head_num_layers=head.num_layers,
            norm_last_layer=norm_last_layer,
        )
    elif isinstance(args.get("out_dim"), int):
        overrides["image_out_dim"] = args["out_dim"]
    config = SelfPatchConfig(backbone_config=backbone_config, **overrides)
    model = SelfPatchViTForPretraining(config).eval()
    with torch.no_grad():
        for network, source in ((model.student, student), (model.teacher, teacher)):
            vit = dino_backbone_to_vit(source.backbone, arch, identity_pooler=False)
            network.backbone.load_state_dict(vit.state_dict(), strict=True)
            if source.image_head is not None:
                network.image_head.load_state_dict(_head_state(source.image_head), strict=True)
        if checkpoint.image_center is not None:
            center = checkpoint.image_center.float().reshape(1, -1)
            if center.shape != model.objective.image_center.shape:
                raise ConversionError(
                    f"dino_loss.center has shape {tuple(checkpoint.image_center.shape)}, expected "
                    f"{tuple(model.objective.image_center.shape)} (the image head's output size)."
                )
            model.objective.image_center.copy_(center)
    # the student must train, the teacher must not: restore what loading could have touched
    model.teacher.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------------------------


def _verify_against_reference(
    staged: Path, image_size: int, reference_forward: Callable[[torch.Tensor], torch.Tensor], output_dir: Path
) -> float:
    """Reloads the staged backbone folder with `AutoModel` (as a user would) and compares its `last_hidden_state`
    on two fixed random images with the reference forward pass; returns the largest absolute difference, raising
    `ConversionError` above `VERIFY_TOLERANCE`. The input weights are known to be finite and well shaped by then,
    so a difference is a conversion bug."""
    import torch
    from transformers import AutoModel

    reloaded = AutoModel.from_pretrained(staged).eval()
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = reloaded(pixel_values=pixels).last_hidden_state
    difference = (ours - reference_forward(pixels)).abs().max().item()
    if not difference <= VERIFY_TOLERANCE:
        raise ConversionError(
            f"The converted backbone differs from the reference forward pass by {difference:.3g} "
            f"(tolerance {VERIFY_TOLERANCE}); nothing was written to {output_dir}. The input weights are "
            "finite and well shaped, so the conversion itself is wrong: please report it."
        )
    return difference


def _use_default_permissions(folder: Path) -> None:
    """The staged folders and files get the user's normal permissions (mkdtemp makes the folder 0700 and
    save_pretrained writes model.safetensors 0600)."""
    from selfpatch_hf.atomic_folders import apply_default_permissions

    apply_default_permissions(folder)


def _move_into_place(
    staging: Path, staged_backbone: Path, staged_pretraining: Path | None, output_dir: Path
) -> tuple[Path, Path | None]:
    """Gives the staged folders the user's permissions and swaps them in as OUTPUT_DIR/backbone and (when staged)
    OUTPUT_DIR/pretraining, each atomically; returns the two folders (None: no pretraining folder written)."""
    from selfpatch_hf.atomic_folders import replace_directory

    _use_default_permissions(staging)
    backbone_dir = output_dir / "backbone"
    replace_directory(staged_backbone, backbone_dir)
    pretraining_dir = None
    if staged_pretraining is not None:
        pretraining_dir = output_dir / "pretraining"
        replace_directory(staged_pretraining, pretraining_dir)
    return backbone_dir, pretraining_dir


@dataclass
class ConversionResult:
    format: CheckpointFormat
    architecture: Any  # BackboneArchitecture (ViTs) or convert_moby.SwinArchitecture
    backbone_dir: Path
    model_type: str  # of the backbone folder: "vit", "siglip_vision_model" or "swin"
    # converted model vs the reference forward pass on random input (None: not verified)
    max_abs_difference: float | None
    pretraining_dir: Path | None = None
    notes: list[str] = field(default_factory=list)  # things the user must know (also in the model card)


def _card_info(
    checkpoint: ReferenceCheckpoint, arch: BackboneArchitecture, model_type: str, notes: list[str]
) -> BackboneCardInfo:
    from selfpatch_hf.hub.cards.backbone import BackboneCardInfo

    args = checkpoint.args
    is_selfpatch = checkpoint.family == "selfpatch"
    batch = None
    if isinstance(args.get("batch_size_per_gpu"), int) and isinstance(args.get("world_size"), int):
        batch = args["batch_size_per_gpu"] * args["world_size"]
    local_crops = args.get("local_crops_number") if isinstance(args.get("local_crops_number"), int) else None
    return BackboneCardInfo(
        architecture=f"{arch.arch_name}/{arch.patch_size}",
        patch_size=arch.patch_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        image_size=arch.image_size,
        model_class="ViTModel" if model_type == "vit" else "SiglipVisionModel",
        num_prefix_tokens=1 if arch.has_cls_token else 0,
        source="converted",
        converted_from=checkpoint.path.name,
        objective="selfpatch" if is_selfpatch else "dino",
        exported_network=checkpoint.network or "teacher",  # released backbone-only files are teachers
        warnings=list(notes),
        epochs=checkpoint.epoch if checkpoint.epoch is not None else args.get("epochs"),
        global_batch_size=batch,
        learning_rate=args.get("lr") if isinstance(args.get("lr"), float) else None,
        patch_loss_weight=0.1 if is_selfpatch else None,  # hard-coded in the reference loss
        num_positives=args.get("k_num") if is_selfpatch and isinstance(args.get("k_num"), int) else None,
        neighborhood_size=3 if is_selfpatch else None,
        image_representation=("aggregation" if is_selfpatch else "cls") if args else None,
        global_crop_size=arch.image_size if args else None,
        local_crop_size=96 if local_crops else None,
        num_global_crops=2 if args else None,
        num_local_crops=local_crops,
        notes=(
            "Converted from the reference SelfPatch code. Its backbone has no CLS token, so this is a "
            "`SiglipVisionModel` (patch embedding, learned position embedding, pre-norm blocks, final LayerNorm) "
            "whose `last_hidden_state` holds only patch tokens. `last_hidden_state` is after the output norm "
            "(`ca_head.norm`, what the patch head reads); `output_hidden_states=True` gives the raw block outputs "
            "(`hidden_states[-1]`), which the reference video-segmentation evaluation uses."
            if is_selfpatch
            else None
        ),
    )


def _write_pretraining_card(folder: Path, checkpoint: ReferenceCheckpoint, recipe: str) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        license="apache-2.0", tags=["selfpatch", "dino", "self-supervised", "pretraining-checkpoint"]
    )
    fresh = "image head, " if checkpoint.image_head is None else ""
    if recipe == "selfpatch":
        plan = (
            'It is set up to continue with the SelfPatch objective (`image_representation="aggregation"`, '
            f"`patch_loss_weight=0.1`): the {fresh}aggregation module and patch head are freshly initialised, and "
            "the DINO image head now reads the aggregation module's summary instead of the CLS token (with a CLS "
            "image representation the aggregation module would never receive a gradient)."
        )
    else:
        plan = 'It is set up to continue plain DINO training (`image_representation="cls"`, `patch_loss_weight=0`).'
    content = (
        f"---\n{data.to_yaml()}\n---\n\n# SelfPatch pretraining checkpoint converted from `{checkpoint.path.name}`\n\n"
        "Student, EMA teacher, projection heads and centres of `selfpatch_hf.SelfPatchViTForPretraining`, converted "
        f"from a DINO checkpoint ({checkpoint.format}). {plan}\n\n"
        "```python\nimport selfpatch_hf  # registers the model with the Auto classes\n"
        "from selfpatch_hf import SelfPatchViTForPretraining\n\n"
        'model = SelfPatchViTForPretraining.from_pretrained("path/or/repo")\n```\n'
    )
    ModelCard(content).save(folder / "README.md")


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    *,
    network: Literal["teacher", "student"] | None = None,
    arch: str | None = None,
    num_heads: int | None = None,
    output_norm_from: str | Path | None = None,
    pretraining: bool = True,
    pretraining_recipe: Literal["selfpatch", "dino", "moby"] = "selfpatch",
    verify: bool = True,
) -> ConversionResult:
    """Converts a SelfPatch or DINO checkpoint into `output_dir/backbone` (+ `output_dir/pretraining` for DINO).

    MoBY checkpoints (Transformer-SSL, Swin or DeiT encoders) are detected by their keys and converted by
    `convert_moby`: the backbone, and a `SelfPatchForPretraining` (image_objective "moby") with both networks, the
    heads and the queues.

    Args:
        network: side of a training checkpoint that becomes the backbone; default: the side the method's own
            evaluation uses (DINO/SelfPatch: the teacher; MoBY: the online encoder, "student"; "teacher" is MoBY's
            momentum encoder `encoder_k`).
        arch / num_heads: the head count, when neither the checkpoint's `args` nor the width tell it.
        output_norm_from: a SelfPatch training checkpoint whose `ca_head.norm` supplies the output norm of a
            backbone-only SelfPatch file (which has none).
        pretraining: also write the `SelfPatchViTForPretraining` checkpoint (DINO and MoBY inputs).
        pretraining_recipe: what that checkpoint continues with: "selfpatch" (the patch objective added to the
            checkpoint's method), or the method alone ("dino" for DINO inputs, "moby" for MoBY inputs).
        verify: compare the saved folder, reloaded with `AutoModel`, with the reference forward pass on random
            input, and fail above `VERIFY_TOLERANCE`.
    """
    checkpoint_path = Path(checkpoint_path)
    loaded = _torch_load(checkpoint_path)
    from selfpatch_hf.conversion.moby import is_moby_checkpoint

    if is_moby_checkpoint(loaded):
        if output_norm_from is not None:
            raise ConversionError("--output-norm-from is for SelfPatch backbone files, not MoBY checkpoints.")
        return _convert_moby(
            loaded,
            checkpoint_path,
            Path(output_dir),
            network or "student",
            arch,
            num_heads,
            pretraining,
            verify,
            pretraining_recipe,
        )
    if pretraining_recipe == "moby":
        raise ConversionError(
            "--pretraining-recipe moby is for MoBY checkpoints; a DINO checkpoint continues as 'dino' or 'selfpatch'."
        )
    network = network or "teacher"
    checkpoint = _reference_checkpoint(loaded, checkpoint_path, network=network)
    architecture = infer_architecture(checkpoint, arch=arch, num_heads=num_heads)
    validate_checkpoint(checkpoint, architecture)
    notes: list[str] = []

    output_norm: tuple[torch.Tensor, torch.Tensor] | None
    if checkpoint.family == "dino":
        output_norm = (checkpoint.backbone["norm.weight"], checkpoint.backbone["norm.bias"])
        model = dino_backbone_to_vit(checkpoint.backbone, architecture)
        model_type = "vit"
    else:
        if checkpoint.aggregation is not None:
            output_norm = (checkpoint.aggregation["norm.weight"], checkpoint.aggregation["norm.bias"])
            if output_norm_from is not None:
                raise ConversionError(
                    "--output-norm-from is for backbone-only files; this checkpoint has ca_head.norm."
                )
        elif output_norm_from is not None:
            donor = load_reference_checkpoint(output_norm_from, network=network)  # type: ignore[arg-type]
            if donor.aggregation is None:
                raise ConversionError(
                    f"{output_norm_from} has no ca_head.norm (it is a {donor.format} file)."
                )
            donor_norm = (donor.aggregation.get("norm.weight"), donor.aggregation.get("norm.bias"))
            expected = {"norm.weight": (architecture.hidden_size,), "norm.bias": (architecture.hidden_size,)}
            _check_keys(
                {k: donor.aggregation[k] for k in expected if k in donor.aggregation},
                expected,
                f"{output_norm_from} ca_head.norm",
            )
            bad = _non_finite_keys(
                dict(zip(("ca_head.norm.weight", "ca_head.norm.bias"), donor_norm, strict=True))
            )
            if bad:
                raise ConversionError(
                    f"{output_norm_from} holds non-finite weights (NaN or infinity) in {', '.join(bad)}."
                )
            output_norm = donor_norm  # type: ignore[assignment]
            notes.append(f"The output norm (`ca_head.norm`) was taken from `{Path(output_norm_from).name}`.")
        else:
            output_norm = None
            notes.append(
                "This file holds only the backbone, without the output norm (`ca_head.norm`) of the reference "
                "model. `last_hidden_state` is the last block's output standardised by a LayerNorm with weight 1 "
                "and bias 0 (not the trained affine norm); the raw block outputs are `hidden_states[-1]` "
                "(`output_hidden_states=True`). Convert with `--output-norm-from` and the full training "
                "checkpoint to get the trained norm."
            )
        model = selfpatch_backbone_to_siglip(checkpoint.backbone, architecture, output_norm)
        model_type = "siglip_vision_model"

    from selfpatch_hf.export.backbone import build_image_processor
    from selfpatch_hf.hub.cards.backbone import write_backbone_card

    # Everything is written into a staging folder beside OUTPUT_DIR and moved into place only after the self-check
    # passed: a failed conversion never touches an earlier export in the same folder.
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.converting-", dir=output_dir.parent))
    try:
        _use_default_permissions(staging)  # mkdtemp makes it private (0700); the export is an ordinary folder
        staged_backbone = staging / "backbone"
        model.save_pretrained(staged_backbone)
        build_image_processor(architecture.image_size, model_type).save_pretrained(staged_backbone)
        write_backbone_card(staged_backbone, _card_info(checkpoint, architecture, model_type, notes))

        difference = None
        if verify:
            difference = _verify_against_reference(
                staged_backbone,
                architecture.image_size,
                lambda pixels: reference_backbone_forward(
                    checkpoint.backbone, architecture, pixels, output_norm
                ),
                output_dir,
            )

        staged_pretraining = None
        if pretraining and checkpoint.family == "dino":
            staged_pretraining = staging / "pretraining"
            pretraining_model = dino_to_pretraining_model(checkpoint, architecture, recipe=pretraining_recipe)
            pretraining_model.save_pretrained(staged_pretraining)
            _write_pretraining_card(staged_pretraining, checkpoint, pretraining_recipe)
        elif pretraining and checkpoint.is_training_checkpoint:
            notes.append(
                "No pretraining checkpoint: SelfPatchViTForPretraining is built on ViTModel, which has a CLS token "
                "that the reference SelfPatch backbone never had (adding one would change every patch feature)."
            )

        backbone_dir, pretraining_dir = _move_into_place(
            staging, staged_backbone, staged_pretraining, output_dir
        )
        if staged_pretraining is None and (output_dir / "pretraining").exists():
            notes.append(
                f"{output_dir / 'pretraining'} is left from an earlier conversion; it does not belong to this "
                "backbone."
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ConversionResult(
        format=checkpoint.format,
        architecture=architecture,
        backbone_dir=backbone_dir,
        model_type=model_type,
        max_abs_difference=difference,
        pretraining_dir=pretraining_dir,
        notes=notes,
    )


def _convert_moby(
    loaded: Any,
    path: Path,
    output_dir: Path,
    network: Literal["teacher", "student"],
    arch: str | None,
    num_heads: int | None,
    pretraining: bool,
    verify: bool,
    pretraining_recipe: str | None = None,
) -> ConversionResult:

    from selfpatch_hf.conversion.moby import (
        moby_backbone,
        moby_card_info,
        moby_to_pretraining_model,
        read_moby_checkpoint,
        write_moby_pretraining_card,
    )
    from selfpatch_hf.export.backbone import build_image_processor
    from selfpatch_hf.hub.cards.backbone import write_backbone_card

    checkpoint = read_moby_checkpoint(loaded, path)
    side = "online" if network == "student" else "target"
    backbone = moby_backbone(checkpoint, side, arch=arch, num_heads=num_heads)  # validates every part first
    bad = _non_finite_keys(backbone.state)
    if bad:
        raise ConversionError(f"{path.name} holds non-finite weights (NaN or infinity) in {_listing(bad)}.")
    notes: list[str] = []
    if pretraining_recipe == "dino":
        raise ConversionError(
            "--pretraining-recipe dino is for DINO checkpoints; a MoBY checkpoint continues as 'moby' (plain MoBY) "
            "or 'selfpatch' (MoBY + SelfPatch, the default)."
        )
    recipe = "selfpatch" if pretraining_recipe is None else pretraining_recipe
    if pretraining and getattr(backbone.architecture, "absolute_embedding", False):
        notes.append(
            "No pretraining checkpoint: this Swin has absolute position embeddings, which fix it to one input size; "
            "SelfPatchForPretraining trains Swins without them (as Swin-T and MoBY do)."
        )
        pretraining = False
    # staged beside OUTPUT_DIR and moved into place after the self-check, as for the other formats
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.converting-", dir=output_dir.parent))
    try:
        _use_default_permissions(staging)
        staged = staging / "backbone"
        backbone.model.save_pretrained(staged)
        build_image_processor(
            backbone.architecture.image_size, backbone.model.config.model_type
        ).save_pretrained(staged)
        write_backbone_card(staged, moby_card_info(checkpoint, backbone, side, notes))
        difference = None
        if verify:
            difference = _verify_against_reference(
                staged, backbone.architecture.image_size, backbone.reference_forward, output_dir
            )
        staged_pretraining = None
        if pretraining:
            staged_pretraining = staging / "pretraining"
            moby_to_pretraining_model(checkpoint, backbone, recipe).save_pretrained(staged_pretraining)
            write_moby_pretraining_card(staged_pretraining, checkpoint, recipe)
        backbone_dir, pretraining_dir = _move_into_place(staging, staged, staged_pretraining, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ConversionResult(
        format=f"moby-{backbone.model_type}-training",  # type: ignore[arg-type]
        architecture=backbone.architecture,
        backbone_dir=backbone_dir,
        model_type="swin" if backbone.model_type == "swin" else "vit",
        max_abs_difference=difference,
        pretraining_dir=pretraining_dir,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfpatch-convert",
        description="Convert a reference SelfPatch, DINO or MoBY checkpoint (.pth) into Hugging Face folders:\n"
        "OUTPUT_DIR/backbone (AutoModel-loadable, exact features, image processor, model card) and, for DINO,\n"
        "OUTPUT_DIR/pretraining (SelfPatchViTForPretraining for continued training). Both are written beside\n"
        "OUTPUT_DIR first and moved into place only after the self-check passed: a failed conversion leaves an\n"
        "earlier export untouched.",
        epilog="examples:\n"
        "  selfpatch-convert dino_deitsmall16_pretrain_full_checkpoint.pth converted/dino-vits16\n"
        "  selfpatch-convert selfpatch_vits16.pth converted/selfpatch-vits16 --arch vit_small\n"
        "  selfpatch-convert backbone_only.pth converted/sp --output-norm-from checkpoint.pth",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "checkpoint", type=Path, help="reference .pth file (read with torch.load(weights_only=True))"
    )
    parser.add_argument(
        "output_dir", type=Path, help="folder that receives backbone/ (and pretraining/); created if missing"
    )
    parser.add_argument(
        "--network",
        choices=("teacher", "student"),
        help="side of a training checkpoint to export as the backbone (default: the teacher for DINO and "
        "SelfPatch; for MoBY the online encoder, 'student', which MoBY's evaluation uses; 'teacher' = encoder_k)",
    )
    parser.add_argument(
        "--arch", choices=sorted(REFERENCE_ARCHS), help="reference architecture (sets the head count)"
    )
    parser.add_argument(
        "--num-heads", type=int, metavar="N", help="number of attention heads (weights do not show it)"
    )
    parser.add_argument(
        "--output-norm-from",
        type=Path,
        metavar="CHECKPOINT",
        help="SelfPatch training checkpoint whose ca_head.norm completes a backbone-only file",
    )
    parser.add_argument(
        "--no-pretraining",
        dest="pretraining",
        action="store_false",
        help="do not write the SelfPatchViTForPretraining checkpoint (DINO inputs)",
    )
    parser.add_argument(
        "--pretraining-recipe",
        choices=("selfpatch", "dino", "moby"),
        default="selfpatch",
        help="objective the pretraining checkpoint is set up for (default: selfpatch; dino continues a DINO "
        "checkpoint as plain DINO, moby a MoBY checkpoint as plain MoBY)",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the comparison with the reference forward pass",
    )
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.checkpoint.is_file():
        raise UsageError(
            f"checkpoint {args.checkpoint} does not exist or is not a file: give a reference .pth file."
        )
    if args.output_norm_from is not None and not args.output_norm_from.is_file():
        raise UsageError(f"--output-norm-from {args.output_norm_from} does not exist or is not a file.")
    if args.num_heads is not None and args.num_heads < 1:
        raise UsageError(f"--num-heads must be a positive number of attention heads, got {args.num_heads}.")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UsageError(f"output_dir {args.output_dir} is a file: give a folder (it is created if missing).")
    try:
        result = convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            network=args.network,
            arch=args.arch,
            num_heads=args.num_heads,
            output_norm_from=args.output_norm_from,
            pretraining=args.pretraining,
            pretraining_recipe=args.pretraining_recipe,
            verify=args.verify,
        )
    except ConversionError as error:
        raise CommandFailure(str(error)) from error
    except OSError as error:  # unreadable input, full disk, no permission on the output folder
        raise CommandFailure(f"{error}; nothing was changed in {args.output_dir}.") from error
    print(f"Detected {result.format}: {result.architecture.describe()}.")
    print(f"Backbone ({result.model_type}): {result.backbone_dir}")
    if result.max_abs_difference is not None:
        print(f"  max abs difference vs the reference forward pass: {result.max_abs_difference:.2e}")
    if result.pretraining_dir is not None:
        print(
            f"Pretraining checkpoint (SelfPatchViTForPretraining, {args.pretraining_recipe} recipe): {result.pretraining_dir}"
        )
    for note in result.notes:
        print(f"WARNING: {note}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("selfpatch-convert", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
