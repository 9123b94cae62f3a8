"""Offline dense-evaluation data built from real photographs bundled with scikit-image.

No public package carries video with object masks (or a small segmentation set) that installs without a
download, so the offline study evaluates on SYNTHETIC COMPOSITIONS OF REAL PHOTOGRAPHS:

- objects are real photographs cut out with a known mask: coins segmented from `skimage.data.coins` by
  thresholding, the scikit-image logo disc (a graphic), the retina fundus disc (thresholded), the
  `horse` silhouette filled with the lunar surface of `moon`, and elliptical cut-outs of the cat's face
  (`chelsea`), the coffee cup on its saucer (`coffee`) and the astronaut's face (`astronaut`);
- backgrounds are real photographs and textures: brick, grass, gravel, the Hubble deep field,
  immunohistochemistry tissue, the rocket launch pad, a motorcycle in a garage.

`make_sequences` animates 1-3 objects (translation, scaling, rotation, occlusion between objects, a panning
and zooming camera, lighting drift, JPEG compression) and writes the DAVIS 2017 folder layout, so the DAVIS
code path evaluates it. `make_segmentation_dataset` writes a semantic segmentation set (image, mask, label)
as parquet: two background "stuff" textures split by a wavy boundary and one "thing" object; blended edge
pixels are labelled 255 (ignore). Its validation images use disjoint regions of the stuff textures and
disjoint coins; the other objects reappear under new poses, sizes and photometric changes.

These scenes are much easier than DAVIS or ADE20K and say nothing absolute about those benchmarks; they
serve to compare backbones under identical conditions offline.

Licences: `SOURCES` gives each image's licence as scikit-image documents it. For `moon` and `stereo_motorcycle`
scikit-image states none, so the scenes are built on the user's machine from the installed wheel and are not meant
to be redistributed (the offline pretraining sample of `sample_photographs` leaves both out for that reason).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

DATA_NOTE = (
    "Synthetic compositions of real photographs: real object cut-outs with known masks moved over real "
    "background photographs and textures (all from scikit-image's bundled data). Not DAVIS, not ADE20K."
)

STUFF_CLASSES = ("brick", "grass", "gravel", "space", "tissue")
THING_CLASSES = ("coin", "logo", "retina", "horse", "cat", "cup", "face")
SEGMENTATION_CLASSES = STUFF_CLASSES + THING_CLASSES
IGNORE_INDEX = 255

SOURCES = {
    "astronaut": "skimage.data.astronaut: Eileen Collins, NASA, public domain",
    "brick": "skimage.data.brick: CC0",
    "chelsea": "skimage.data.chelsea: Chelsea the cat, CC0",
    "coffee": "skimage.data.coffee: Rachel Michetti, CC0",
    "coins": "skimage.data.coins: Greek coins from Pompeii, Brooklyn Museum, no known copyright",
    "grass": "skimage.data.grass: CC0",
    "gravel": "skimage.data.gravel: CC0",
    "horse": "skimage.data.horse: silhouette, CC0",
    "hubble_deep_field": "skimage.data.hubble_deep_field: NASA/ESA, public domain",
    "immunohistochemistry": "skimage.data.immunohistochemistry: CMMI, no known copyright restrictions",
    "logo": "skimage.data.logo: the scikit-image logo; scikit-image states no separate licence for it",
    "moon": "skimage.data.moon: surface of the moon; scikit-image states no licence for it",
    "retina": "skimage.data.retina: Mikael Häggström, Wikimedia Commons, CC0",
    "rocket": "skimage.data.rocket: SpaceX, public domain",
    "stereo_motorcycle": (
        "skimage.data.stereo_motorcycle: Middlebury 2014 stereo benchmark; scikit-image states no licence for it"
    ),
}

_CUTOUT_MAX_SIDE = 256


@dataclass
class Cutout:
    """A real photograph of an object with its mask (alpha > 0.5 is the object)."""

    category: str
    rgb: np.ndarray  # (h, w, 3) uint8
    alpha: np.ndarray  # (h, w) float32 in [0, 1]


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    return image


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _fit(rgb: np.ndarray, alpha: np.ndarray, category: str) -> Cutout:
    # Crop to the mask's bounding box and shrink so that the longer side is at most _CUTOUT_MAX_SIDE.
    rows, cols = np.nonzero(alpha > 0.5)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    rgb, alpha = rgb[top:bottom, left:right], alpha[top:bottom, left:right]
    scale = min(1.0, _CUTOUT_MAX_SIDE / max(rgb.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
        alpha = np.asarray(Image.fromarray(alpha.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    return Cutout(category, np.ascontiguousarray(rgb), np.clip(alpha, 0, 1).astype(np.float32))


def _ellipse_alpha(
    shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float]
) -> np.ndarray:
    # Anti-aliased ellipse: a one-pixel linear ramp across the border.
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    distance = np.sqrt(((xx - center[0]) / radii[0]) ** 2 + ((yy - center[1]) / radii[1]) ** 2)
    return np.clip((1.0 - distance) * min(radii) + 0.5, 0.0, 1.0)


def _coin_cutouts() -> list[Cutout]:
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    coins = _skimage("coins")
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(coins > threshold_otsu(coins), iterations=2))
    cutouts = []
    for region in sorted(regionprops(label(mask)), key=lambda r: (r.bbox[0] // 50, r.bbox[1])):
        # Single, whole coins only: round, solid, not cut by the image border.
        top, left, bottom, right = region.bbox
        if region.area < 300 or region.eccentricity > 0.6 or region.solidity < 0.9 or top == 0 or left == 0:
            continue
        # Coins are convex: the convex hull fills the dark parts of the relief that the threshold misses;
        # a slight blur anti-aliases the pixel staircase before the cut-out gets enlarged.
        alpha = np.zeros(coins.shape, np.float32)
        alpha[top:bottom, left:right] = region.image_convex
        alpha = ndimage.gaussian_filter(alpha, sigma=0.7)
        pad = 3
        window = (slice(max(0, top - pad), bottom + pad), slice(max(0, left - pad), right + pad))
        cutouts.append(_fit(_rgb(coins)[window], alpha[window], "coin"))
    return cutouts


@cache
def object_cutouts() -> dict[str, tuple[Cutout, ...]]:
    """Real object cut-outs by category (see the module docstring for their origin)."""
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    logo = _rgb(_skimage("logo"))
    # The logo's alpha channel is opaque everywhere: its mask is the disc that holds the non-white pixels.
    logo_mask = convex_hull_image((logo < 230).any(axis=-1))
    retina = _skimage("retina")
    retina_mask = ndimage.binary_fill_holes(retina.astype(np.int32).sum(-1) > 60)
    retina_mask = ndimage.binary_erosion(retina_mask, iterations=4)  # drop the dark rim
    horse_mask = ~_skimage("horse")  # the silhouette is False on True
    moon = _rgb(_skimage("moon"))
    moon = np.asarray(Image.fromarray(moon).resize(horse_mask.shape[::-1], Image.Resampling.BICUBIC))
    chelsea, coffee, astronaut = _skimage("chelsea"), _skimage("coffee"), _skimage("astronaut")
    return {
        "coin": tuple(_coin_cutouts()),
        "logo": (_fit(logo, logo_mask.astype(np.float32), "logo"),),
        "retina": (_fit(_rgb(retina), retina_mask.astype(np.float32), "retina"),),
        "horse": (_fit(moon, horse_mask.astype(np.float32), "horse"),),
        "cat": (_fit(_rgb(chelsea), _ellipse_alpha(chelsea.shape[:2], (240, 165), (150, 120)), "cat"),),
        "cup": (_fit(_rgb(coffee), _ellipse_alpha(coffee.shape[:2], (277, 230), (200, 155)), "cup"),),
        "face": (_fit(_rgb(astronaut), _ellipse_alpha(astronaut.shape[:2], (228, 100), (68, 88)), "face"),),
    }


@cache
def background_images() -> dict[str, np.ndarray]:
    """Real photographs and textures used as backgrounds (stuff classes first)."""
    return {
        "brick": _rgb(_skimage("brick")),
        "grass": _rgb(_skimage("grass")),
        "gravel": _rgb(_skimage("gravel")),
        "space": _rgb(_skimage("hubble_deep_field")),
        "tissue": _rgb(_skimage("immunohistochemistry")),
        "rocket": _rgb(_skimage("rocket")),
        "motorcycle": _rgb(_skimage("stereo_motorcycle")),
    }


def render_cutout(
    cutout: Cutout,
    canvas_size: tuple[int, int],
    center: tuple[float, float],
    size: float,
    angle: float = 0.0,
    flip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp a cut-out onto an (H, W) canvas; returns RGB (H, W, 3) float32 and alpha (H, W) float32.

    center: (x, y) in canvas pixels; size: length of the cut-out's longer side in canvas pixels;
    angle: counter-clockwise rotation in degrees.
    """
    height, width = canvas_size
    rgb, alpha = cutout.rgb, cutout.alpha
    if flip:
        rgb, alpha = rgb[:, ::-1], alpha[:, ::-1]
    in_h, in_w = alpha.shape
    scale = size / max(in_h, in_w)
    theta = math.radians(angle)
    cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
    cx, cy = center
    # PIL's affine maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    a, b, d, e = cos, -sin, sin, cos
    coefficients = (a, b, in_w / 2 - (a * cx + b * cy), d, e, in_h / 2 - (d * cx + e * cy))
    warped_rgb = Image.fromarray(np.ascontiguousarray(rgb)).transform(
        (width, height), Image.Transform.AFFINE, coefficients, Image.Resampling.BICUBIC
    )
    warped_alpha = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.float32)).transform(
        (width, height), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR
    )
    return np.asarray(warped_rgb, dtype=np.float32), np.clip(np.asarray(warped_alpha, dtype=np.float32), 0, 1)


