"""Released SelfPatch and DINO checkpoints: reading, key checks, and what they convert into.

Inputs (read with `torch.load(weights_only=True)`; the format is detected from the keys):

- SelfPatch reference training checkpoints (`student`/`teacher` with `backbone.`, `ca_head.`, `c_head.`,
  `p_head.` and DDP's `module.` prefixes) and flat backbone-only files (docs/method.md section 11);
- DINO training checkpoints (`student`/`teacher` with `backbone.` and `head.`) and flat backbone files (with
  `cls_token` and the final `norm`).

What they become (written by `selfpatch_hf.conversion.writing`):

- `backbone/`: DINO backbones become `ViTModel`s. The SelfPatch reference backbone has no CLS token, which
  `ViTModel` always prepends (and which would change every patch feature through attention), so it becomes a
  `SiglipVisionModel` (`vision_use_head=False`): patch embedding + learned position embedding, pre-norm blocks, a
  final LayerNorm (`ca_head.norm`, the reference's output norm), no CLS.
- `pretraining/` (DINO inputs only): a `SelfPatchForPretraining` checkpoint with student, teacher, heads and
  centres, ready for continued training with the patch objective. Our pretraining model is built on `ViTModel`,
  so a CLS-free SelfPatch backbone cannot become one exactly.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from selfpatch_hf.conversion.checkpoints import (
    ConversionError,
    check_keys,
    is_tensor_dict,
    listing,
    majority,
    non_finite_keys,
    read_checkpoint,
    sizes_of,
    strip_prefix,
)
from selfpatch_hf.conversion.vit import (
    BackboneArchitecture,
    dino_backbone_to_vit,
    expected_backbone_keys,
    infer_vit_architecture,
    reference_backbone_forward,
    selfpatch_backbone_to_siglip,
    vit_config,
)
from selfpatch_hf.conversion.writing import Conversion

if TYPE_CHECKING:
    import torch

    from selfpatch_hf.hub.cards.backbone import BackboneCardInfo

logger = logging.getLogger(__name__)

CheckpointFormat = Literal["selfpatch-training", "selfpatch-backbone", "dino-training", "dino-backbone"]


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


def _split_network(state: Mapping[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    state = strip_prefix(state, "module.")
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
            f"c_head.*, p_head.* for SelfPatch): {listing(unknown)}"
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
    return reference_checkpoint(read_checkpoint(path), path, network)


def reference_checkpoint(
    obj: Any, path: Path, network: Literal["teacher", "student"] = "teacher"
) -> ReferenceCheckpoint:
    """`load_reference_checkpoint` of an object already read from `path`."""
    if network not in ("teacher", "student"):
        raise ValueError(f'network must be "teacher" or "student", got {network!r}.')
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary.")
    # Some tools wrap a state dict one level down.
    for wrapper in ("state_dict", "model"):
        if wrapper in obj and is_tensor_dict(obj[wrapper]) and not ("student" in obj or "teacher" in obj):
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

    if not is_tensor_dict(obj):
        raise ConversionError(
            f"{path} is neither a training checkpoint (with 'student'/'teacher') nor a flat dictionary of tensors; "
            f"top-level keys: {listing(list(obj))}."
        )
    state = strip_prefix(strip_prefix(obj, "module."), "backbone.")
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise ConversionError(
            f"{path} is not a SelfPatch or DINO ViT checkpoint: no pos_embed / patch_embed.proj.weight among "
            f"{listing(list(state))}."
        )
    fmt: CheckpointFormat = "dino-backbone" if "cls_token" in state else "selfpatch-backbone"
    return ReferenceCheckpoint(format=fmt, path=path, backbone=state)


# ---------------------------------------------------------------------------------------------------------------
# Architecture and key validation
# ---------------------------------------------------------------------------------------------------------------


def infer_architecture(
    checkpoint: ReferenceCheckpoint, arch: str | None = None, num_heads: int | None = None
) -> BackboneArchitecture:
    """The backbone's architecture, read off its weights (see `vit.infer_vit_architecture`)."""
    return infer_vit_architecture(
        checkpoint.backbone,
        where=f"{checkpoint.path.name} ({checkpoint.format})",
        has_cls_token=checkpoint.family == "dino",
        recorded_arch=checkpoint.args.get("arch"),
        arch=arch,
        num_heads=num_heads,
    )


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
            f"{where} has parameters at odd MLP indices ({listing(odd)}): "
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
        # majority of every tensor that shows a size (see `checkpoints.sizes_of`)
        hidden = sizes_of(state, [(f"mlp.{i}.{kind}", 0) for i in inner for kind in ("weight", "bias")])
        hidden += sizes_of(state, [(f"mlp.{i}.weight", 1) for i in linear_ids if i != 0])
        bottleneck = sizes_of(
            state, [(f"mlp.{last}.weight", 0), (f"mlp.{last}.bias", 0), ("last_layer.weight_v", 1)]
        )
        head = HeadArchitecture(
            in_dim=in_dim,
            hidden_dim=majority(hidden) or state["mlp.0.weight"].shape[0],
            bottleneck_dim=majority(bottleneck),
            out_dim=majority(sizes_of(state, [("last_layer.weight_v", 0), ("last_layer.weight_g", 0)])),
            num_layers=len(linear_ids),
        )
    check_keys(state, head.expected_keys(), where)
    return head


