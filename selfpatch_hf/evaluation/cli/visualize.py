"""`selfpatch eval visualize`: the top-10% attention of query patches for several backbones (the paper's Figure 1),
or the positive neighbours a SelfPatch teacher selects, as a captioned PNG."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from selfpatch_hf.cli.errors import CommandFailure, UsageError
from selfpatch_hf.evaluation.cli.common_options import (
    add_backbone_options,
    add_runtime_options,
    apply_runtime_options,
    check_exists,
    int_pair,
    load_backbone,
)
from selfpatch_hf.evaluation.cli.config_options import add_config_options, config_from_args
from selfpatch_hf.evaluation.configs import AttentionFigureConfig

DESCRIPTION = (
    "Draw, for query patches of one image, the patches that receive the most last-layer attention (one column per "
    "--model), or the positive neighbours a SelfPatch teacher selects (--pretraining or --positives). The PNG "
    "carries column titles, row labels and a caption saying what it shows."
)
EXAMPLES = """examples:
  selfpatch eval visualize --model dino=facebook/dino-vits16 --model selfpatch=out/backbone \\
      --image skimage:chelsea --query 0.4,0.55 --query 0.8,0.2 --output attention.png
  selfpatch eval visualize --pretraining out/checkpoints/checkpoint-1000/model --image photo.jpg \\
      --query 0.5,0.5 --output positives.png"""


def _query(text: str):
    try:
        if "," in text:
            y, x = (float(part) for part in text.split(","))
        else:
            index = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a patch index (e.g. 27) or Y,X fractions of the image in [0, 1] (e.g. 0.4,0.6), got {text!r}"
        ) from None
    if "," in text:
        if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
            raise argparse.ArgumentTypeError(
                f"Y,X are fractions of the image height and width in [0, 1], got {text!r}"
            )
        return y, x
    if index < 0:
        raise argparse.ArgumentTypeError(f"a patch index is >= 0, got {text!r}")
    return index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backbone_options(parser, multiple=True)
    parser.add_argument(
        "--image",
        required=True,
        help="image file, or skimage:NAME for an image bundled with scikit-image (e.g. skimage:chelsea)",
    )
    parser.add_argument(
        "--query",
        action="append",
        type=_query,
        required=True,
        metavar="INDEX|Y,X",
        help="query patch: a row-major index, or Y,X fractions of the image (e.g. 0.4,0.6); repeat for more rows",
    )
    parser.add_argument(
        "--image-size",
        type=int_pair,
        metavar="HEIGHT,WIDTH",
        help="network input HEIGHT,WIDTH (default: shorter side 224 for --model, the global crop size for "
        "--pretraining, with the image's aspect ratio kept)",
    )
    parser.add_argument(
        "--positives",
        metavar="FILE",
        help="(N, k) teacher positive indices saved as .npy or .pt, drawn instead of attention",
    )
    parser.add_argument("--grid", type=int_pair, metavar="H,W", help="patch grid H,W of --positives")
    parser.add_argument(
        "--pretraining",
        metavar="FOLDER",
        help="a SelfPatchForPretraining folder (e.g. a training checkpoint's model): run its teacher on the "
        "image and draw the positives it selects",
    )
    parser.add_argument("--output", required=True, metavar="PNG", help="PNG file to write")
    add_config_options(parser, AttentionFigureConfig, title="attention figure")
    add_runtime_options(parser)


def _read_image(spec: str):
    from PIL import Image, UnidentifiedImageError

    if spec.startswith("skimage:"):
        import skimage.data

        name = spec.split(":", 1)[1]
        if not callable(getattr(skimage.data, name, None)) or name.startswith("_"):
            raise UsageError(
                f"--image {spec}: scikit-image has no bundled image {name!r} (try skimage:chelsea)."
            )
        return getattr(skimage.data, name)()
    if not Path(spec).is_file():
        raise UsageError(f"--image {spec}: no such file; give an image file or skimage:NAME.")
    try:
        with Image.open(spec) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise CommandFailure(f"--image {spec} cannot be read as an image: {error}") from error


def _read_positives(path: str):
    import numpy as np
    import torch

    if not Path(path).is_file():
        raise UsageError(f"--positives {path}: no such file; give (N, k) indices saved as .npy or .pt.")
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # numpy/torch raise many kinds on a file of another format
        raise CommandFailure(f"--positives {path} cannot be read as .npy / torch tensor: {error}") from error


def run(args: argparse.Namespace) -> int:
    from selfpatch_hf.evaluation.visualize import attention_figure, positives_figure, save_figure

    sources = [name for name, given in (("--model", args.model), ("--positives", args.positives),
                                        ("--pretraining", args.pretraining)) if given]  # fmt: skip
    if len(sources) != 1:
        raise UsageError(
            "give exactly one of --model (attention), --pretraining (a teacher's positives) or --positives "
            f"(saved positives); got {', '.join(sources) or 'none'}."
        )
    figure_config = config_from_args(AttentionFigureConfig, args)
    if args.positives and args.grid is None:
        raise UsageError("--positives needs --grid H,W (the patch grid the indices refer to).")
    apply_runtime_options(args)
    image = _read_image(args.image)
    try:
        if args.pretraining:
            from selfpatch_hf.evaluation.visualize import teacher_positives
            from selfpatch_hf.models.selfpatch.modeling import SelfPatchForPretraining

            check_exists("--pretraining", args.pretraining)
            try:
                model = SelfPatchForPretraining.from_pretrained(args.pretraining).eval()
            except (OSError, ValueError) as error:
                raise CommandFailure(
                    f"cannot load a SelfPatchForPretraining from --pretraining {args.pretraining}: "
                    + str(error).strip().splitlines()[0]
                ) from error
            picture, grid, positives = teacher_positives(model, image, args.image_size)
            k, window = model.config.num_positives, model.config.neighborhood_size
            figure = positives_figure(
                picture,
                grid,
                args.query,
                positives,
                description=f"Selected by the teacher of {args.pretraining} (the {k} most similar patches within "
                f"its {window}x{window} neighbourhood).",
            )
        elif args.positives:
            figure = positives_figure(
                image,
                args.grid,
                args.query,
                _read_positives(args.positives),
                description=f"From {args.positives}.",
            )
        else:
            models = {
                name: load_backbone(args, path, attn_implementation="eager") for name, path in args.model
            }
            hierarchical = [name for name, model in models.items() if getattr(model, "hierarchical", False)]
            if hierarchical:
                raise UsageError(
                    f"--model {hierarchical[0]}: a Swin backbone has no image-wide attention map (its attention is "
                    "per shifted local window and there is no CLS token to look from); give ViT backbones, or draw "
                    "teacher positives with --positives/--pretraining."
                )
            figure = attention_figure(
                image,
                models,
                args.query,
                image_size=args.image_size,
                **dataclasses.asdict(figure_config),
            )
    except (
        ValueError,
        IndexError,
    ) as error:  # a query outside the patch grid, positives of another grid, a layer
        raise UsageError(str(error)) from error
    save_figure(figure, args.output)
    print(f"wrote {args.output} ({figure.width}x{figure.height})")
    return 0
