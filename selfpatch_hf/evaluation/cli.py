"""Command line of the dense evaluations: `selfpatch eval <command> ...` (or `python -m selfpatch_hf.evaluation`).

Commands:
  davis              label propagation on DAVIS 2017 (or any folder in its layout) and J&F scoring
  linear-probe       linear semantic segmentation probe on a `datasets` dataset (image + mask columns)
  knn                weighted k-NN classification on the image representation
  visualize          top-10% attention of query patches for several backbones / teacher positives, as PNG
  make-offline-data  build the offline evaluation data (synthetic compositions of real photographs)
  coco               COCO box / mask AP of a saved detector or instance segmenter on a COCO-layout split

Errors follow the project's command-line contract (`selfpatch_hf.cli.errors`): a wrong argument exits with
status 2, a failed step (unreadable model, missing frames, mismatched masks) with status 1, each with one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from selfpatch_hf.cli.errors import CommandFailure, HelpFormatter, UsageError, run_command

logger = logging.getLogger(__name__)

PROG = "selfpatch eval"
_EXAMPLES = {
    "davis": """examples:
  selfpatch eval davis --model dino=facebook/dino-vits16 --model selfpatch=out/backbone \\
      --davis-root data/DAVIS --output-dir results/davis
  selfpatch eval davis --davis-root data/DAVIS --output-dir results/davis/selfpatch --evaluate-only""",
    "linear-probe": """examples:
  selfpatch eval linear-probe --model out/backbone --dataset scene_parse_150 --reduce-labels \\
      --epochs 20 --output-json results/ade20k.json""",
    "knn": """examples:
  selfpatch eval knn --model out/backbone --dataset data/imagenette --label-column label --k 20""",
    "visualize": """examples:
  selfpatch eval visualize --model dino=facebook/dino-vits16 --model selfpatch=out/backbone \\
      --image skimage:chelsea --query 0.4,0.55 --query 0.8,0.2 --output attention.png
  selfpatch eval visualize --pretraining out/checkpoints/checkpoint-1000/model --image photo.jpg \\
      --query 0.5,0.5 --output positives.png""",
    "make-offline-data": """examples:
  selfpatch eval make-offline-data --output-dir data/offline
  selfpatch eval make-offline-data --output-dir data/offline --coco-json   # instances also as COCO json""",
}


def _int_pair(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        height, width = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH (two whole numbers), got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"HEIGHT and WIDTH must be positive, got {text!r}")
    return height, width


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


def _named_model(text: str) -> tuple[str, str]:
    if "=" in text:
        name, path = text.split("=", 1)
        return name, path
    return Path(text.rstrip("/")).name or text, text


def _looks_local(path: str) -> bool:
    """Whether a model/dataset argument can only mean a local path (Hub ids are `name` or `namespace/name`)."""
    return (
        path.startswith(("/", "./", "../", "~", "."))
        or path.count("/") > 1
        or os.sep != "/"
        and os.sep in path
    )


def _check_exists(option: str, path: str) -> None:
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise UsageError(f"{option} {path}: no such file or folder; give an existing path (or a Hub id).")


def load_split(dataset: str, split: str, config_name: str | None = None):
    """A split of a Hub dataset, a local data folder (parquet, imagefolder, ...) or a `save_to_disk` folder."""
    import datasets

    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{dataset} has splits {list(loaded)}, not {split!r}.")
            return loaded[split]
        return loaded
    return datasets.load_dataset(dataset, config_name, split=split)


def _load_split(args, split: str):
    _check_exists("--dataset", args.dataset)
    try:
        return load_split(args.dataset, split, args.dataset_config)
    except (
        FileNotFoundError,
        ConnectionError,
    ) as error:  # datasets' DatasetNotFoundError is a FileNotFoundError
        raise CommandFailure(
            f"cannot open the {split!r} split of --dataset {args.dataset}: {error}"
        ) from error
    except ValueError as error:  # e.g. an unknown split
        raise UsageError(f"--dataset {args.dataset}: {error}") from error