def _crop_resize(
    image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]
) -> np.ndarray:
    """Crop (left, top, right, bottom) in float pixels and resize to (H, W), bilinear."""
    height, width = size
    pil = Image.fromarray(image)
    return np.asarray(
        pil.transform((width, height), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR),
        dtype=np.float32,
    )


# --------------------------------------------------------------------------------------------------------
# Video sequences in the DAVIS layout
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Track:
    cutout: Cutout
    position: np.ndarray  # (x, y)
    velocity: np.ndarray  # pixels per frame
    size: float
    growth: float  # relative size change per frame
    angle: float
    spin: float  # degrees per frame
    flip: bool
    wobble: tuple[float, float, float]  # amplitude (px), frequency (rad / frame), phase


def _sequence_tracks(rng: np.random.Generator, frame_size: tuple[int, int], num_objects: int) -> list[_Track]:
    height, width = frame_size
    short = min(height, width)
    cutouts = object_cutouts()
    categories = rng.choice(list(cutouts), size=num_objects, replace=False)
    tracks: list[_Track] = []
    for category in categories:
        options = cutouts[category]
        cutout = options[int(rng.integers(len(options)))]
        size = float(rng.uniform(0.3, 0.5) * short)
        # First-frame positions well apart so that every object is visible in the given mask.
        for _ in range(100):
            position = np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.3, 0.7) * height])
            if all(np.linalg.norm(position - t.position) > 0.5 * (size + t.size) for t in tracks):
                break
        speed = rng.uniform(0.006, 0.016) * short
        direction = rng.uniform(0, 2 * math.pi)
        tracks.append(
            _Track(
                cutout=cutout,
                position=position,
                velocity=speed * np.array([math.cos(direction), math.sin(direction)]),
                size=size,
                growth=float(rng.uniform(-0.008, 0.012)),
                angle=float(rng.uniform(-20, 20)),
                spin=float(rng.uniform(-1.5, 1.5)),
                flip=bool(rng.integers(2)),
                wobble=(
                    float(rng.uniform(0, 0.02) * short),
                    float(rng.uniform(0.2, 0.5)),
                    float(rng.uniform(0, 6.3)),
                ),
            )
        )
    return tracks


