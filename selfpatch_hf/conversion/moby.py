"""Released MoBY checkpoints (Xie et al. 2021, public code "Transformer-SSL"): reading, key checks, and what they
convert into.

MoBY's `save_checkpoint` writes `{"model": state_dict, "optimizer", "lr_scheduler", "max_accuracy", "epoch",
"config"}`; the model's keys are (`models/moby.py`):

- `encoder.*` (online encoder) and `encoder_k.*` (momentum/target encoder): a Swin Transformer
  (`selfpatch_hf.conversion.swin`) or, for DeiT-S, timm's `VisionTransformer` (`selfpatch_hf.conversion.vit`:
  `cls_token`, `pos_embed` with the class position, `blocks.*`, `norm`);
- `projector.*`, `projector_k.*`, `predictor.*`: `MoBYMLP`s (`linear_hidden.{1,2}` Linear + BatchNorm,
  `linear_out`);
- `queue1`, `queue2` (out_dim x K keys), `queue_ptr`.

The `config` entry is a pickled yacs `CfgNode` (a dict subclass); `checkpoints.read_checkpoint` reads it as a plain
`OrderedDict` under the weights-only unpickler, never importing yacs.

Backbones (exact, verified against the reference forward pass):

- Swin -> `transformers.SwinModel`: `last_hidden_state` is the last stage's tokens after the final norm, and
  `pooler_output` their average, which is MoBY's image representation for Swin.
- DeiT-S -> `transformers.ViTModel` (like a DINO backbone): `pooler_output` (identity pooler) is the normalised CLS
  token, MoBY's image representation for ViTs.

MoBY's own linear evaluation loads the ONLINE encoder (`encoder.*`), so that is the default network here. The
pretraining checkpoint is a `SelfPatchForPretraining` with `image_objective="moby"`: both networks, projectors,
predictor and queues.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from selfpatch_hf.conversion.checkpoints import (
    ConversionError,
    check_keys,
    listing,
    non_finite_keys,
    numbered,
    strip_prefix,
)
from selfpatch_hf.conversion.swin import (
    SwinArchitecture,
    expected_swin_keys,
    infer_swin_architecture,
    reference_swin_forward,
    swin_backbone_to_hf,
    swin_config,
    validate_swin,
)
from selfpatch_hf.conversion.vit import (
    BackboneArchitecture,
    dino_backbone_to_vit,
    expected_backbone_keys,
    infer_vit_architecture,
    reference_backbone_forward,
    vit_config,
)
from selfpatch_hf.conversion.writing import Conversion

if TYPE_CHECKING:
    from selfpatch_hf.hub.cards.backbone import BackboneCardInfo

MOBY_PARTS = ("encoder", "encoder_k", "projector", "projector_k", "predictor")
MOBY_BUFFERS = ("queue1", "queue2", "queue_ptr")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def _model_state(obj: Any) -> Mapping[str, Any] | None:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(key, str) for key in obj):
        return None
    return strip_prefix(obj, "module.")


def is_moby_checkpoint(obj: Any) -> bool:
    """True for a MoBY training checkpoint (or its bare `model` state dict): online and target encoder keys."""
    state = _model_state(obj)
    if state is None:
        return False
    # MoBY's own parts besides the online encoder, or the online encoder's reference layout (Swin / timm patch
    # embedding): a cut-down file (e.g. without the momentum encoder) is still recognised, and told what it lacks
    moby_only = ("encoder_k.", "projector.", "projector_k.", "predictor.", "encoder.patch_embed.")
    return any(key.startswith("encoder.") for key in state) and (
        any(key.startswith(moby_only) for key in state) or any(key in MOBY_BUFFERS for key in state)
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
            f"projector_k.*, predictor.*, queue1, queue2, queue_ptr): {listing(unknown)}"
        )
    missing = [f"{name}.*" for name in MOBY_PARTS if name not in parts] + [
        name for name in MOBY_BUFFERS if name not in buffers
    ]
    if missing:
        what = {
            "encoder.*": "the online encoder (encoder.*)",
            "encoder_k.*": "its momentum encoder (encoder_k.*)",
            "projector.*": "the online projector (projector.*)",
            "projector_k.*": "the momentum projector (projector_k.*)",
            "predictor.*": "the predictor (predictor.*)",
        }
        raise ConversionError(
            f"The MoBY checkpoint {path.name} lacks {', '.join(what.get(name, name) for name in missing)}: a "
            "Transformer-SSL training checkpoint (ckpt_epoch_N.pth) holds the online and momentum encoders, both "
            "projectors, the predictor and the two queues, and the conversion checks and converts them all. Convert "
            "the complete training checkpoint, not a cut-down copy."
        )
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
# Heads and queues (validated so that a damaged file fails as a whole, not only where the backbone reads it)
# ---------------------------------------------------------------------------------------------------------------


def expected_moby_mlp_keys(
    state: Mapping[str, torch.Tensor], in_dim: int, where: str
) -> dict[str, tuple[int, ...]]:
    """`MoBYMLP(num_layers=L)`: linear_hidden = [Identity, (Linear, BatchNorm1d, ReLU) x (L-1)], linear_out."""
    out = state.get("linear_out.weight")
    if out is None or out.ndim != 2:
        raise ConversionError(f"{where} has no linear_out.weight (a MoBYMLP).")
    hidden_linears = numbered(state, r"linear_hidden\.(\d+)\.weight$")
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
    check_keys(checkpoint.parts["projector"], projector, f"{name} projector.* keys")
    check_keys(checkpoint.parts["projector_k"], projector, f"{name} projector_k.* keys")
    out_dim = projector["linear_out.weight"][0]
    predictor = expected_moby_mlp_keys(checkpoint.parts["predictor"], out_dim, f"{name} predictor")
    check_keys(checkpoint.parts["predictor"], predictor, f"{name} predictor.* keys")
    queue = checkpoint.buffers["queue1"]
    expected = {"queue1": (out_dim, queue.shape[-1]), "queue2": (out_dim, queue.shape[-1]), "queue_ptr": (1,)}
    check_keys(checkpoint.buffers, expected, f"{name} queues")


# ---------------------------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MoBYBackbone:
    """A converted encoder and what is needed to check it."""

    model: Any  # SwinModel or ViTModel
    architecture: SwinArchitecture | BackboneArchitecture
    state: dict[str, torch.Tensor]
    model_type: Literal["swin", "vit"]

    def reference_forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The reference encoder's tokens after its final norm (what `last_hidden_state` must equal)."""
        if self.model_type == "swin":
            return reference_swin_forward(self.state, self.architecture, pixel_values)
        norm = (self.state["norm.weight"], self.state["norm.bias"])
        return reference_backbone_forward(self.state, self.architecture, pixel_values, norm)


