"""DAVIS 2017 semi-supervised evaluation: folder layout, label propagation over a split, J&F scoring.

Folder layout (as distributed by the DAVIS challenge):

    ROOT/JPEGImages/480p/<sequence>/00000.jpg ...
    ROOT/Annotations/480p/<sequence>/00000.png ...   indexed PNGs: 0 background, 1..K objects, 255 void
    ROOT/ImageSets/2017/val.txt                       one sequence name per line

Predictions are written as indexed PNGs with the DAVIS palette to OUTPUT/<sequence>/<frame>.png, the layout
the official toolkit reads. Scoring follows the toolkit's semi-supervised mode: objects are those of the
first annotated frame; the first and last frames are not scored; J and F are averaged per object over
frames, then over all objects of all sequences; J&F is their mean.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from selfpatch_hf.evaluation.configs import DavisConfig, PropagationConfig
from selfpatch_hf.evaluation.features import PatchFeatureExtractor, progress_bar
from selfpatch_hf.evaluation.propagation import iter_propagation
from selfpatch_hf.evaluation.vos_metrics import db_statistics, sequence_scores

logger = logging.getLogger(__name__)


def davis_palette() -> list[int]:
    """The 256-colour palette of DAVIS (and PASCAL VOC) annotations, flattened RGB."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.extend((r, g, b))
    return palette


DAVIS_PALETTE = davis_palette()


class DavisDataError(ValueError):
    """A DAVIS folder or a results folder whose content cannot be used (the message names the file and why)."""


@dataclass
class DavisSequence:
    name: str
    frames: list[Path]
    annotations: list[Path]


def read_indexed_mask(path: str | Path) -> np.ndarray:
    """Read an annotation PNG as an (H, W) uint8 array of object ids."""
    with Image.open(path) as image:
        if image.mode in ("P", "L", "I", "I;16", "1"):
            return np.asarray(image).astype(np.uint8)
    raise DavisDataError(
        f"{path} is a {image.mode} image; DAVIS annotations must be indexed (palette) or grayscale PNGs whose "
        "pixel values are object ids."
    )


def write_indexed_mask(path: str | Path, mask: np.ndarray, palette: Sequence[int] = DAVIS_PALETTE) -> None:
    """Write an (H, W) integer mask as a palette PNG (the format of DAVIS annotations and results)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"Expected an (H, W) mask with values in [0, 255], got shape {mask.shape}.")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(list(palette))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def list_sequences(
    root: str | Path, split: str = DavisConfig.split, year: str = DavisConfig.year
) -> list[str]:
    """Sequence names of `ImageSets/<year>/<split>.txt`."""
    listing = Path(root) / "ImageSets" / year / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(
            f"{listing} not found: `{root}` does not look like a DAVIS folder (expected JPEGImages/, "
            f"Annotations/ and ImageSets/{year}/{split}.txt)."
        )
    return [line.strip() for line in listing.read_text().splitlines() if line.strip()]


def load_sequence(root: str | Path, name: str, resolution: str = DavisConfig.resolution) -> DavisSequence:
    """Frame and annotation paths of one sequence, sorted by frame name."""
    root = Path(root)
    frame_dir = root / "JPEGImages" / resolution / name
    annotation_dir = root / "Annotations" / resolution / name
    frames = sorted(frame_dir.glob("*.jpg")) + sorted(frame_dir.glob("*.png"))
    annotations = sorted(annotation_dir.glob("*.png"))
    if not frames:
        raise FileNotFoundError(f"No frames (*.jpg) in {frame_dir}.")
    frame_names = {frame.stem for frame in frames}
    if annotations and annotations[0].stem < frames[0].stem:
        raise FileNotFoundError(
            f"The first annotated frame's image {frame_dir / (annotations[0].stem + '.jpg')} is missing: its mask "
            f"({annotations[0].name}) is what the propagation starts from."
        )
    if not annotations or annotations[0].stem != frames[0].stem:
        raise FileNotFoundError(
            f"The first frame's annotation {annotation_dir / (frames[0].stem + '.png')} is missing."
        )
    # An annotation whose frame image is missing can be neither propagated nor scored: say so, and leave it out.
    orphans = [path for path in annotations if path.stem not in frame_names]
    if orphans:
        shown = ", ".join(path.name for path in orphans[:5]) + (", ..." if len(orphans) > 5 else "")
        # logged (not only raised as a Python warning): the command line shows it, and so does a plain script
        logger.warning(
            "Sequence %s: %d annotated frame(s) have no image in %s (%s); they are not propagated and not "
            "scored, so the scores are not comparable with the full sequence.",
            name,
            len(orphans),
            frame_dir,
            shown,
        )
        annotations = [path for path in annotations if path.stem in frame_names]
    return DavisSequence(name, frames, annotations)


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _read_frames(paths: Sequence[Path], size: tuple[int, ...], first_annotation: Path):
    """The frames of a sequence as RGB arrays, each checked against the first annotation's size."""
    for path in paths:
        frame = _read_rgb(path)
        if frame.shape[:2] != tuple(size):
            raise DavisDataError(
                f"{path} is {frame.shape[1]}x{frame.shape[0]} px but the annotation {first_annotation} is "
                f"{size[1]}x{size[0]}: the frames and masks of a sequence must have one size (same --resolution)."
            )
        yield frame


