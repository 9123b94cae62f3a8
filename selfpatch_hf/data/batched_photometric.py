"""The multi-crop recipe's photometric ops, batched on the training device (`--augmentation_device device`).

Feeding a GPU with the CPU pipeline (`selfpatch_hf.data.augmentation`) costs about 10 cores per GPU for ViT-S/16
(see docs/gpu.md): most of a worker's time per image goes to the colour jitter, grayscale, blur and solarisation of
its ten crops. With this module the work splits in two:

- in the data workers (`crops_with_parameters`): decode, draw the crop boxes, resample the crops (uint8, as the CPU
  path does), flip them, and draw every photometric decision and factor of every crop from the image's own
  generator (`numpy.random.default_rng([seed, epoch, rank, worker, index])`, the same per-image generator as the
  CPU path). The parameters travel with the batch as a small float32 array, so a batch depends only on the data,
  the seed and the position in the stream: reproducible and resumable exactly as the CPU path.
- on the training device (`apply_photometric`): colour jitter in each crop's own random order, grayscale,
  Gaussian blur with PIL's kernel, solarisation and normalisation, as torch ops over the whole batch of one
  resolution (any device; CPU tensors in the tests).

Distributions (docs/method.md section 9, identical to the CPU path): colour jitter with probability 0.8, brightness
and contrast factors uniform in [0.6, 1.4], saturation in [0.8, 1.2], hue shift uniform in [-0.1, 0.1] turns, the
four in a uniformly random order; grayscale with probability 0.2 (ITU-R 601 luma); Gaussian blur with PIL's
`radius` uniform in [0.1, 2.0], with probability 1.0 on global crop 1, 0.1 on global crop 2 and 0.5 on local crops;
solarisation (values >= 128 inverted) with probability 0.2 on global crop 2 only; horizontal flip 0.5.

Numerics: pixels stay float in [0, 1] between ops (clamped after each op, as 8-bit images saturate) instead of
being rounded to 8 bits after each op as the CPU path does. Against the CPU path's ops on identical parameters
(tests/test_batched_photometric.py): brightness, contrast, saturation, grayscale and blur agree within 1 grey level
(blur: inside the image; both reflect the border the same way), solarisation exactly; the hue shift is exact here
while OpenCV's 8-bit HSV stores hue in 180 steps, so the CPU path differs by below 1 grey level on average and up to
about 10 on strongly saturated pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from selfpatch_hf.data.augmentation import (
    BLUR_PROBABILITY,
    BLUR_SIGMA_RANGE,
    COLOR_JITTER,
    COLOR_JITTER_PROBABILITY,
    FLIP_PROBABILITY,
    GRAYSCALE_PROBABILITY,
    SOLARIZE_PROBABILITY_GLOBAL_2,
    SOLARIZE_THRESHOLD,
    MultiCropAugmentation,
    RngLike,
    as_generator,
    to_rgb_array,
)
from selfpatch_hf.models.selfpatch.recipes import NUM_GLOBAL_CROPS

# Layout of one crop's parameter row (float32). The jitter order holds the op indices (0 brightness, 1 contrast,
# 2 saturation, 3 hue) in the order they run.
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)
GRAYSCALE, BLUR, SIGMA, SOLARIZE = 9, 10, 11, 12
NUM_PARAMETERS = 13

# 8-bit solarisation inverts the values >= 128; on float pixels the boundary is where rounding would reach 128.
_SOLARIZE_BOUNDARY = (SOLARIZE_THRESHOLD - 0.5) / 255.0
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L") and OpenCV's RGB2GRAY


def _factor_range(amount: float) -> tuple[float, float]:
    return max(0.0, 1.0 - amount), 1.0 + amount


def crop_probabilities(num_local_crops: int) -> tuple[np.ndarray, np.ndarray]:
    """Per crop (global 1, global 2, locals): the blur and solarisation probabilities of the recipe."""
    blur = [BLUR_PROBABILITY["global_1"], BLUR_PROBABILITY["global_2"]] + [BLUR_PROBABILITY["local"]] * int(
        num_local_crops
    )
    solarize = [0.0, SOLARIZE_PROBABILITY_GLOBAL_2] + [0.0] * int(num_local_crops)
    return np.asarray(blur), np.asarray(solarize)


def sample_photometric_parameters(
    rng: np.random.Generator, blur_probabilities: Sequence[float], solarize_probabilities: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Every random decision of the photometric ops for V crops: `(flips (V,) bool, parameters (V, 13) float32)`.

    A fixed number of draws per crop (decisions and factors are drawn whether used or not), so the stream of an
    image's generator does not depend on earlier outcomes.
    """
    blur_probabilities = np.asarray(blur_probabilities, dtype=np.float64)
    num_crops = len(blur_probabilities)
    uniforms = rng.random((num_crops, 10))
    parameters = np.zeros((num_crops, NUM_PARAMETERS), dtype=np.float32)
    flips = uniforms[:, 0] < FLIP_PROBABILITY
    parameters[:, JITTER] = uniforms[:, 1] < COLOR_JITTER_PROBABILITY
    for column, name, draw in (
        (BRIGHTNESS, "brightness", 2),
        (CONTRAST, "contrast", 3),
        (SATURATION, "saturation", 4),
    ):
        low, high = _factor_range(COLOR_JITTER[name])
        parameters[:, column] = low + (high - low) * uniforms[:, draw]
    hue = COLOR_JITTER["hue"]
    parameters[:, HUE] = -hue + 2 * hue * uniforms[:, 5]
    parameters[:, ORDER] = np.argsort(
        rng.random((num_crops, 4)), axis=1
    )  # a uniform random permutation per crop
    parameters[:, GRAYSCALE] = uniforms[:, 6] < GRAYSCALE_PROBABILITY
    parameters[:, BLUR] = uniforms[:, 7] < blur_probabilities
    low, high = BLUR_SIGMA_RANGE
    parameters[:, SIGMA] = low + (high - low) * uniforms[:, 8]
    parameters[:, SOLARIZE] = uniforms[:, 9] < np.asarray(solarize_probabilities, dtype=np.float64)
    return flips, parameters