def _render_sequence(
    rng: np.random.Generator,
    background: np.ndarray,
    frame_size: tuple[int, int],
    num_frames: int,
    num_objects: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    height, width = frame_size
    tracks = _sequence_tracks(rng, frame_size, num_objects)
    # Camera: a window of 55-75% of the background pans along a straight line and zooms in or out slightly.
    bg_h, bg_w = background.shape[:2]
    view = rng.uniform(0.55, 0.75) * min(bg_w / width, bg_h / height)
    zoom = rng.uniform(-0.1, 0.1)
    starts, ends = [], []
    for extent, limit in ((width * view, bg_w), (height * view, bg_h)):
        slack = max(0.0, limit - extent * (1 + abs(zoom)))
        starts.append(rng.uniform(0, slack))
        ends.append(rng.uniform(0, slack))
    light_phase, light_amplitude = rng.uniform(0, 6.3), rng.uniform(0.03, 0.1)

    frames, masks = [], []
    for t in range(num_frames):
        progress = t / max(1, num_frames - 1)
        scale = view * (1 + zoom * progress)
        left = starts[0] + (ends[0] - starts[0]) * progress
        top = starts[1] + (ends[1] - starts[1]) * progress
        frame = _crop_resize(background, (left, top, left + width * scale, top + height * scale), frame_size)
        mask = np.zeros(frame_size, np.uint8)
        for object_id, track in enumerate(tracks, start=1):
            amplitude, frequency, phase = track.wobble
            wobble = amplitude * np.array([math.sin(frequency * t + phase), math.cos(frequency * t + phase)])
            rgb, alpha = render_cutout(
                track.cutout, frame_size, tuple(track.position + wobble), track.size, track.angle, track.flip
            )
            frame = frame * (1 - alpha[..., None]) + rgb * alpha[..., None]
            mask[alpha >= 0.5] = object_id  # later objects occlude earlier ones
            # Advance: bounce off the borders so that objects stay mostly inside the frame.
            track.position = track.position + track.velocity
            for axis, extent in ((0, width), (1, height)):
                margin = 0.2 * extent
                if not margin <= track.position[axis] <= extent - margin:
                    track.velocity[axis] *= -1
                    track.position[axis] = np.clip(track.position[axis], margin, extent - margin)
            track.size = float(
                np.clip(track.size * (1 + track.growth), 0.2 * min(frame_size), 0.65 * min(frame_size))
            )
            track.angle += track.spin
        frame = frame * (1 + light_amplitude * math.sin(0.3 * t + light_phase))
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        masks.append(mask)
    return frames, masks


def make_sequences(
    output_dir: str | Path,
    num_sequences: int = 8,
    num_frames: int = 20,
    frame_size: tuple[int, int] = (240, 320),
    max_objects: int = 3,
    seed: int = 0,
    jpeg_quality: int = 90,
) -> list[str]:
    """Write `num_sequences` synthetic sequences in the DAVIS 2017 layout under `output_dir`; returns their names.

    Every frame has a ground-truth mask (0 background, 1..K objects, K <= max_objects); all objects are
    visible in the first frame. frame_size is (height, width).
    """
    from selfpatch_hf.evaluation.davis import write_indexed_mask

    if num_frames < 3:
        raise ValueError("num_frames must be at least 3 (the DAVIS protocol scores frames 1 .. T-2).")
    if not 1 <= max_objects <= len(THING_CLASSES):
        raise ValueError(f"max_objects must be between 1 and {len(THING_CLASSES)}.")
    output_dir = Path(output_dir)
    rng = np.random.default_rng(seed)
    backgrounds = background_images()
    names = []
    for index in range(num_sequences):
        background_name = list(backgrounds)[index % len(backgrounds)]
        num_objects = 1 + index % max_objects
        frames, masks = _render_sequence(
            rng, backgrounds[background_name], frame_size, num_frames, num_objects
        )
        name = f"{background_name}-{index:02d}"
        for t, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
            frame_path = output_dir / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"
            frame_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(frame).save(frame_path, quality=jpeg_quality)
            write_indexed_mask(output_dir / "Annotations" / "480p" / name / f"{t:05d}.png", mask)
        names.append(name)
    image_sets = output_dir / "ImageSets" / "2017"
    image_sets.mkdir(parents=True, exist_ok=True)
    (image_sets / "val.txt").write_text("\n".join(names) + "\n")
    return names


# --------------------------------------------------------------------------------------------------------
# Semantic segmentation set
# --------------------------------------------------------------------------------------------------------


def _stuff_region(source: np.ndarray, split: str) -> np.ndarray:
    # Training images take textures from the top 60% of each source, validation from the bottom 40%.
    cut = int(0.6 * source.shape[0])
    return source[:cut] if split == "train" else source[cut:]


def _texture_crop(rng: np.random.Generator, source: np.ndarray, size: int) -> np.ndarray:
    height, width = source.shape[:2]
    extent = rng.uniform(0.5, 1.0) * min(height, width)
    left, top = rng.uniform(0, width - extent), rng.uniform(0, height - extent)
    crop = _crop_resize(source, (left, top, left + extent, top + extent), (size, size))
    return crop[:, ::-1] if rng.integers(2) else crop


def _segmentation_example(
    rng: np.random.Generator, size: int, split: str
) -> tuple[np.ndarray, np.ndarray, int]:
    backgrounds = background_images()
    first, second = rng.choice(len(STUFF_CLASSES), size=2, replace=False)
    textures = [
        _texture_crop(rng, _stuff_region(backgrounds[STUFF_CLASSES[c]], split), size) for c in (first, second)
    ]
    # A wavy boundary splits the two stuff regions.
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size - 0.5
    phi = rng.uniform(0, 2 * math.pi)
    along, across = xx * math.cos(phi) + yy * math.sin(phi), -xx * math.sin(phi) + yy * math.cos(phi)
    wave = rng.uniform(0.02, 0.08) * np.sin(rng.uniform(4, 12) * across + rng.uniform(0, 6.3))
    region = along + wave < rng.uniform(-0.2, 0.2)
    image = np.where(region[..., None], textures[0], textures[1])
    label = np.where(region, first, second).astype(np.uint8)

    thing = int(rng.integers(len(THING_CLASSES)))
    options = object_cutouts()[THING_CLASSES[thing]]
    if THING_CLASSES[thing] == "coin":  # disjoint coins for training and validation
        options = options[0::2] if split == "train" else options[1::2]
    cutout = options[int(rng.integers(len(options)))]
    center = tuple(rng.uniform(0.35, 0.65, size=2) * size)
    rgb, alpha = render_cutout(
        cutout,
        (size, size),
        center,
        rng.uniform(0.35, 0.65) * size,
        rng.uniform(-30, 30),
        bool(rng.integers(2)),
    )
    rgb = (rgb - 128) * rng.uniform(0.85, 1.15) + 128 + rng.uniform(-15, 15)  # contrast / brightness jitter
    image = image * (1 - alpha[..., None]) + rgb * alpha[..., None]
    label[alpha >= 0.5] = len(STUFF_CLASSES) + thing
    label[(alpha > 0.1) & (alpha < 0.9)] = IGNORE_INDEX  # blended edge pixels belong to neither class
    return np.clip(image, 0, 255).astype(np.uint8), label, thing


def segmentation_features():
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "label": datasets.ClassLabel(names=list(THING_CLASSES)),
        }
    )