def _add_model_arguments(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    if multiple:
        parser.add_argument(
            "--model",
            action="append",
            type=_named_model,
            metavar="[NAME=]PATH",
            help="backbone folder or Hub id loadable by AutoModel; repeat to compare backbones (NAME labels the "
            "results; default: the folder name)",
        )
    else:
        parser.add_argument("--model", required=True, help="backbone folder or Hub id loadable by AutoModel")
    parser.add_argument("--device", default="cpu", help="torch device to run the backbone on")
    parser.add_argument(
        "--image-mean",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="normalisation mean (default: the backbone's image processor, else ImageNet's)",
    )
    parser.add_argument(
        "--image-std",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="normalisation standard deviation (default: the backbone's image processor, else ImageNet's)",
    )
    _add_stage_argument(parser)


def _add_stage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage",
        type=int,
        help="Swin backbones: the stage whose token map is evaluated, 1-based (default: the last; Swin-T stage 3 "
        "has stride 16)",
    )


def _load(args, path: str, option: str = "--model", **kwargs):
    from selfpatch_hf.evaluation.features import FrozenBackbone

    _check_exists(option, path)
    try:
        return FrozenBackbone.from_pretrained(
            path,
            image_mean=args.image_mean,
            image_std=args.image_std,
            device=args.device,
            stage=getattr(args, "stage", None),
            **kwargs,
        )
    except ValueError as error:
        if "stage=" in str(error):  # a stage the backbone does not have
            raise UsageError(f"--stage: {error}") from error
        first_line = str(error).strip().splitlines()[0]
        raise CommandFailure(f"cannot load a backbone from {option} {path}: {first_line}") from error
    except OSError as error:  # not a model folder / unknown Hub id
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandFailure(f"cannot load a backbone from {option} {path}: {first_line}") from error