def sample_crop_parameters(
    augmentation: MultiCropAugmentation, rng: np.random.Generator, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every random draw of one image's crops when they are finished outside the CPU pipeline, in a fixed order:
    the crop boxes (`augmentation.crop_boxes`), then the flips and photometric parameters
    (`sample_photometric_parameters`). Returns `boxes (V, 4)` int64, `flips (V,)` bool, `parameters (V, 13)`."""
    boxes = augmentation.crop_boxes(rng, width, height)
    flips, parameters = sample_photometric_parameters(rng, *crop_probabilities(augmentation.num_local_crops))
    return boxes, flips, parameters


def crops_with_parameters(
    augmentation: MultiCropAugmentation, image, rng: RngLike = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The worker's share: resized, flipped uint8 crops and their photometric parameters.

    Returns `global_crops (2, H, W, 3)`, `local_crops (L, h, w, 3)` (uint8) and `parameters (2 + L, 13)` (float32,
    globals first), to be finished by `apply_photometric` on the training device.
    """
    source = torch.from_numpy(to_rgb_array(image)).permute(2, 0, 1).unsqueeze(0)
    height, width = source.shape[-2:]
    boxes, flips, parameters = sample_crop_parameters(augmentation, as_generator(rng), width, height)
    global_crops = np.empty((NUM_GLOBAL_CROPS, *augmentation.global_crop_size, 3), dtype=np.uint8)
    local_crops = np.empty((augmentation.num_local_crops, *augmentation.local_crop_size, 3), dtype=np.uint8)
    outputs = [*global_crops, *local_crops]  # views into the two arrays
    for output, box, size, flip in zip(outputs, boxes, augmentation.crop_sizes, flips):
        crop = augmentation.resize_crop(source, box, size)
        output[...] = crop[:, ::-1] if flip else crop
    return global_crops, local_crops, parameters


# ------------------------------------------------------------------------------------------------ batched ops
# Each op takes float pixels `(n, 3, H, W)` in [0, 1] and per-image factors `(n,)`, and returns new pixels.


@lru_cache(maxsize=32)
def _channel_constants(values: tuple[float, float, float], device: torch.device) -> torch.Tensor:
    """`(1, 3, 1, 1)` float32 constants on `device`, copied there once (a copy per batch would wait for the GPU)."""
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).to(device)


def _gray(pixels: torch.Tensor) -> torch.Tensor:
    """`(n, 3, H, W)` -> `(n, 1, H, W)` luma."""
    weights = _channel_constants(_LUMA, pixels.device)
    return (pixels * weights).sum(dim=1, keepdim=True)


def _per_image(factors: torch.Tensor) -> torch.Tensor:
    return factors.view(-1, 1, 1, 1)