def _png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def make_segmentation_dataset(
    output_dir: str | Path,
    num_train: int = 240,
    num_eval: int = 80,
    image_size: int = 224,
    seed: int = 0,
):
    """Write `output_dir/data/{train,validation}-00000-of-00001.parquet` and return the `DatasetDict`.

    Columns: `image` (RGB), `mask` (class ids 0..11 of `SEGMENTATION_CLASSES`, 255 = ignore) and `label`
    (the image's thing class, for k-NN). Load it back with `datasets.load_dataset(output_dir)`.
    """
    import datasets

    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", num_train), ("validation", num_eval)):
        rows = {"image": [], "mask": [], "label": []}
        for _ in range(count):
            image, mask, thing = _segmentation_example(
                rng, image_size, "train" if split == "train" else "eval"
            )
            rows["image"].append(_png(image))
            rows["mask"].append(_png(mask))
            rows["label"].append(thing)
        dataset = datasets.Dataset.from_dict(rows, features=segmentation_features())
        path = Path(output_dir) / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(path))
        splits[split] = dataset
    return datasets.DatasetDict(splits)


def _write_readme(output_dir: Path, info: dict) -> None:
    lines = [
        "# Offline dense-evaluation data (synthetic)",
        "",
        DATA_NOTE,
        "",
        "Built by `python -m selfpatch_hf.evaluation make-offline-data` "
        f"with: `{json.dumps(info['arguments'])}`.",
        "",
        "- `davis/`: video sequences in the DAVIS 2017 layout (JPEGImages/480p, Annotations/480p, "
        "ImageSets/2017/val.txt; the folder name 480p is kept for the layout, the frames are "
        f"{info['arguments']['frame_size'][0]}x{info['arguments']['frame_size'][1]}).",
        "- `segmentation/`: parquet semantic segmentation set with columns image, mask (255 = ignore), label.",
        f"  Classes: {', '.join(f'{i}={n}' for i, n in enumerate(SEGMENTATION_CLASSES))}.",
        "",
        "Sources:",
        *[f"- {text}" for text in SOURCES.values()],
        "",
    ]
    (output_dir / "README.md").write_text("\n".join(lines))