def check_recorded_depths(checkpoint: MoBYCheckpoint, architecture: SwinArchitecture, side: str) -> None:
    """The weights hold as many blocks per stage as the checkpoint's config records (`MODEL.SWIN.DEPTHS`): a file
    missing a whole block would otherwise read as a shallower Swin and convert without a word."""
    recorded = checkpoint.config_value("MODEL", "SWIN", "DEPTHS")
    if not isinstance(recorded, (list, tuple)) or tuple(recorded) == architecture.depths:
        return
    where = f"{checkpoint.path.name} {side}.*"
    if len(recorded) != len(architecture.depths) or not all(isinstance(depth, int) for depth in recorded):
        raise ConversionError(
            f"{where}: the checkpoint's config records Swin depths {list(recorded)}, but its weights hold "
            f"{len(architecture.depths)} stages {list(architecture.depths)}; the file is incomplete or altered."
        )
    complete = dataclasses.replace(architecture, depths=tuple(recorded))
    missing = [key for key in expected_swin_keys(complete) if key not in checkpoint.parts[side]]
    raise ConversionError(
        f"{where}: the checkpoint's config records Swin depths {list(recorded)}, but its weights hold "
        f"{list(architecture.depths)} blocks per stage; missing keys ({len(missing)}): {listing(missing)}. The file "
        "is incomplete: convert the complete checkpoint."
    )


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
        check_recorded_depths(checkpoint, architecture, side)
        for part in ("encoder", "encoder_k"):
            validate_swin(checkpoint.parts[part], architecture, f"{name} {part}.* keys")
        validate_moby_heads(checkpoint, architecture.num_features)
        return MoBYBackbone(swin_backbone_to_hf(state, architecture), architecture, state, "swin")

    architecture = infer_vit_architecture(
        state,
        where=f"{name} {side}.*",
        has_cls_token=True,
        recorded_arch=checkpoint.config_value("MODEL", "MOBY", "ENCODER"),
        arch=arch,
        num_heads=num_heads,
    )
    for part in ("encoder", "encoder_k"):
        check_keys(
            checkpoint.parts[part],
            expected_backbone_keys(architecture),
            f"{name} {part}.* keys",
            f" of a {architecture.num_hidden_layers}-layer, width-{architecture.hidden_size} timm ViT (DeiT)",
        )
    validate_moby_heads(checkpoint, architecture.hidden_size)
    return MoBYBackbone(dino_backbone_to_vit(state, architecture), architecture, state, "vit")


