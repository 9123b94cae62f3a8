"""Command line of the dense evaluations: `python -m selfpatch_hf.evaluation <command> ...`.

Commands:
  davis              label propagation on DAVIS 2017 (or any folder in its layout) and J&F scoring
  linear-probe       linear semantic segmentation probe on a `datasets` dataset (image + mask columns)
  knn                weighted k-NN classification on the image representation
  visualize          top-10% attention of query patches for several backbones / teacher positives, as PNG
  make-offline-data  build the offline evaluation data (synthetic compositions of real photographs)

`main(argv)` is also mounted as `selfpatch eval ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..command_line import UsageError, run_command

logger = logging.getLogger(__name__)


def _int_pair(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH, got {text!r}")
    return int(parts[0]), int(parts[1])


def _query(text: str):
    if "," in text:
        y, x = text.split(",", 1)
        return float(y), float(x)
    return int(text)


def _named_model(text: str) -> tuple[str, str]:
    if "=" in text:
        name, path = text.split("=", 1)
        return name, path
    return Path(text.rstrip("/")).name or text, text


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


def _add_model_arguments(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    if multiple:
        parser.add_argument(
            "--model",
            action="append",
            required=True,
            type=_named_model,
            metavar="[NAME=]PATH",
            help="backbone folder or Hub id loadable by AutoModel; repeat to compare backbones",
        )
    else:
        parser.add_argument("--model", required=True, help="backbone folder or Hub id loadable by AutoModel")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--image-mean", type=float, nargs=3, default=None, help="override the processor's mean"
    )
    parser.add_argument("--image-std", type=float, nargs=3, default=None, help="override the processor's std")
    _add_stage_argument(parser)


def _add_stage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage",
        type=int,
        default=None,
        help="Swin backbones: the stage whose token map is evaluated, 1-based (default: the last; Swin-T stage 3 "
        "has stride 16)",
    )


def _load(args, path: str, **kwargs):
    from .features import FrozenBackbone

    try:
        return FrozenBackbone.from_pretrained(
            path,
            image_mean=args.image_mean,
            image_std=args.image_std,
            device=args.device,
            stage=getattr(args, "stage", None),
            **kwargs,
        )
    except ValueError as error:  # a stage the backbone does not have
        if "stage=" in str(error):
            raise UsageError(f"--stage: {error}") from error
        raise


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfpatch eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    davis = commands.add_parser("davis", help="DAVIS 2017 label propagation and J&F")
    davis.add_argument(
        "--model",
        action="append",
        type=_named_model,
        metavar="[NAME=]PATH",
        help="backbone(s) to evaluate; omit with --evaluate-only",
    )
    davis.add_argument("--device", default="cpu")
    davis.add_argument("--image-mean", type=float, nargs=3, default=None)
    davis.add_argument("--image-std", type=float, nargs=3, default=None)
    _add_stage_argument(davis)
    davis.add_argument(
        "--davis-root", required=True, help="folder with JPEGImages/, Annotations/, ImageSets/"
    )
    davis.add_argument(
        "--output-dir", required=True, help="predictions go to OUTPUT/<model>/<sequence>/*.png"
    )
    davis.add_argument("--split", default="val")
    davis.add_argument("--year", default="2017")
    davis.add_argument("--resolution", default="480p")
    davis.add_argument("--sequences", default=None, help="comma-separated subset of the split")
    davis.add_argument("--short-side", type=int, default=480)
    davis.add_argument("--size-multiple", type=int, default=64)
    davis.add_argument("--n-last-frames", type=int, default=7)
    davis.add_argument("--topk", type=int, default=5)
    davis.add_argument("--temperature", type=float, default=0.1)
    davis.add_argument("--neighborhood", type=int, default=12, help="window radius in patches (0: none)")
    davis.add_argument(
        "--no-channel-norm", action="store_true", help="skip the per-channel min-max before argmax"
    )
    davis.add_argument("--bound-th", type=float, default=0.008)
    davis.add_argument(
        "--evaluate-only", action="store_true", help="score the existing masks in --output-dir"
    )

    probe = commands.add_parser("linear-probe", help="linear semantic segmentation probe")
    _add_model_arguments(probe)
    probe.add_argument(
        "--dataset",
        required=True,
        help="Hub id (e.g. scene_parse_150), local data folder or save_to_disk folder",
    )
    probe.add_argument("--dataset-config", default=None)
    probe.add_argument("--train-split", default="train")
    probe.add_argument("--eval-split", default="validation")
    probe.add_argument("--image-column", default=None)
    probe.add_argument("--mask-column", default=None)
    probe.add_argument("--num-labels", type=int, default=None)
    probe.add_argument("--ignore-index", type=int, default=255)
    probe.add_argument("--reduce-labels", action="store_true", help="0 -> ignore, l -> l-1 (ADE20K)")
    probe.add_argument("--image-size", type=int, default=224)
    probe.add_argument("--epochs", type=int, default=20)
    probe.add_argument("--batch-size", type=int, default=16)
    probe.add_argument("--learning-rate", type=float, default=1e-3)
    probe.add_argument("--max-train-samples", type=int, default=None)
    probe.add_argument("--max-eval-samples", type=int, default=None)
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--output-json", default=None)

    knn = commands.add_parser("knn", help="weighted k-NN classification")
    _add_model_arguments(knn)
    knn.add_argument("--dataset", required=True)
    knn.add_argument("--dataset-config", default=None)
    knn.add_argument("--train-split", default="train")
    knn.add_argument("--eval-split", default="validation")
    knn.add_argument("--image-column", default="image")
    knn.add_argument("--label-column", default=None)
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--resize", type=int, default=256)
    knn.add_argument("--crop", type=int, default=224)
    knn.add_argument("--pooling", choices=("auto", "cls", "mean"), default="auto")
    knn.add_argument("--max-train-samples", type=int, default=None)
    knn.add_argument("--max-eval-samples", type=int, default=None)
    knn.add_argument("--output-json", default=None)

    vis = commands.add_parser("visualize", help="attention / positive-neighbour pictures (PNG)")
    vis.add_argument(
        "--model",
        action="append",
        type=_named_model,
        metavar="[NAME=]PATH",
        default=[],
        help="backbone(s) whose attention to show, side by side",
    )
    vis.add_argument("--device", default="cpu")
    vis.add_argument("--image-mean", type=float, nargs=3, default=None)
    vis.add_argument("--image-std", type=float, nargs=3, default=None)
    _add_stage_argument(vis)
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
        help="query patch: a row-major index, or Y,X fractions of the image (e.g. 0.4,0.6); repeat",
    )
    vis.add_argument(
        "--image-size", type=_int_pair, default=None, help="network input HEIGHT,WIDTH (224,224)"
    )
    vis.add_argument("--fraction", type=float, default=0.1)
    vis.add_argument("--mode", choices=("patches", "mass"), default="patches")
    vis.add_argument("--per-head", action="store_true")
    vis.add_argument(
        "--positives",
        default=None,
        help="(N, k) teacher positive indices saved as .npy or .pt, drawn instead of attention",
    )
    vis.add_argument("--grid", type=_int_pair, default=None, help="patch grid H,W of --positives")
    vis.add_argument(
        "--pretraining",
        default=None,
        help="a SelfPatchViTForPretraining folder (e.g. a training checkpoint's model): run its teacher on the "
        "image and draw the positives it selects (--image-size defaults to the global crop size)",
    )
    vis.add_argument("--output", required=True, help="PNG file to write")

    data = commands.add_parser(
        "make-offline-data", help="build the offline evaluation data (synthetic scenes)"
    )
    data.add_argument("--output-dir", required=True)
    data.add_argument("--num-sequences", type=int, default=8)
    data.add_argument("--num-frames", type=int, default=20)
    data.add_argument("--frame-size", type=_int_pair, default=(240, 320), help="HEIGHT,WIDTH")
    data.add_argument("--max-objects", type=int, default=3)
    data.add_argument("--num-train", type=int, default=240)
    data.add_argument("--num-eval", type=int, default=80)
    data.add_argument("--image-size", type=int, default=224)
    data.add_argument("--seed", type=int, default=0)
    return parser


def _write_json(path: str | None, payload: dict) -> None:
    text = json.dumps(payload, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def _run_davis(args) -> int:
    from .davis import evaluate_davis, predict_davis
    from .propagation import PropagationConfig

    sequences = [s for s in args.sequences.split(",") if s] if args.sequences else None
    common = {"split": args.split, "year": args.year, "resolution": args.resolution, "sequences": sequences}
    output_dir = Path(args.output_dir)
    if args.evaluate_only:
        targets = [(output_dir.name, output_dir)]
    else:
        if not args.model:
            raise SystemExit("davis: give --model (or --evaluate-only to score existing predictions).")
        config = PropagationConfig(
            short_side=args.short_side,
            size_multiple=args.size_multiple,
            n_last_frames=args.n_last_frames,
            topk=args.topk,
            temperature=args.temperature,
            neighborhood=args.neighborhood,
            normalize_channels=not args.no_channel_norm,
        )
        targets = []
        for name, path in args.model:
            target = output_dir / name if len(args.model) > 1 else output_dir
            predict_davis(
                args.davis_root,
                _load(args, path),
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
    if len(rows) > 1:
        print("| Model | J&F | J | F |\n|---|---|---|---|")
        for name, result in rows:
            print(f"| {name} | {result.jf_mean:.3f} | {result.j_mean:.3f} | {result.f_mean:.3f} |")
    return 0


def _run_linear_probe(args) -> int:
    from .linear_probe import LinearProbeConfig, run_linear_probe

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
    train = load_split(args.dataset, args.train_split, args.dataset_config)
    evaluation = load_split(args.dataset, args.eval_split, args.dataset_config)
    result = run_linear_probe(
        _load(args, args.model),
        train,
        evaluation,
        config,
        image_column=args.image_column,
        mask_column=args.mask_column,
        log=lambda m: print(m, file=sys.stderr),
    )
    scores = result.scores
    print("| mIoU | mAcc | aAcc | classes | train | eval |\n|---|---|---|---|---|---|")
    print(
        f"| {100 * scores.mean_iou:.2f} | {100 * scores.mean_accuracy:.2f} | {100 * scores.overall_accuracy:.2f} "
        f"| {result.num_labels} | {result.num_train} | {result.num_eval} |"
    )
    _write_json(args.output_json, result.to_dict())
    return 0


def _run_knn(args) -> int:
    from .knn import KnnConfig, run_knn

    config = KnnConfig(
        k=args.k,
        temperature=args.temperature,
        resize=args.resize,
        crop=args.crop,
        pooling=args.pooling,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    train = load_split(args.dataset, args.train_split, args.dataset_config)
    evaluation = load_split(args.dataset, args.eval_split, args.dataset_config)
    result = run_knn(
        _load(args, args.model),
        train,
        evaluation,
        config,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    print(
        f"| k | top-1 | top-5 | train | eval |\n|---|---|---|---|---|\n"
        f"| {config.k} | {result.top1:.2f} | {result.top5:.2f} | {result.num_train} | {result.num_eval} |"
    )
    _write_json(args.output_json, result.to_dict())
    return 0


def _read_image(spec: str):
    from PIL import Image

    if spec.startswith("skimage:"):
        import skimage.data

        name = spec.split(":", 1)[1]
        if not hasattr(skimage.data, name):
            raise SystemExit(f"visualize: scikit-image has no bundled image {name!r}.")
        return getattr(skimage.data, name)()
    with Image.open(spec) as image:
        return image.convert("RGB")


def _run_visualize(args) -> int:
    import numpy as np
    import torch

    from .visualize import attention_figure, positives_figure

    image = _read_image(args.image)
    if args.pretraining:
        from ..modeling_selfpatch import SelfPatchViTForPretraining
        from .visualize import teacher_positives

        model = SelfPatchViTForPretraining.from_pretrained(args.pretraining).eval()
        picture, grid, positives = teacher_positives(model, image, args.image_size)
        figure = positives_figure(picture, grid, args.query, positives)
    elif args.positives:
        if args.grid is None:
            raise SystemExit("visualize: --positives needs --grid H,W.")
        if args.positives.endswith(".npy"):
            positives = np.load(args.positives, allow_pickle=False)
        else:
            positives = torch.load(args.positives, map_location="cpu", weights_only=True)
        figure = positives_figure(image, args.grid, args.query, positives)
    else:
        if not args.model:
            raise SystemExit("visualize: give --model (attention) or --positives (teacher positives).")
        models = {name: _load(args, path, attn_implementation="eager") for name, path in args.model}
        hierarchical = [name for name, model in models.items() if getattr(model, "hierarchical", False)]
        if hierarchical:
            raise UsageError(
                f"--model {hierarchical[0]}: a Swin backbone has no image-wide attention map (its attention is per "
                "shifted local window and there is no CLS token to look from); give ViT backbones, or draw teacher "
                "positives with --positives/--pretraining."
            )
        figure = attention_figure(
            image,
            models,
            args.query,
            image_size=args.image_size or 224,
            fraction=args.fraction,
            mode=args.mode,
            per_head=args.per_head,
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.output, format="PNG")
    print(f"wrote {args.output} ({figure.width}x{figure.height})")
    return 0


def _run_make_offline_data(args) -> int:
    from ..data.synthetic_scenes import DATA_NOTE, make_offline_data

    info = make_offline_data(
        args.output_dir,
        num_sequences=args.num_sequences,
        num_frames=args.num_frames,
        frame_size=args.frame_size,
        max_objects=args.max_objects,
        num_train=args.num_train,
        num_eval=args.num_eval,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(
        f"{DATA_NOTE}\nwrote {len(info['sequences'])} sequences to {Path(args.output_dir) / 'davis'} and the "
        f"segmentation set to {Path(args.output_dir) / 'segmentation'}"
    )
    return 0


_COMMANDS = {
    "davis": _run_davis,
    "linear-probe": _run_linear_probe,
    "knn": _run_knn,
    "visualize": _run_visualize,
    "make-offline-data": _run_make_offline_data,
}


def _main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _build_parser().parse_args(argv)
    return _COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("selfpatch eval", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
