"""Raw image values from a stream -> upright RGB images, or a counted reason to skip them.

`decode_image(value, min_size=16)` accepts what a `datasets.Image(decode=False)` column yields (`{"bytes", "path"}`),
raw bytes, a local path, or a PIL image, and returns an RGB `PIL.Image`. An entry that is only a path is read only if
the source's `ImagePaths` allows it (`read_image_bytes`), never from a URL.

- EXIF orientation is applied (`ImageOps.exif_transpose`), so rotated phone photos come out upright;
- grayscale, palette (with or without transparency), RGBA/LA (alpha dropped, like the reference `convert("RGB")`),
  CMYK and YCbCr go through PIL's conversions;
- 16-bit grayscale (`I;16*`) is scaled to 8 bits by 255/65535; 32-bit integer (`I`) images are read as 16-bit
  data when their maximum exceeds 255 and as 8-bit data otherwise; float (`F`) images as [0, 1] data when their
  maximum is at most 1, else clipped to [0, 255].

Anything else raises `ImageDecodeError` with a `reason` among `SKIP_REASONS` ("unreadable": corrupt, truncated or
not an image; "too_small": shorter side below `min_size`; "unsupported_mode": a pixel format with no RGB meaning),
which the data loader counts and logs instead of crashing.

JPEGs decoded on the training device (`--augmentation_device device_crops`)
----------------------------------------------------------------------------
`read_jpeg_header(data)` reads only the header of a JPEG (size, colour mode, EXIF orientation; tens of microseconds)
and tells whether a device decoder can take the file as it is: a baseline JPEG in RGB (YCbCr) or grayscale that ends
with its end-of-image marker. Anything else (PNG, WebP, CMYK, progressive or possibly truncated JPEGs) is decoded on
the host by `decode_image`, so every file behaves as on the CPU path. `device_jpeg_decoder(device)` returns
torchvision's batched nvJPEG decoder (`torchvision.io.decode_jpeg(..., device="cuda")`) when torchvision imports
and the device is CUDA, else `None` with one log line saying why (JPEGs are then decoded in the workers).
`exif_transpose_tensor(image, orientation)` turns a decoded `(3, H, W)` tensor upright as `ImageOps.exif_transpose`
does.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from selfpatch_hf.data.sources import ImagePaths

logger = logging.getLogger(__name__)

SKIP_REASONS = ("unreadable", "too_small", "unsupported_mode")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_image_bytes(
    value: Any, download_config: Any = None, image_paths: ImagePaths | None = None
) -> tuple[bytes | None, str | None]:
    """(bytes, path) of a column value; reads the file when only a path is given and `image_paths` allows it
    (`None`: local files only, for values a caller passes directly)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, (str, os.PathLike)):
        value = {"bytes": None, "path": os.fspath(value)}
    if not isinstance(value, dict):
        raise ImageDecodeError("unreadable", f"unexpected image value of type {type(value).__name__}")
    data, path = value.get("bytes"), value.get("path")
    if data is None:
        if not path or not isinstance(path, str):
            raise ImageDecodeError("unreadable", "image value has neither bytes nor a path")
        remote = "://" in path and not path.startswith("file://")
        allowed = image_paths.allows(path) if image_paths is not None else not remote
        if not allowed:
            where = image_paths.describe() if image_paths is not None else "local files only"
            raise ImageDecodeError(
                "unreadable",
                f"refused to follow the image path {path!r}: image entries without bytes are read only from the "
                f"source you named ({where}), never from URLs",
            )
        try:
            if not remote:
                with open(path[len("file://") :] if path.startswith("file://") else path, "rb") as file:
                    data = file.read()
            else:  # a file of the streamed Hub dataset (hf://..., zip://...::hf://...)
                from datasets.utils.file_utils import xopen

                with xopen(path, "rb", download_config=download_config) as file:
                    data = file.read()
        except Exception as error:  # missing file, network failure, ...: skip this image, keep training
            raise ImageDecodeError("unreadable", f"cannot read {path}: {error}") from error
    return data, path


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        pixels = np.asarray(image).astype(np.int64)
        if mode == "I":
            pixels = np.clip(pixels, 0, 65535)
        if mode != "I" or pixels.max(initial=0) > 255:
            pixels = (pixels * 255 + 32767) // 65535
        return Image.fromarray(pixels.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise ImageDecodeError("unsupported_mode", "float image with NaN or infinite values")
        if pixels.max(initial=0.0) <= 1.0:
            pixels = pixels * 255.0
        pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if mode in ("P", "PA"):
        # Palette transparency is only resolved through RGBA (PIL warns on a direct P -> RGB conversion).
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(
    value: Any, min_size: int = 16, download_config: Any = None, image_paths: ImagePaths | None = None
) -> Image.Image:
    """Decode one image value to an upright RGB PIL image, or raise `ImageDecodeError`.

    A value that is only a path is read if `image_paths` allows it (the data loader passes the source's
    `ImagePaths`); with the default `None` local files are read and URLs refused."""
    if isinstance(value, Image.Image):
        image = value.copy()  # the orientation fix below works in place; leave the caller's image alone
    else:
        data, path = read_image_bytes(value, download_config, image_paths)
        where = f" ({path})" if path else ""
        try:
            with warnings.catch_warnings():
                # Oversized images raise DecompressionBombError beyond 2x the limit; below it PIL only warns.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                image.load()  # decode now: truncated or corrupt data fails here, not later
        # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data.
        except Exception as error:
            raise ImageDecodeError("unreadable", f"cannot decode image{where}: {error}") from error
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        pass
    try:
        image = _to_rgb(image)
    except ImageDecodeError:
        raise
    except Exception as error:  # whatever else a conversion raises, one image must not stop training
        raise ImageDecodeError(
            "unsupported_mode", f"cannot convert mode {image.mode} to RGB: {error}"
        ) from error
    if min(image.size) < min_size:
        raise ImageDecodeError(
            "too_small", f"image of {image.width}x{image.height} px is smaller than min_size={min_size}"
        )
    return image


# ------------------------------------------------------------------------------------- JPEGs for the device


@dataclass(frozen=True)
class JpegHeader:
    """What the header of a JPEG says: its stored size and its EXIF orientation (1-8, as `ImageOps.exif_transpose`
    reads it; 1 = upright)."""

    height: int
    width: int
    orientation: int = 1

    @property
    def upright_size(self) -> tuple[int, int]:
        """`(height, width)` after the orientation is applied (orientations 5-8 swap the axes)."""
        return (self.width, self.height) if self.orientation >= 5 else (self.height, self.width)


_DEVICE_JPEG_MODES = ("RGB", "L")  # what nvJPEG turns into RGB as PIL's convert("RGB") does
_END_OF_IMAGE = b"\xff\xd9"


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of a JPEG that a device decoder can take as it is, else `None` (decode it on the host).

    Device decoders take baseline JPEGs in RGB (YCbCr) or grayscale. A file that does not end with the end-of-image
    marker may be truncated: PIL refuses those, and `decode_image` on the host reports them as on the CPU path.
    """
    if not data.startswith(b"\xff\xd8") or not data.endswith(_END_OF_IMAGE):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # parses the markers up to the frame header only
                progressive = image.info.get("progressive") or image.info.get("progression")
                if image.format != "JPEG" or image.mode not in _DEVICE_JPEG_MODES or progressive:
                    return None
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                width, height = image.size
    except Exception:  # an oversized or malformed header: the host decode gives the reason to skip it
        return None
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1  # exif_transpose leaves unknown values alone
    return JpegHeader(height=height, width=width, orientation=orientation)


def exif_transpose_tensor(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """`ImageOps.exif_transpose` for a `(C, H, W)` tensor: the upright image of one stored with EXIF
    `orientation`."""
    if orientation == 1:
        return image
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return image.flip(-1)
    if orientation == 3:  # ROTATE_180
        return image.flip(-2, -1)
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return image.flip(-2)
    transposed = image.transpose(-2, -1)  # TRANSPOSE (5), then the rotations' extra flips
    return {5: transposed, 6: transposed.flip(-1), 7: transposed.flip(-2, -1), 8: transposed.flip(-2)}[
        orientation
    ]


JpegDecoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""Decodes encoded JPEGs (1-D uint8 host tensors) to `(3, H, W)` uint8 RGB tensors on the training device, as stored
(no EXIF orientation), raising if any of them fails."""


class NvJpegDecoder:
    """Batched JPEG decoding with nvJPEG on a CUDA device: torchvision's `decode_jpeg`, given a list."""

    def __init__(self, device: torch.device, decode_jpeg: Callable, rgb_mode: Any):
        self.device = device
        self._decode_jpeg = decode_jpeg
        self._rgb_mode = rgb_mode

    def __call__(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._decode_jpeg(encoded, mode=self._rgb_mode, device=self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"


def device_jpeg_decoder(device: str | torch.device | None) -> NvJpegDecoder | None:
    """torchvision's nvJPEG decoder for `device`, or `None` (with one log line) where JPEGs must be decoded on the
    host: a device other than CUDA, or no importable torchvision."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        logger.info(
            "JPEGs are decoded in the data workers: nvJPEG decoding needs a CUDA device, the training device is %s.",
            device,
        )
        return None
    try:
        # lazily: torchvision is optional, and PyPI's CUDA wheels of it fail to import beside a CPU-only torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as error:
        logger.warning(
            "JPEGs are decoded in the data workers: torchvision's nvJPEG decoder is unavailable (%s: %s). Install the "
            "torchvision build that matches your torch to decode them on the GPU.",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )
        return None
    return NvJpegDecoder(device, decode_jpeg, ImageReadMode.RGB)


__all__ = [
    "SKIP_REASONS",
    "ImageDecodeError",
    "JpegDecoder",
    "JpegHeader",
    "NvJpegDecoder",
    "decode_image",
    "device_jpeg_decoder",
    "exif_transpose_tensor",
    "read_image_bytes",
    "read_jpeg_header",
]