def _subparser(commands, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=help_text,
        description=textwrap.fill(description, 88),
        epilog=_EXAMPLES.get(name),
        formatter_class=HelpFormatter,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Dense evaluation and visualisation of any ViT backbone that AutoModel loads "
        "(`selfpatch eval COMMAND --help` for each command).",
        epilog="Exit status: 2 for a wrong argument, 1 for a failed step (unreadable model, missing frames, "
        "mismatched masks),\neach with one line naming it.",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    davis = _subparser(
        commands,
        "davis",
        "DAVIS 2017 label propagation and J&F",
        "Propagate each sequence's first-frame mask with the backbone's patch features (the DINO/SelfPatch "
        "protocol) and score the predictions with J&F (DAVIS semi-supervised mode).",
    )
    _add_model_arguments(davis, multiple=True)
    davis.add_argument(
        "--davis-root", required=True, help="folder with JPEGImages/, Annotations/, ImageSets/"
    )
    davis.add_argument(
        "--output-dir",
        required=True,
        help="predictions go to OUTPUT/<sequence>/*.png (OUTPUT/<model>/... for several models)",
    )
    davis.add_argument("--split", default="val", help="ImageSets/<year>/<split>.txt lists the sequences")
    davis.add_argument("--year", default="2017", help="ImageSets/<year>/")
    davis.add_argument(
        "--resolution", default="480p", help="JPEGImages/<resolution>/ and Annotations/<resolution>/"
    )
    davis.add_argument("--sequences", help="comma-separated subset of the split (default: the whole split)")
    davis.add_argument("--short-side", type=int, default=480, help="frames are resized to this shorter side")
    davis.add_argument(
        "--size-multiple", type=int, default=64, help="resized sides are rounded to a multiple of this"
    )
    davis.add_argument(
        "--n-last-frames", type=int, default=7, help="context: this many previous frames plus the first"
    )
    davis.add_argument(
        "--topk", type=int, default=5, help="labels come from the k most similar context patches"
    )
    davis.add_argument("--temperature", type=float, default=0.1, help="softmax temperature of the affinities")
    davis.add_argument("--neighborhood", type=int, default=12, help="window radius in patches (0: none)")
    davis.add_argument(
        "--no-channel-norm", action="store_true", help="skip the per-channel min-max before argmax"
    )
    davis.add_argument(
        "--bound-th", type=float, default=0.008, help="boundary tolerance of F, as a fraction of the diagonal"
    )
    davis.add_argument(
        "--evaluate-only", action="store_true", help="score the existing masks in --output-dir (no --model)"
    )

    probe = _subparser(
        commands,
        "linear-probe",
        "linear semantic segmentation probe",
        "Train a linear classifier on frozen patch features to predict segmentation masks, and report mIoU.",
    )
    _add_model_arguments(probe)
    probe.add_argument(
        "--dataset",
        required=True,
        help="Hub id (e.g. scene_parse_150), local data folder or save_to_disk folder",
    )
    probe.add_argument("--dataset-config", help="the dataset's configuration name, if it has several")
    probe.add_argument("--train-split", default="train", help="split the probe is trained on")
    probe.add_argument("--eval-split", default="validation", help="split the probe is scored on")
    probe.add_argument("--image-column", help="column of the images (default: found by name)")
    probe.add_argument("--mask-column", help="column of the class-index masks (default: found by name)")
    probe.add_argument("--num-labels", type=int, help="number of classes (default: largest label + 1)")
    probe.add_argument("--ignore-index", type=int, default=255, help="mask value that is not scored")
    probe.add_argument("--reduce-labels", action="store_true", help="0 -> ignore, l -> l-1 (ADE20K)")
    probe.add_argument(
        "--image-size", type=int, default=224, help="square input size (a multiple of the patch)"
    )
    probe.add_argument("--epochs", type=int, default=20, help="training epochs of the linear head")
    probe.add_argument("--batch-size", type=int, default=16, help="images per batch")
    probe.add_argument("--learning-rate", type=float, default=1e-3, help="learning rate of the linear head")
    probe.add_argument("--max-train-samples", type=int, help="use only the first N training examples")
    probe.add_argument("--max-eval-samples", type=int, help="score only the first N evaluation examples")
    probe.add_argument("--seed", type=int, default=0, help="seed of the head's initialisation and shuffling")
    probe.add_argument("--output-json", help="also write the scores to this JSON file")

    knn = _subparser(
        commands,
        "knn",
        "weighted k-NN classification",
        "Classify each evaluation image by a similarity-weighted vote of its k nearest training images (DINO's "
        "k-NN protocol) and report top-1/top-5 accuracy.",
    )
    _add_model_arguments(knn)
    knn.add_argument("--dataset", required=True, help="Hub id, local data folder or save_to_disk folder")
    knn.add_argument("--dataset-config", help="the dataset's configuration name, if it has several")
    knn.add_argument("--train-split", default="train", help="split of the neighbours")
    knn.add_argument("--eval-split", default="validation", help="split that is classified")
    knn.add_argument("--image-column", default="image", help="column of the images")
    knn.add_argument("--label-column", help="column of the integer labels (default: found by name)")
    knn.add_argument("--k", type=int, default=20, help="number of neighbours that vote")
    knn.add_argument("--temperature", type=float, default=0.07, help="temperature of the vote weights")
    knn.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop")
    knn.add_argument("--crop", type=int, default=224, help="centre crop size (a multiple of the patch size)")
    knn.add_argument(
        "--pooling",
        choices=("auto", "cls", "mean"),
        default="auto",
        help="image representation: CLS token, mean of patch tokens, or auto (CLS when the model has one)",
    )
    knn.add_argument("--max-train-samples", type=int, help="use only the first N training examples")
    knn.add_argument("--max-eval-samples", type=int, help="classify only the first N evaluation examples")
    knn.add_argument("--output-json", help="also write the scores to this JSON file")

    vis = _subparser(
        commands,
        "visualize",
        "attention / positive-neighbour pictures (PNG)",
        "Draw, for query patches of one image, the patches that receive the most last-layer attention (one column "
        "per --model), or the positive neighbours a SelfPatch teacher selects (--pretraining or --positives). The "
        "PNG carries column titles, row labels and a caption saying what it shows.",
    )
    _add_model_arguments(vis, multiple=True)
    vis.add_argument(
        "--image",
        required=True,
        help="image file, or skimage:NAME for an image bundled with scikit-image (e.g. skimage:chelsea)",
    )
    vis.add_argument(
        "--query",
        action="append",
        type=_query,
        required=True,
        metavar="INDEX|Y,X",
        help="query patch: a row-major index, or Y,X fractions of the image (e.g. 0.4,0.6); repeat for more rows",
    )
    vis.add_argument(
        "--image-size",
        type=_int_pair,
        metavar="HEIGHT,WIDTH",
        help="network input HEIGHT,WIDTH (default: shorter side 224 for --model, the global crop size for "
        "--pretraining, with the image's aspect ratio kept)",
    )
    vis.add_argument(
        "--fraction",
        type=float,
        default=0.1,
        help="share of the attention to show: the top FRACTION of patches (--mode patches) or of the attention "
        "mass (--mode mass)",
    )
    vis.add_argument(
        "--mode",
        choices=("patches", "mass"),
        default="patches",
        help="patches: the ceil(FRACTION x patches) most attended patches (the paper's Figure 1); mass: the fewest "
        "patches holding FRACTION of the attention (DINO's figures)",
    )
    vis.add_argument("--per-head", action="store_true", help="also draw one column per attention head")
    vis.add_argument(
        "--layer",
        type=int,
        default=-1,
        help="transformer layer whose attention is drawn (0-based; negative counts from the last)",
    )
    vis.add_argument(
        "--positives",
        metavar="FILE",
        help="(N, k) teacher positive indices saved as .npy or .pt, drawn instead of attention",
    )
    vis.add_argument("--grid", type=_int_pair, metavar="H,W", help="patch grid H,W of --positives")
    vis.add_argument(
        "--pretraining",
        metavar="FOLDER",
        help="a SelfPatchViTForPretraining folder (e.g. a training checkpoint's model): run its teacher on the "
        "image and draw the positives it selects",
    )
    vis.add_argument("--output", required=True, metavar="PNG", help="PNG file to write")

    data = _subparser(
        commands,
        "make-offline-data",
        "build the offline evaluation data (synthetic scenes)",
        "Build small DAVIS-layout video sequences and a segmentation dataset from real photographs bundled with "
        "Python packages, for evaluating without downloads.",
    )
    data.add_argument("--output-dir", required=True, help="writes OUTPUT/davis and OUTPUT/segmentation")
    data.add_argument("--num-sequences", type=int, default=8, help="number of video sequences")
    data.add_argument("--num-frames", type=int, default=20, help="frames per sequence")
    data.add_argument(
        "--frame-size", type=_int_pair, default=(240, 320), metavar="HEIGHT,WIDTH", help="size of the frames"
    )
    data.add_argument("--max-objects", type=int, default=3, help="most objects per sequence")
    data.add_argument("--num-train", type=int, default=240, help="segmentation training images")
    data.add_argument("--num-eval", type=int, default=80, help="segmentation evaluation images")
    data.add_argument("--image-size", type=int, default=224, help="side of the segmentation images")
    data.add_argument("--num-instance-train", type=int, default=240, help="instance-set training images")
    data.add_argument("--num-instance-eval", type=int, default=80, help="instance-set evaluation images")
    data.add_argument(
        "--instance-size",
        type=_int_pair,
        default=(192, 256),
        metavar="HEIGHT,WIDTH",
        help="size of the instance-set images",
    )
    data.add_argument("--max-instances", type=int, default=4, help="most objects per instance-set image")
    data.add_argument(
        "--coco-json",
        action="store_true",
        help="also write the instance set as COCO json + PNG folders (OUTPUT/instances/coco)",
    )
    data.add_argument("--seed", type=int, default=0, help="random seed")
    _add_coco_parser(commands)
    return parser


def _write_json(path: str | None, payload: dict) -> None:
    text = json.dumps(payload, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def _run_davis(args) -> int:
    from selfpatch_hf.evaluation.davis import DavisDataError, evaluate_davis, predict_davis
    from selfpatch_hf.evaluation.propagation import PropagationConfig

    if not Path(args.davis_root).is_dir():
        raise UsageError(
            f"--davis-root {args.davis_root} is not a folder; give the DAVIS folder (with JPEGImages/, "
            "Annotations/ and ImageSets/)."
        )
    sequences = [s for s in args.sequences.split(",") if s] if args.sequences else None
    common = {"split": args.split, "year": args.year, "resolution": args.resolution, "sequences": sequences}
    output_dir = Path(args.output_dir)
    try:
        if args.evaluate_only:
            if args.model:
                raise UsageError("--evaluate-only scores existing predictions: drop --model.")
            if not output_dir.is_dir():
                raise UsageError(
                    f"--evaluate-only: --output-dir {output_dir} holds no predictions (no such folder)."
                )
            targets = [(output_dir.name, output_dir)]
        else:
            if not args.model:
                raise UsageError(
                    "give --model (or --evaluate-only to score existing predictions in --output-dir)."
                )
            try:
                config = PropagationConfig(
                    short_side=args.short_side,
                    size_multiple=args.size_multiple,
                    n_last_frames=args.n_last_frames,
                    topk=args.topk,
                    temperature=args.temperature,
                    neighborhood=args.neighborhood,
                    normalize_channels=not args.no_channel_norm,
                )
            except ValueError as error:
                raise UsageError(str(error)) from error
            models = [(name, _load(args, path)) for name, path in args.model]  # all load before any work
            targets = []
            for name, model in models:
                target = output_dir / name if len(models) > 1 else output_dir
                predict_davis(
                    args.davis_root,
                    model,
                    target,
                    config,
                    progress=lambda seq, n=name: print(f"[{n}] {seq} done", file=sys.stderr),
                    **common,
                )
                targets.append((name, target))
        rows = []
        for name, target in targets:
            result = evaluate_davis(args.davis_root, target, bound_th=args.bound_th, **common)
            _write_json(str(target / "scores.json"), result.to_dict())
            rows.append((name, result))
            print(f"## {name}\n\n{result.to_markdown()}\n")
    except (FileNotFoundError, DavisDataError) as error:
        raise CommandFailure(str(error)) from error
    if len(rows) > 1:
        print("| Model | J&F | J | F |\n|---|---|---|---|")
        for name, result in rows:
            print(f"| {name} | {result.jf_mean:.3f} | {result.j_mean:.3f} | {result.f_mean:.3f} |")
    return 0


def _run_linear_probe(args) -> int:
    from selfpatch_hf.evaluation.linear_probe import LinearProbeConfig, run_linear_probe

    config = LinearProbeConfig(
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        ignore_index=args.ignore_index,
        reduce_labels=args.reduce_labels,
        num_labels=args.num_labels,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        seed=args.seed,
    )
    backbone = _load(args, args.model)
    train, evaluation = _load_split(args, args.train_split), _load_split(args, args.eval_split)
    try:
        result = run_linear_probe(
            backbone,
            train,
            evaluation,
            config,
            image_column=args.image_column,
            mask_column=args.mask_column,
            log=lambda m: print(m, file=sys.stderr),
        )
    except ValueError as error:  # columns not found, masks that are no class-index maps, labels out of range
        raise CommandFailure(f"linear probe on {args.dataset}: {error}") from error
    scores = result.scores
    print("| mIoU | mAcc | aAcc | classes | train | eval |\n|---|---|---|---|---|---|")
    print(
        f"| {100 * scores.mean_iou:.2f} | {100 * scores.mean_accuracy:.2f} | {100 * scores.overall_accuracy:.2f} "
        f"| {result.num_labels} | {result.num_train} | {result.num_eval} |"
    )
    _write_json(args.output_json, result.to_dict())
    return 0


def _run_knn(args) -> int:
    from selfpatch_hf.evaluation.knn import KnnConfig, run_knn

    config = KnnConfig(
        k=args.k,
        temperature=args.temperature,
        resize=args.resize,
        crop=args.crop,
        pooling=args.pooling,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    backbone = _load(args, args.model)
    train, evaluation = _load_split(args, args.train_split), _load_split(args, args.eval_split)
    try:
        result = run_knn(
            backbone,
            train,
            evaluation,
            config,
            image_column=args.image_column,
            label_column=args.label_column,
        )
    except ValueError as error:  # columns not found, a crop off the patch grid
        raise CommandFailure(f"k-NN on {args.dataset}: {error}") from error
    print(
        f"| k | top-1 | top-5 | train | eval |\n|---|---|---|---|---|\n"
        f"| {config.k} | {result.top1:.2f} | {result.top5:.2f} | {result.num_train} | {result.num_eval} |"
    )
    _write_json(args.output_json, result.to_dict())
    return 0


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


def _run_visualize(args) -> int:
    from selfpatch_hf.evaluation.visualize import attention_figure, positives_figure, save_figure

    sources = [name for name, given in (("--model", args.model), ("--positives", args.positives),
                                        ("--pretraining", args.pretraining)) if given]  # fmt: skip
    if len(sources) != 1:
        raise UsageError(
            "give exactly one of --model (attention), --pretraining (a teacher's positives) or --positives "
            f"(saved positives); got {', '.join(sources) or 'none'}."
        )
    if not 0.0 < args.fraction <= 1.0:
        raise UsageError(f"--fraction must lie in (0, 1], got {args.fraction}.")
    if args.positives and args.grid is None:
        raise UsageError("--positives needs --grid H,W (the patch grid the indices refer to).")
    image = _read_image(args.image)
    try:
        if args.pretraining:
            from selfpatch_hf.evaluation.visualize import teacher_positives
            from selfpatch_hf.models.selfpatch.modeling import SelfPatchViTForPretraining

            _check_exists("--pretraining", args.pretraining)
            try:
                model = SelfPatchViTForPretraining.from_pretrained(args.pretraining).eval()
            except (OSError, ValueError) as error:
                raise CommandFailure(
                    f"cannot load a SelfPatchViTForPretraining from --pretraining {args.pretraining}: "
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
            models = {name: _load(args, path, attn_implementation="eager") for name, path in args.model}
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
                fraction=args.fraction,
                mode=args.mode,
                per_head=args.per_head,
                layer=args.layer,
            )
    except (
        ValueError,
        IndexError,
    ) as error:  # a query outside the patch grid, positives of another grid, a layer
        raise UsageError(str(error)) from error
    save_figure(figure, args.output)
    print(f"wrote {args.output} ({figure.width}x{figure.height})")
    return 0


def _run_make_offline_data(args) -> int:
    from selfpatch_hf.data.samples.synthetic_scenes import DATA_NOTE, make_offline_data

    for option, value in (("--num-instance-train", args.num_instance_train),
                          ("--num-instance-eval", args.num_instance_eval)):  # fmt: skip
        if value < 0:
            raise UsageError(f"{option} must be >= 0, got {value}.")
    if not 1 <= args.max_instances <= 20:
        raise UsageError(f"--max-instances must be between 1 and 20, got {args.max_instances}.")
    info = make_offline_data(
        args.output_dir,
        num_sequences=args.num_sequences,
        num_frames=args.num_frames,
        frame_size=args.frame_size,
        max_objects=args.max_objects,
        num_train=args.num_train,
        num_eval=args.num_eval,
        image_size=args.image_size,
        num_instance_train=args.num_instance_train,
        num_instance_eval=args.num_instance_eval,
        instance_size=args.instance_size,
        max_instances=args.max_instances,
        coco_json=args.coco_json,
        seed=args.seed,
    )
    output = Path(args.output_dir)
    print(
        f"{DATA_NOTE}\nwrote {len(info['sequences'])} sequences to {output / 'davis'}, the segmentation set to "
        f"{output / 'segmentation'} and the instance set to {output / 'instances'}"
    )
    return 0


# ---------------------------------------------------------------------------------------------------------------
# selfpatch eval coco: COCO box / mask AP of a saved detector (defaults from CocoEvalConfig)
# ---------------------------------------------------------------------------------------------------------------

_EXAMPLES["coco"] = """examples:
  selfpatch eval coco --model runs/mask2former --dataset data/coco/annotations/instances_val2017.json
  selfpatch eval coco --model runs/detector --dataset detection-datasets/coco --split val --box-format xyxy
  selfpatch eval coco --model runs/detector --dataset offline-instances --output-json results/coco.json"""


def _add_coco_parser(commands) -> None:
    from selfpatch_hf.evaluation.detection import CocoEvalConfig

    defaults = CocoEvalConfig()
    coco = _subparser(
        commands,
        "coco",
        "COCO box / mask AP of a saved detector or instance segmenter",
        "Run a saved AutoModelForObjectDetection (box AP) or AutoModelForUniversalSegmentation (mask AP and box AP "
        "of its masks) folder over a split in the COCO layout, with its own image processor and post-processing, "
        "and score it with pycocotools.",
    )
    coco.add_argument("--model", required=True, help="detector / instance segmenter folder or Hub id")
    coco.add_argument(
        "--dataset",
        required=True,
        help="a COCO json file, a Hub id or local folder in the Hub's COCO layout (image + objects), a save_to_disk "
        "folder, or offline-instances",
    )
    coco.add_argument(
        "--split", default="validation", help="split to evaluate (COCO json: names its image folder)"
    )
    coco.add_argument("--dataset-config", help="the dataset's configuration name, if it has several")
    coco.add_argument(
        "--image-dir", help="COCO json: the image folder (default: COCO's layout, beside annotations/)"
    )
    coco.add_argument(
        "--box-format",
        choices=("xywh", "xyxy"),
        default="xywh",
        help="Hub layout: [x, y, width, height] (COCO) or [x0, y0, x1, y1]; see the dataset card",
    )
    coco.add_argument("--label-names", help="JSON list of category names, for a category field without names")
    coco.add_argument("--image-column", help="column of the images (default: the image column)")
    coco.add_argument("--objects-column", help="column of the objects (default: the list-of-objects column)")
    coco.add_argument(
        "--category-field", help="objects' category field (default: category / category_id / label)"
    )
    coco.add_argument(
        "--offline-data-dir", default="data/offline", help="where offline-instances is built on first use"
    )
    coco.add_argument(
        "--threshold", type=float, default=defaults.threshold, help="keep predictions scoring at least this"
    )
    coco.add_argument(
        "--mask-threshold",
        type=float,
        default=defaults.mask_threshold,
        help="mask probability of a mask pixel",
    )
    coco.add_argument(
        "--overlap-mask-area-threshold",
        type=float,
        default=defaults.overlap_mask_area_threshold,
        help="--pipeline-masks: drop a mask mostly covered by others",
    )
    coco.add_argument(
        "--pipeline-masks",
        action="store_true",
        help="score masks as pipeline('image-segmentation', subtask='instance') gives them (one segmentation map) "
        "instead of each query's own mask",
    )
    coco.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="images per forward pass (of one size)"
    )
    coco.add_argument("--max-samples", type=int, help="evaluate only the first N images")
    coco.add_argument("--device", default=defaults.device, help="torch device to run the model on")
    coco.add_argument("--output-json", help="also write the scores to this JSON file")


def _run_coco(args) -> int:
    from selfpatch_hf.data.detection.sources import OFFLINE_INSTANCES, load_detection_source
    from selfpatch_hf.evaluation.detection import CocoEvalConfig, evaluate_coco, write_result

    try:
        config = CocoEvalConfig(
            threshold=args.threshold,
            mask_threshold=args.mask_threshold,
            overlap_mask_area_threshold=args.overlap_mask_area_threshold,
            overlapping_masks=not args.pipeline_masks,
            batch_size=args.batch_size,
            max_samples=args.max_samples,
            device=args.device,
        )
    except ValueError as error:
        raise UsageError(
            f"--{str(error).split(' ', 1)[0].replace('_', '-')} {str(error).split(' ', 1)[1]}"
        ) from None
    _check_exists("--model", args.model)
    if args.dataset != OFFLINE_INSTANCES:
        _check_exists("--dataset", args.dataset)
    if args.image_dir is not None and not Path(args.image_dir).is_dir():
        raise UsageError(
            f"--image-dir {args.image_dir}: no such folder; give the folder of the COCO json's images."
        )
    label_names = None
    if args.label_names:
        try:
            label_names = json.loads(Path(args.label_names).read_text())
        except (OSError, ValueError) as error:
            raise UsageError(
                f"--label-names {args.label_names}: not a readable JSON list ({error})."
            ) from None
        if not isinstance(label_names, list) or not label_names:
            raise UsageError(f"--label-names {args.label_names}: must hold a JSON list of category names.")
    options = {
        "box_format": args.box_format,
        "label_names": label_names,
        "image_column": args.image_column,
        "objects_column": args.objects_column,
        "category_field": args.category_field,
    }
    try:
        source = load_detection_source(
            args.dataset,
            args.split,
            image_dir=args.image_dir,
            config_name=args.dataset_config,
            offline_data_dir=args.offline_data_dir,
            **{k: v for k, v in options.items() if v is not None},
        )
    except (FileNotFoundError, ConnectionError, OSError) as error:
        raise CommandFailure(
            f"cannot open the {args.split!r} split of --dataset {args.dataset}: {error}"
        ) from error
    except ValueError as error:  # no COCO layout, a named column missing, an unknown split
        raise UsageError(f"--dataset {args.dataset}: {error}") from error
    try:
        result = evaluate_coco(
            args.model,
            source,
            config,
            progress=lambda done, total: print(f"\r{done}/{total} images", end="", file=sys.stderr),
        )
    except OSError as error:  # not a model folder, an unreadable image
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandFailure(f"--model {args.model}: {first_line}") from error
    except ValueError as error:  # labels that differ, a category outside the label map, a broken mask
        raise CommandFailure(f"COCO evaluation of {args.model} on {args.dataset}: {error}") from error
    print(file=sys.stderr)
    print(result.to_markdown())
    print(f"\n{result.num_images} images; annotations: {source.issues.summary()}")
    if args.output_json:
        try:
            write_result(result, args.output_json)
        except OSError as error:  # a read-only folder, a full disk: the scores above are printed already
            raise CommandFailure(f"cannot write --output-json {args.output_json}: {error}") from error
    return 0


_COMMANDS = {
    "davis": _run_davis,
    "linear-probe": _run_linear_probe,
    "knn": _run_knn,
    "visualize": _run_visualize,
    "make-offline-data": _run_make_offline_data,
    "coco": _run_coco,
}


def _main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return _COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
