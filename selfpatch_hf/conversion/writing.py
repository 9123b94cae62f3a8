"""Writing a conversion: staging, the self-check against the reference forward pass, and the move into place.

Every checkpoint family (`dino_selfpatch`, `moby`) describes what it converted as a `Conversion`: the backbone
model, its card, the reference forward pass to check it against and, optionally, how to build the pretraining
checkpoint. `write_conversion` then does the same for all of them:

1. `OUTPUT_DIR/backbone` is written into a private staging folder beside `OUTPUT_DIR`: the weights
   (`save_pretrained`, safetensors), the image processor (`build_image_processor`, the one every export uses) and
   the model card;
2. the staged backbone is reloaded with `AutoModel`, as a user would, and compared with the reference forward pass
   on two fixed random images (`VERIFY_TOLERANCE`); the input weights are known to be finite and well shaped by
   then, so a difference is a conversion bug;
3. the pretraining checkpoint, if any, is built and staged with its card;
4. the staged folders get the user's normal permissions and replace `OUTPUT_DIR/backbone` and
   `OUTPUT_DIR/pretraining`, each atomically. A conversion that fails at any step leaves an earlier export in
   `OUTPUT_DIR` untouched, and no staging folder behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfpatch_hf.conversion.checkpoints import ConversionError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from selfpatch_hf.hub.cards.backbone import BackboneCardInfo
    from selfpatch_hf.hub.cards.pretraining import PretrainingCardInfo

# Tolerance of the converter's self-check against the reference forward pass (float32).
VERIFY_TOLERANCE = 1e-4


@dataclass
class Conversion:
    """What a checkpoint family converted, ready to be written."""

    format: str  # the detected checkpoint format, e.g. "dino-training", "moby-swin-training"
    architecture: (
        Any  # vit.BackboneArchitecture or swin.SwinArchitecture (both have `describe()`, `image_size`)
    )
    backbone: PreTrainedModel  # ViTModel, SiglipVisionModel or SwinModel
    card: BackboneCardInfo
    # the reference forward pass on (B, 3, S, S) pixels at the native size -> the expected `last_hidden_state`
    reference_forward: Callable[[torch.Tensor], torch.Tensor]
    # built only after the backbone passed its check; None: no pretraining checkpoint
    build_pretraining: Callable[[], PreTrainedModel] | None = None
    pretraining_card: PretrainingCardInfo | None = None
    notes: list[str] = field(default_factory=list)  # what the user must know (the card's warnings among them)


@dataclass
class ConversionResult:
    format: str
    architecture: Any  # vit.BackboneArchitecture or swin.SwinArchitecture
    backbone_dir: Path
    model_type: str  # of the backbone folder: "vit", "siglip_vision_model" or "swin"
    # converted model vs the reference forward pass on random input (None: not verified)
    max_abs_difference: float | None
    pretraining_dir: Path | None = None
    notes: list[str] = field(default_factory=list)  # things the user must know (the card's warnings too)


def verify_against_reference(
    folder: Path, image_size: int, reference_forward: Callable[[torch.Tensor], torch.Tensor], output_dir: Path
) -> float:
    """Reloads `folder` with `AutoModel` and compares its `last_hidden_state` on two fixed random images with
    `reference_forward`; returns the largest absolute difference, raising `ConversionError` above
    `VERIFY_TOLERANCE` (`output_dir` is named in the message: nothing was written there)."""
    import torch
    from transformers import AutoModel

    reloaded = AutoModel.from_pretrained(folder).eval()
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


def write_conversion(conversion: Conversion, output_dir: str | Path, verify: bool = True) -> ConversionResult:
    """Writes `output_dir/backbone` (and `output_dir/pretraining`) for `conversion` (see the module docstring)."""
    from selfpatch_hf.atomic_folders import apply_default_permissions, replace_directory
    from selfpatch_hf.export.backbone import build_image_processor
    from selfpatch_hf.hub.cards.backbone import write_backbone_card
    from selfpatch_hf.hub.cards.pretraining import write_pretraining_card

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_type = conversion.backbone.config.model_type
    notes = list(conversion.notes)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.converting-", dir=output_dir.parent))
    try:
        staged_backbone = staging / "backbone"
        conversion.backbone.save_pretrained(staged_backbone)
        build_image_processor(conversion.architecture.image_size, model_type).save_pretrained(staged_backbone)
        write_backbone_card(staged_backbone, conversion.card)
        difference = None
        if verify:
            difference = verify_against_reference(
                staged_backbone, conversion.architecture.image_size, conversion.reference_forward, output_dir
            )
        staged_pretraining = None
        if conversion.build_pretraining is not None:
            staged_pretraining = staging / "pretraining"
            conversion.build_pretraining().save_pretrained(staged_pretraining)
            if conversion.pretraining_card is not None:
                write_pretraining_card(staged_pretraining, conversion.pretraining_card)
        # mkdtemp makes the folder private (0700) and save_pretrained writes the weights 0600: an export is an
        # ordinary folder, with the modes a plain mkdir / open would give it
        apply_default_permissions(staging)
        backbone_dir = output_dir / "backbone"
        replace_directory(staged_backbone, backbone_dir)
        pretraining_dir = None
        if staged_pretraining is not None:
            pretraining_dir = output_dir / "pretraining"
            replace_directory(staged_pretraining, pretraining_dir)
        elif (output_dir / "pretraining").exists():
            notes.append(
                f"{output_dir / 'pretraining'} is left from an earlier conversion; it does not belong to this "
                "backbone."
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ConversionResult(
        format=conversion.format,
        architecture=conversion.architecture,
        backbone_dir=backbone_dir,
        model_type=model_type,
        max_abs_difference=difference,
        pretraining_dir=pretraining_dir,
        notes=notes,
    )


__all__ = [
    "VERIFY_TOLERANCE",
    "Conversion",
    "ConversionResult",
    "verify_against_reference",
    "write_conversion",
]
