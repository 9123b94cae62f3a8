"""`selfpatch-convert CHECKPOINT OUTPUT_DIR` (also `selfpatch convert`, `python -m selfpatch_hf.conversion`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from selfpatch_hf.cli.errors import CommandFailure, HelpFormatter, UsageError, run_command, write_failure
from selfpatch_hf.conversion.checkpoints import ConversionError
from selfpatch_hf.conversion.vit import REFERENCE_ARCHS

PROG = "selfpatch-convert"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a reference SelfPatch, DINO or MoBY checkpoint (.pth) into Hugging Face folders:\n"
        "OUTPUT_DIR/backbone (AutoModel-loadable, exact features, image processor, model card) and, for DINO and\n"
        "MoBY, OUTPUT_DIR/pretraining (SelfPatchForPretraining for continued training). Both are written beside\n"
        "OUTPUT_DIR first and moved into place only after the self-check passed: a failed conversion leaves an\n"
        "earlier export untouched.",
        epilog="examples:\n"
        "  selfpatch-convert dino_deitsmall16_pretrain_full_checkpoint.pth converted/dino-vits16\n"
        "  selfpatch-convert selfpatch_vits16.pth converted/selfpatch-vits16 --arch vit_small\n"
        "  selfpatch-convert backbone_only.pth converted/sp --output-norm-from checkpoint.pth\n"
        "  selfpatch-convert moby_swin_t_300ep_pretrained.pth converted/moby-swin-t --pretraining-recipe moby",
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
        help="do not write the SelfPatchForPretraining checkpoint of DINO and MoBY inputs (written by default)",
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
        help="skip the comparison with the reference forward pass (made by default)",
    )
    return parser


def _convert(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

    from selfpatch_hf.conversion.convert import convert_checkpoint

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
    except Exception as error:  # unreadable input, full disk, no permission on the output folder
        reason = write_failure(error, args.output_dir)
        if reason is None:
            raise
        raise CommandFailure(
            f"converting {args.checkpoint} into {args.output_dir} failed: {reason}; nothing was changed in "
            f"{args.output_dir} (the folders are written beside it and moved in only when complete)."
        ) from None
    print(f"Detected {result.format}: {result.architecture.describe()}.")
    print(f"Backbone ({result.model_type}): {result.backbone_dir}")
    if result.max_abs_difference is not None:
        print(f"  max abs difference vs the reference forward pass: {result.max_abs_difference:.2e}")
    if result.pretraining_dir is not None:
        print(
            f"Pretraining checkpoint (SelfPatchForPretraining, {args.pretraining_recipe} recipe): "
            f"{result.pretraining_dir}"
        )
    for note in result.notes:
        print(f"WARNING: {note}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, _convert, argv)


if __name__ == "__main__":
    sys.exit(main())