def moby_card_info(
    checkpoint: MoBYCheckpoint, backbone: MoBYBackbone, network: str, notes: list[str]
) -> BackboneCardInfo:
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
    linears = numbered(state, r"linear_hidden\.(\d+)\.weight$")
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

    arch = backbone.architecture
    hidden, out_dim = _mlp_widths(checkpoint.parts["projector"], "projector")
    predictor_hidden, _ = _mlp_widths(checkpoint.parts["predictor"], "predictor")
    swin = backbone.model_type == "swin"
    overrides: dict[str, Any] = {
        "image_objective": "moby",
        "moby_projection_dim": out_dim,
        "moby_projector_hidden_dim": hidden,
        "moby_predictor_hidden_dim": predictor_hidden,
        "moby_queue_size": checkpoint.buffers["queue1"].shape[1],
    }
    for field_name, key in (
        ("moby_temperature", "CONTRAST_TEMPERATURE"),
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


# ---------------------------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------------------------


def convert_moby(
    loaded: Any,
    path: Path,
    *,
    network: Literal["teacher", "student"] = "student",
    arch: str | None = None,
    num_heads: int | None = None,
    pretraining: bool = True,
    pretraining_recipe: Literal["selfpatch", "moby"] = "selfpatch",
) -> Conversion:
    """The `Conversion` of a MoBY checkpoint read from `path` (every part validated first). `network`: "student"
    is the online encoder (MoBY's evaluations load it), "teacher" the momentum encoder `encoder_k`."""
    from selfpatch_hf.hub.cards.pretraining import PretrainingCardInfo

    checkpoint = read_moby_checkpoint(loaded, path)
    side = "online" if network == "student" else "target"
    backbone = moby_backbone(checkpoint, side, arch=arch, num_heads=num_heads)
    bad = non_finite_keys(backbone.state)
    if bad:
        raise ConversionError(f"{path.name} holds non-finite weights (NaN or infinity) in {listing(bad)}.")
    if pretraining_recipe not in ("selfpatch", "moby"):
        raise ConversionError(
            f"--pretraining-recipe {pretraining_recipe} is for DINO checkpoints; a MoBY checkpoint continues as "
            "'moby' (plain MoBY) or 'selfpatch' (MoBY + SelfPatch, the default)."
        )
    notes: list[str] = []
    if pretraining and getattr(backbone.architecture, "absolute_embedding", False):
        notes.append(
            "No pretraining checkpoint: this Swin has absolute position embeddings, which fix it to one input size; "
            "SelfPatchForPretraining trains Swins without them (as Swin-T and MoBY do)."
        )
        pretraining = False
    return Conversion(
        format=f"moby-{backbone.model_type}-training",
        architecture=backbone.architecture,
        backbone=backbone.model,
        card=moby_card_info(checkpoint, backbone, side, notes),
        reference_forward=backbone.reference_forward,
        build_pretraining=partial(moby_to_pretraining_model, checkpoint, backbone, pretraining_recipe)
        if pretraining
        else None,
        pretraining_card=PretrainingCardInfo(
            converted_from=path.name,
            source_method="moby",
            source_format=f"moby-{backbone.model_type}-training",
            recipe=pretraining_recipe,
        )
        if pretraining
        else None,
        notes=notes,
    )


__all__ = [
    "MoBYBackbone",
    "MoBYCheckpoint",
    "convert_moby",
    "is_moby_checkpoint",
    "moby_backbone",
    "moby_to_pretraining_model",
    "read_moby_checkpoint",
]