def default_offline_data_dir() -> Path:
    """Where the standard offline data live: `offline-eval/` in the package's cache folder (`$SELFPATCH_HF_CACHE`,
    else `$XDG_CACHE_HOME/selfpatch_hf`, else `~/.cache/selfpatch_hf`). `selfpatch eval make-offline-data` writes
    there by default, and fine-tuning's `offline-scenes` reads (or builds) its `segmentation/` there."""
    from selfpatch_hf.data.samples.photographs import default_cache_dir

    return default_cache_dir() / "offline-eval"


def make_offline_data(
    output_dir: str | Path,
    *,
    num_sequences: int = 8,
    num_frames: int = 20,
    frame_size: Sequence[int] = (240, 320),
    max_objects: int = 3,
    num_train: int = 240,
    num_eval: int = 80,
    image_size: int = 224,
    seed: int = 0,
) -> dict:
    """Build both data sets under `output_dir` (davis/ and segmentation/) with a README; returns a summary."""
    output_dir = Path(output_dir)
    arguments = {
        "num_sequences": num_sequences,
        "num_frames": num_frames,
        "frame_size": list(frame_size),
        "max_objects": max_objects,
        "num_train": num_train,
        "num_eval": num_eval,
        "image_size": image_size,
        "seed": seed,
    }
    names = make_sequences(
        output_dir / "davis",
        num_sequences,
        num_frames,
        (int(frame_size[0]), int(frame_size[1])),
        max_objects,
        seed,
    )
    make_segmentation_dataset(output_dir / "segmentation", num_train, num_eval, image_size, seed)
    info = {
        "note": DATA_NOTE,
        "arguments": arguments,
        "sequences": names,
        "segmentation_classes": list(SEGMENTATION_CLASSES),
        "thing_classes": list(THING_CLASSES),
        "ignore_index": IGNORE_INDEX,
        "sources": SOURCES,
    }
    (output_dir / "offline_data.json").write_text(json.dumps(info, indent=2))
    _write_readme(output_dir, info)
    return info