def validate_checkpoint(checkpoint: ReferenceCheckpoint, arch: BackboneArchitecture) -> None:
    """Every key of every converted part must be known and well shaped."""
    sides = [checkpoint] + ([checkpoint.other_network] if checkpoint.other_network is not None else [])
    for side in sides:
        label = f"{checkpoint.path.name}" + (f"[{side.network!r}]" if side.network else "")
        prefix = "backbone." if side.is_training_checkpoint else ""
        check_keys(
            side.backbone,
            expected_backbone_keys(arch),
            f"{label} {prefix or 'backbone '}keys",
            f" of a {arch.num_hidden_layers}-layer, width-{arch.hidden_size}, patch-{arch.patch_size} "
            f"{'DINO' if arch.has_cls_token else 'SelfPatch'} ViT",
        )
        if side.aggregation is not None:
            check_keys(side.aggregation, expected_aggregation_keys(arch.hidden_size), f"{label} ca_head keys")
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
            non_finite += [f"{label}{prefix}{key}" for key in non_finite_keys(part or {})]
    centers = {"dino_loss.center": checkpoint.image_center, "dino_loss.patch_center": checkpoint.patch_center}
    non_finite += [f"{name}" for name in non_finite_keys({k: v for k, v in centers.items() if v is not None})]
    if non_finite:
        raise ConversionError(
            f"{checkpoint.path} holds non-finite weights (NaN or infinity) in {len(non_finite)} tensor(s): "
            f"{listing(non_finite)}. The checkpoint is damaged or was saved after training diverged; convert an "
            "earlier checkpoint of the run."
        )


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
    """A `SelfPatchForPretraining` initialised from a DINO checkpoint, ready for continued training.

    - Backbones: teacher and student from the checkpoint (a backbone-only file initialises both).
    - Image head: DINO's `head` (training checkpoints; fresh otherwise). Image centre: `dino_loss.center`.
    - `recipe="selfpatch"` (default): the SelfPatch objective, `image_representation="aggregation"`, lambda = 0.1;
      the aggregation module and the patch head start fresh (DINO has none). The image head then reads the
      aggregation module's summary instead of the CLS token it was trained on: with a CLS image representation the
      aggregation module would receive no gradient at all (it only learns through the image-level path).
    - `recipe="dino"`: plain DINO continuation (`image_representation="cls"`, lambda = 0), an exact restart.
    """
    import torch

    from selfpatch_hf import SelfPatchConfig, SelfPatchForPretraining

    teacher = checkpoint if checkpoint.network in (None, "teacher") else checkpoint.other_network
    student = checkpoint.other_network if checkpoint.network == "teacher" else checkpoint
    teacher, student = teacher or student, student or teacher
    args = checkpoint.args
    backbone_config = vit_config(arch)
    overrides: dict[str, Any] = {
        "image_representation": "aggregation" if recipe == "selfpatch" else "cls",
        "patch_loss_weight": 0.1 if recipe == "selfpatch" else 0.0,
    }
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
    model = SelfPatchForPretraining(config).eval()
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


