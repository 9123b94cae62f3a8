"""Real photographs cut out with known masks, and real backgrounds: the material of the offline scenes.

No public package carries video with object masks (or a small segmentation or instance set) that installs without a
download, so the offline data (`selfpatch_hf.data.samples.synthetic_scenes`, `...instance_scenes`) are SYNTHETIC
COMPOSITIONS OF REAL PHOTOGRAPHS:

- objects are real photographs cut out with a known mask: coins segmented from `skimage.data.coins` by
  thresholding, the scikit-image logo disc (a graphic), the retina fundus disc (thresholded), the
  `horse` silhouette filled with the lunar surface of `moon`, and elliptical cut-outs of the cat's face
  (`chelsea`), the coffee cup on its saucer (`coffee`) and the astronaut's face (`astronaut`);
- backgrounds are real photographs and textures: brick, grass, gravel, the Hubble deep field,
  immunohistochemistry tissue, the rocket launch pad, a motorcycle in a garage.

Licences: `SOURCES` gives each image's licence as scikit-image documents it. For `moon` and `stereo_motorcycle`
scikit-image states none, so the scenes are built on the user's machine from the installed wheel and are not meant
to be redistributed (the offline pretraining sample of `sample_photographs` leaves both out for that reason).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import cache

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


def crop_resize(
    image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]
) -> np.ndarray:
    """Crop (left, top, right, bottom) in float pixels and resize to (H, W), bilinear."""
    height, width = size
    pil = Image.fromarray(image)
    return np.asarray(
        pil.transform((width, height), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR),
        dtype=np.float32,
    )


def stuff_region(source: np.ndarray, split: str) -> np.ndarray:
    # Training images take textures from the top 60% of each source, validation from the bottom 40%.
    cut = int(0.6 * source.shape[0])
    return source[:cut] if split == "train" else source[cut:]


def png_bytes(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


__all__ = [
    "DATA_NOTE",
    "IGNORE_INDEX",
    "SEGMENTATION_CLASSES",
    "SOURCES",
    "STUFF_CLASSES",
    "THING_CLASSES",
    "Cutout",
    "background_images",
    "crop_resize",
    "object_cutouts",
    "png_bytes",
    "render_cutout",
    "stuff_region",
]
