"""`convert_checkpoint`: a released SelfPatch, DINO or MoBY `.pth` file -> Hugging Face folders.

The file is read once (`checkpoints.read_checkpoint`, weights only), its family is detected from its keys (MoBY's
`encoder.*` / `encoder_k.*`, else the SelfPatch / DINO formats), the family's module validates every key and builds
the `Conversion`, and `writing.write_conversion` stages, verifies and moves the folders into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from selfpatch_hf.conversion.checkpoints import ConversionError, read_checkpoint
from selfpatch_hf.conversion.writing import ConversionResult, write_conversion

PretrainingRecipe = Literal["selfpatch", "dino", "moby"]


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    *,
    network: Literal["teacher", "student"] | None = None,
    arch: str | None = None,
    num_heads: int | None = None,
    output_norm_from: str | Path | None = None,
    pretraining: bool = True,
    pretraining_recipe: PretrainingRecipe = "selfpatch",
    verify: bool = True,
) -> ConversionResult:
    """Converts a SelfPatch, DINO or MoBY checkpoint into `output_dir/backbone` (+ `output_dir/pretraining` for DINO
    and MoBY inputs).

    Args:
        network: side of a training checkpoint that becomes the backbone; default: the side the method's own
            evaluation uses (DINO/SelfPatch: the teacher; MoBY: the online encoder, "student"; "teacher" is MoBY's
            momentum encoder `encoder_k`).
        arch / num_heads: the head count, when neither the checkpoint's `args` nor the width tell it.
        output_norm_from: a SelfPatch training checkpoint whose `ca_head.norm` supplies the output norm of a
            backbone-only SelfPatch file (which has none).
        pretraining: also write the `SelfPatchForPretraining` checkpoint (DINO and MoBY inputs).
        pretraining_recipe: what that checkpoint continues with: "selfpatch" (the patch objective added to the
            checkpoint's method), or the method alone ("dino" for DINO inputs, "moby" for MoBY inputs).
        verify: compare the saved folder, reloaded with `AutoModel`, with the reference forward pass on random
            input, and fail above `writing.VERIFY_TOLERANCE`.
    """
    from selfpatch_hf.conversion.dino_selfpatch import convert_dino_selfpatch
    from selfpatch_hf.conversion.moby import convert_moby, is_moby_checkpoint

    checkpoint_path = Path(checkpoint_path)
    loaded = read_checkpoint(checkpoint_path)
    if is_moby_checkpoint(loaded):
        if output_norm_from is not None:
            raise ConversionError("--output-norm-from is for SelfPatch backbone files, not MoBY checkpoints.")
        conversion = convert_moby(
            loaded,
            checkpoint_path,
            network=network or "student",
            arch=arch,
            num_heads=num_heads,
            pretraining=pretraining,
            pretraining_recipe=pretraining_recipe,
        )
    else:
        conversion = convert_dino_selfpatch(
            loaded,
            checkpoint_path,
            network=network or "teacher",
            arch=arch,
            num_heads=num_heads,
            output_norm_from=output_norm_from,
            pretraining=pretraining,
            pretraining_recipe=pretraining_recipe,
        )
    return write_conversion(conversion, output_dir, verify=verify)


__all__ = ["convert_checkpoint"]