def adjust_brightness(pixels: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """`x * f` (PIL: blend with black)."""
    return (pixels * _per_image(factors)).clamp_(0.0, 1.0)


def adjust_contrast(pixels: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma: `f x + (1 - f) mean(gray)`."""
    factors = _per_image(factors)
    mean = _gray(pixels).mean(dim=(1, 2, 3), keepdim=True)
    return (pixels * factors + mean * (1.0 - factors)).clamp_(0.0, 1.0)


def adjust_saturation(pixels: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel luma: `f x + (1 - f) gray`."""
    factors = _per_image(factors)
    return (pixels * factors + _gray(pixels) * (1.0 - factors)).clamp_(0.0, 1.0)


def adjust_hue(pixels: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns (in [-0.5, 0.5]); torchvision's float algorithm, without 8-bit HSV."""
    red, green, blue = pixels.unbind(dim=1)
    maximum, _ = pixels.max(dim=1)
    minimum, _ = pixels.min(dim=1)
    chroma = maximum - minimum
    saturation = chroma / torch.where(maximum == 0, torch.ones_like(maximum), maximum)
    safe_chroma = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    red_c, green_c, blue_c = (
        (maximum - red) / safe_chroma,
        (maximum - green) / safe_chroma,
        (maximum - blue) / safe_chroma,
    )
    hue_red = (maximum == red) * (blue_c - green_c)
    hue_green = ((maximum == green) & (maximum != red)) * (2.0 + red_c - blue_c)
    hue_blue = ((maximum != green) & (maximum != red)) * (4.0 + green_c - red_c)
    hue = torch.fmod((hue_red + hue_green + hue_blue) / 6.0 + 1.0, 1.0)
    hue = torch.remainder(hue + shifts.view(-1, 1, 1), 1.0)
    # HSV -> RGB
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.to(torch.int64) % 6
    value = maximum
    p = (value * (1.0 - saturation)).clamp(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0.0, 1.0)
    # per sector: (r, g, b) = (v,t,p), (q,v,p), (p,v,t), (p,q,v), (t,p,v), (v,p,q)
    candidates = torch.stack([value, q, p, p, t, value, t, value, value, q, p, p, p, p, t, value, value, q])
    candidates = candidates.view(3, 6, *value.shape)
    index = sector.unsqueeze(0).unsqueeze(0).expand(3, 1, *sector.shape)
    return candidates.gather(1, index).squeeze(1).permute(1, 0, 2, 3).contiguous()


def to_grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """Luma copied to the three channels."""
    return _gray(pixels).expand_as(pixels).contiguous()


def solarize(pixels: torch.Tensor) -> torch.Tensor:
    """Invert the values an 8-bit image would hold as >= 128."""
    return torch.where(pixels >= _SOLARIZE_BOUNDARY, 1.0 - pixels, pixels)


def pil_gaussian_kernels(sigmas: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """PIL's `GaussianBlur(radius)` 1-D kernels for many radii at once: `(n,)` -> `(n, K)`, centred, K odd.

    The same construction as `selfpatch_hf.data.augmentation.pil_gaussian_kernel_1d` (three extended-box passes of
    variance radius^2 / 3), vectorised: every box is written on a common support, zero outside its own taps.
    """
    sigmas = sigmas.double()
    variance = sigmas * sigmas / passes
    box_length = torch.sqrt(12.0 * variance + 1.0)
    radius = torch.floor((box_length - 1.0) / 2.0)
    fraction = (
        (2 * radius + 1) * (radius * (radius + 1) - 3 * variance) / (6 * (variance - (radius + 1) ** 2))
    )
    half = int(radius.max().item()) + 1 if sigmas.numel() else 1
    offsets = torch.arange(-half, half + 1, device=sigmas.device, dtype=torch.float64).abs()
    box = torch.where(
        offsets <= radius[:, None], 1.0, torch.where(offsets == radius[:, None] + 1, fraction[:, None], 0.0)
    )
    box = box / (2 * (radius + fraction) + 1)[:, None]
    kernel = box
    for _ in range(
        passes - 1
    ):  # full convolution of each row with its own box, one grouped conv for all rows
        width = box.shape[1]
        kernel = torch.nn.functional.conv1d(
            torch.nn.functional.pad(kernel, (width - 1, width - 1)).unsqueeze(0),
            box.flip(-1).unsqueeze(1),
            groups=box.shape[0],
        ).squeeze(0)
    return kernel.float()


def _reflect_pad(pixels: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """OpenCV's BORDER_REFLECT (`cba|abc|cba`: the edge pixel repeated), which the CPU path's blur uses."""
    size = pixels.shape[dim]
    if pad > size:
        raise ValueError(f"A blur of {pad} pixels per side needs crops of at least {pad} pixels, got {size}.")
    before = pixels.narrow(dim, 0, pad).flip(dim)
    after = pixels.narrow(dim, size - pad, pad).flip(dim)
    return torch.cat([before, pixels, after], dim=dim)


def gaussian_blur(pixels: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable blur with PIL's kernel of radius `sigma`, one kernel per image, reflected border.

    Pass `sigmas` on the CPU for a GPU batch: the kernels' common length is read from them (a sync on a GPU)."""
    kernels = pil_gaussian_kernels(sigmas).to(pixels.device, pixels.dtype, non_blocking=True)  # (n, K)
    taps = kernels.shape[1]
    pad = taps // 2
    height, width = pixels.shape[-2:]
    for dim, size in ((3, width), (2, height)):
        padded = _reflect_pad(pixels, pad, dim)
        out = torch.zeros_like(pixels)
        for tap in range(taps):  # K shifted multiply-adds: no unfold copy, works on any device
            out.add_(padded.narrow(dim, tap, size) * kernels[:, tap].view(-1, 1, 1, 1))
        pixels = out
    return pixels.clamp_(0.0, 1.0)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
_JITTER_COLUMNS = (BRIGHTNESS, CONTRAST, SATURATION, HUE)


def _apply_where(pixels: torch.Tensor, mask: torch.Tensor, op, *args: torch.Tensor) -> torch.Tensor:
    """`op` on the images selected by the CPU `mask` (per-image arguments, on any device, indexed alike); the
    others unchanged. The selection is made on the host, so a GPU batch never waits for a device-to-host copy."""
    index = mask.nonzero().squeeze(1)
    if index.numel() == 0:
        return pixels
    if index.numel() == pixels.shape[0]:
        return op(pixels, *args)
    on_device = index.to(pixels.device, non_blocking=True)
    selected_args = (arg[index if arg.device == index.device else on_device] for arg in args)
    pixels[on_device] = op(pixels[on_device], *selected_args)
    return pixels


def photometric_ops(pixels: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """Colour jitter (own random order per image), grayscale, blur, solarisation on `(n, 3, H, W)` in [0, 1].

    `parameters` `(n, 13)` may be on the CPU (as the data loader leaves them) or on the device; the decisions are
    read on the CPU either way, the factors used on the device."""
    decisions = parameters.detach().cpu()
    values = parameters.to(pixels.device, non_blocking=True)
    jitter = decisions[:, JITTER] > 0.5
    order = decisions[:, ORDER].round().long()
    for position in range(4):
        for op_index, (op, column) in enumerate(zip(_JITTER_OPS, _JITTER_COLUMNS)):
            selected = jitter & (order[:, position] == op_index)
            pixels = _apply_where(pixels, selected, op, values[:, column])
    pixels = _apply_where(pixels, decisions[:, GRAYSCALE] > 0.5, to_grayscale)
    pixels = _apply_where(pixels, decisions[:, BLUR] > 0.5, gaussian_blur, decisions[:, SIGMA])
    return _apply_where(pixels, decisions[:, SOLARIZE] > 0.5, solarize)


def finish_crops(
    pixels: torch.Tensor, parameters: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Photometric ops and normalisation of float crops `(n, 3, H, W)` in [0, 1] (consumed) with their parameters
    `(n, 13)` -> normalised float32 `(n, 3, H, W)`."""
    pixels = photometric_ops(pixels.contiguous(), parameters.reshape(-1, NUM_PARAMETERS).float())
    shift = _channel_constants(tuple(float(m) for m in mean), pixels.device)
    scale = _channel_constants(tuple(1.0 / float(s) for s in std), pixels.device)
    return pixels.sub_(shift).mul_(scale)


def apply_photometric(
    crops: torch.Tensor,
    parameters: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """The device's share: uint8 crops `(..., H, W, 3)` and their parameters `(..., 13)` -> normalised float32
    `(..., 3, H, W)` on the crops' device."""
    leading = crops.shape[:-3]
    height, width = crops.shape[-3:-1]
    if parameters.shape != (*leading, NUM_PARAMETERS):
        raise ValueError(
            f"Expected parameters of shape {(*leading, NUM_PARAMETERS)} for crops {tuple(crops.shape)}, "
            f"got {tuple(parameters.shape)}."
        )
    pixels = crops.reshape(-1, height, width, 3).permute(0, 3, 1, 2).float().div_(255.0)
    return finish_crops(pixels, parameters, mean, std).reshape(*leading, 3, height, width)


__all__ = [
    "NUM_PARAMETERS",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "apply_photometric",
    "crop_probabilities",
    "crops_with_parameters",
    "finish_crops",
    "gaussian_blur",
    "photometric_ops",
    "pil_gaussian_kernels",
    "sample_crop_parameters",
    "sample_photometric_parameters",
    "solarize",
    "to_grayscale",
]