def predict_davis(
    root: str | Path,
    extractor: PatchFeatureExtractor,
    output_dir: str | Path,
    config: PropagationConfig | None = None,
    *,
    split: str = DavisConfig.split,
    year: str = DavisConfig.year,
    resolution: str = DavisConfig.resolution,
    sequences: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    show_progress: bool = False,
) -> list[str]:
    """Propagate every sequence's first-frame mask and write OUTPUT/<sequence>/<frame>.png. `progress` is called
    with each finished sequence's name; `show_progress` shows a bar of the frames on a terminal."""
    config = config or PropagationConfig()
    names = list(sequences) if sequences else list_sequences(root, split, year)
    output_dir = Path(output_dir)
    loaded = [
        load_sequence(root, name, resolution) for name in names
    ]  # every sequence checked before any work
    bar = progress_bar(
        sum(len(sequence.frames) for sequence in loaded), "propagating", show_progress, "frame"
    )
    for sequence in loaded:
        first_mask = read_indexed_mask(sequence.annotations[0])
        frames = _read_frames(sequence.frames, first_mask.shape, sequence.annotations[0])
        for path, mask in zip(
            sequence.frames, iter_propagation(frames, first_mask, extractor, config), strict=True
        ):
            write_indexed_mask(output_dir / sequence.name / f"{path.stem}.png", mask)
            bar.update()
        if progress is not None:
            progress(sequence.name)
    bar.close()
    return names


@dataclass
class DavisResult:
    """J&F over a set of sequences (DAVIS semi-supervised protocol). The fields are fractions, as the DAVIS
    toolkit computes them; `to_dict` and `to_markdown`, what the command line writes and prints, are in percent."""

    j_mean: float
    j_recall: float
    j_decay: float
    f_mean: float
    f_recall: float
    f_decay: float
    per_object: dict[str, dict[str, float]] = field(default_factory=dict)  # "<sequence>_<id>" -> {"J", "F"}

    @property
    def jf_mean(self) -> float:
        return (self.j_mean + self.f_mean) / 2

    def to_dict(self) -> dict:
        """Every score in percent (as papers report J&F), per object too."""
        values = asdict(self)
        per_object = values.pop("per_object")
        return {
            "J&F-Mean": 100 * self.jf_mean,
            **{name: 100 * value for name, value in values.items()},
            "per_object": {name: {k: 100 * v for k, v in s.items()} for name, s in per_object.items()},
        }

    def to_markdown(self) -> str:
        """The summary and the per-object table, in percent."""
        lines = [
            "| J&F-Mean | J-Mean | J-Recall | J-Decay | F-Mean | F-Recall | F-Decay |",
            "|---|---|---|---|---|---|---|",
            "| "
            + " | ".join(
                f"{100 * value:.1f}"
                for value in (
                    self.jf_mean,
                    self.j_mean,
                    self.j_recall,
                    self.j_decay,
                    self.f_mean,
                    self.f_recall,
                    self.f_decay,
                )
            )
            + " |",
            "",
            "| Object | J-Mean | F-Mean |",
            "|---|---|---|",
        ]
        lines += [
            f"| {name} | {100 * s['J']:.1f} | {100 * s['F']:.1f} |" for name, s in self.per_object.items()
        ]
        return "\n".join(lines)