def _output_norm(
    checkpoint: ReferenceCheckpoint,
    architecture: BackboneArchitecture,
    output_norm_from: str | Path | None,
    network: Literal["teacher", "student"],
    notes: list[str],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The norm every feature passes last: DINO's `norm`, SelfPatch's `ca_head.norm` (from the checkpoint or, for a
    backbone-only file, from `output_norm_from`), or None (a parameter-free standardisation, said in `notes`)."""
    if checkpoint.family == "dino":
        return checkpoint.backbone["norm.weight"], checkpoint.backbone["norm.bias"]
    if checkpoint.aggregation is not None:
        if output_norm_from is not None:
            raise ConversionError(
                "--output-norm-from is for backbone-only files; this checkpoint has ca_head.norm."
            )
        return checkpoint.aggregation["norm.weight"], checkpoint.aggregation["norm.bias"]
    if output_norm_from is None:
        notes.append(
            "This file holds only the backbone, without the output norm (`ca_head.norm`) of the reference "
            "model. `last_hidden_state` is the last block's output standardised by a LayerNorm with weight 1 "
            "and bias 0 (not the trained affine norm); the raw block outputs are `hidden_states[-1]` "
            "(`output_hidden_states=True`). Convert with `--output-norm-from` and the full training "
            "checkpoint to get the trained norm."
        )
        return None
    donor = load_reference_checkpoint(output_norm_from, network=network)
    if donor.aggregation is None:
        raise ConversionError(f"{output_norm_from} has no ca_head.norm (it is a {donor.format} file).")
    expected = {"norm.weight": (architecture.hidden_size,), "norm.bias": (architecture.hidden_size,)}
    check_keys(
        {k: donor.aggregation[k] for k in expected if k in donor.aggregation},
        expected,
        f"{output_norm_from} ca_head.norm",
    )
    donor_norm = (donor.aggregation["norm.weight"], donor.aggregation["norm.bias"])
    bad = non_finite_keys(dict(zip(("ca_head.norm.weight", "ca_head.norm.bias"), donor_norm, strict=True)))
    if bad:
        raise ConversionError(
            f"{output_norm_from} holds non-finite weights (NaN or infinity) in {', '.join(bad)}."
        )
    notes.append(f"The output norm (`ca_head.norm`) was taken from `{Path(output_norm_from).name}`.")
    return donor_norm


def convert_dino_selfpatch(
    loaded: Any,
    path: Path,
    *,
    network: Literal["teacher", "student"] = "teacher",
    arch: str | None = None,
    num_heads: int | None = None,
    output_norm_from: str | Path | None = None,
    pretraining: bool = True,
    pretraining_recipe: Literal["selfpatch", "dino"] = "selfpatch",
) -> Conversion:
    """The `Conversion` of a SelfPatch or DINO checkpoint read from `path` (every key validated first)."""
    from selfpatch_hf.hub.cards.pretraining import PretrainingCardInfo

    if pretraining_recipe not in ("selfpatch", "dino"):
        raise ConversionError(
            f"--pretraining-recipe {pretraining_recipe} is for MoBY checkpoints; a DINO checkpoint continues as "
            "'dino' or 'selfpatch'."
        )
    checkpoint = reference_checkpoint(loaded, path, network=network)
    architecture = infer_architecture(checkpoint, arch=arch, num_heads=num_heads)
    validate_checkpoint(checkpoint, architecture)
    notes: list[str] = []
    output_norm = _output_norm(checkpoint, architecture, output_norm_from, network, notes)
    if checkpoint.family == "dino":
        backbone = dino_backbone_to_vit(checkpoint.backbone, architecture)
    else:
        backbone = selfpatch_backbone_to_siglip(checkpoint.backbone, architecture, output_norm)
    card = _card_info(checkpoint, architecture, backbone.config.model_type, notes)
    build_pretraining = pretraining_card = None
    if pretraining and checkpoint.family == "dino":
        build_pretraining = partial(
            dino_to_pretraining_model, checkpoint, architecture, recipe=pretraining_recipe
        )
        pretraining_card = PretrainingCardInfo(
            converted_from=path.name,
            source_method="dino",
            source_format=checkpoint.format,
            recipe=pretraining_recipe,
            fresh_image_head=checkpoint.image_head is None,
        )
    elif pretraining and checkpoint.is_training_checkpoint:
        # said to the user, not in the backbone's card (it is about the folder that was not written)
        notes.append(
            "No pretraining checkpoint: SelfPatchForPretraining is built on ViTModel, which has a CLS token "
            "that the reference SelfPatch backbone never had (adding one would change every patch feature)."
        )
    return Conversion(
        format=checkpoint.format,
        architecture=architecture,
        backbone=backbone,
        card=card,
        reference_forward=partial(
            reference_backbone_forward, checkpoint.backbone, architecture, output_norm=output_norm
        ),
        build_pretraining=build_pretraining,
        pretraining_card=pretraining_card,
        notes=notes,
    )


__all__ = [
    "ReferenceCheckpoint",
    "convert_dino_selfpatch",
    "dino_to_pretraining_model",
    "infer_architecture",
    "infer_head",
    "load_reference_checkpoint",
    "reference_checkpoint",
    "validate_checkpoint",
]