def evaluate_davis(
    root: str | Path,
    results_dir: str | Path,
    *,
    split: str = DavisConfig.split,
    year: str = DavisConfig.year,
    resolution: str = DavisConfig.resolution,
    sequences: Sequence[str] | None = None,
    bound_th: float = DavisConfig.bound_th,
) -> DavisResult:
    """Score the masks in RESULTS/<sequence>/<frame>.png against the DAVIS annotations."""
    names = list(sequences) if sequences else list_sequences(root, split, year)
    results_dir = Path(results_dir)
    j_stats, f_stats, per_object = [], [], {}
    for name in names:
        sequence = load_sequence(root, name, resolution)
        masks = [read_indexed_mask(path) for path in sequence.annotations]
        for path, mask in zip(sequence.annotations, masks, strict=True):
            if mask.shape != masks[0].shape:
                raise DavisDataError(
                    f"{path} is {mask.shape[1]}x{mask.shape[0]} px but {sequence.annotations[0]} is "
                    f"{masks[0].shape[1]}x{masks[0].shape[0]}: the annotations of a sequence must have one size."
                )
        references = np.stack(masks)
        num_objects = int(np.where(references[0] == 255, 0, references[0]).max())
        # Semi-supervised mode: the first frame is given and the last one is not scored either.
        scored = sequence.annotations[1:-1]
        predictions = []
        for path in scored:
            result = results_dir / name / path.name
            if not result.is_file():
                raise FileNotFoundError(
                    f"Missing prediction {result}; run the propagation for {name!r} first."
                )
            prediction = read_indexed_mask(result)
            if prediction.shape != references.shape[1:]:
                raise DavisDataError(
                    f"The prediction {result} is {prediction.shape[1]}x{prediction.shape[0]} px but its annotation "
                    f"{path} is {references.shape[2]}x{references.shape[1]}: predict at the annotations' resolution "
                    f"(--resolution {resolution})."
                )
            predictions.append(prediction)
        if not scored:
            logger.warning("Sequence %s has fewer than three annotated frames; nothing to score.", name)
            continue
        j, f = sequence_scores(references[1:-1], np.stack(predictions), num_objects, bound_th)
        for k in range(num_objects):
            j_stats.append(db_statistics(j[k]))
            f_stats.append(db_statistics(f[k]))
            per_object[f"{name}_{k + 1}"] = {"J": j_stats[-1][0], "F": f_stats[-1][0]}
    if not j_stats:
        raise DavisDataError("No object could be scored: check the sequences and their annotations.")
    j_mean, j_recall, j_decay = np.mean(j_stats, axis=0)
    f_mean, f_recall, f_decay = np.mean(f_stats, axis=0)
    return DavisResult(
        float(j_mean),
        float(j_recall),
        float(j_decay),
        float(f_mean),
        float(f_recall),
        float(f_decay),
        per_object,
    )


def run_davis(
    root: str | Path,
    extractor: PatchFeatureExtractor,
    output_dir: str | Path,
    config: PropagationConfig | None = None,
    **kwargs,
) -> DavisResult:
    """Propagate and score in one call; also writes OUTPUT/scores.json."""
    score_kwargs = {k: kwargs[k] for k in ("split", "year", "resolution", "sequences") if k in kwargs}
    names = predict_davis(root, extractor, output_dir, config, **kwargs)
    result = evaluate_davis(root, output_dir, **{**score_kwargs, "sequences": names})
    (Path(output_dir) / "scores.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result
