"""Decode, crop and resize on the training device: `augmentation_device="device_crops"`.

With the photometric ops on the device (`augmentation_device="device"`), what is left in a data worker is decoding
(about a quarter of its time) and the antialiased resize of ten crops (three quarters). This mode moves both:

- in the worker (`SourceBatch`): read the image's bytes, and for a JPEG a device decoder takes
  (`selfpatch_hf.data.decoding.read_jpeg_header`: size and EXIF orientation from the header only) keep them encoded;
  decode anything else on the host (`decode_image`: PNG, WebP, CMYK, 16-bit, progressive JPEGs, ... exactly as on
  the CPU path) and keep its full-resolution RGB pixels. Then draw every random decision of the image's crops from
  its own generator (`numpy.random.default_rng([seed, epoch, rank, worker, index])`), in the same order as
  `augmentation_device="device"` (`batched_photometric.sample_crop_parameters`: boxes, flips, photometric
  parameters), so both modes crop the same boxes for the same seed. The batch travels as two flat byte buffers
  (encoded JPEGs, decoded pixels) with a small layout table, in shared memory;
- on the training device (`DeviceCrops`): decode the JPEGs in batches (nvJPEG through torchvision, where available),
  turn them upright, crop and resize every crop of the batch in a few batched matrix products
  (`selfpatch_hf.data.resampling`), flip, and run the photometric ops and normalisation
  (`batched_photometric.finish_crops`).

Without a device JPEG decoder (no torchvision, or a training device other than CUDA) every image is decoded in the
workers and only the crops and resizes move; `selfpatch_hf.data.decoding.device_jpeg_decoder` logs which case applies.

Memory: images are processed in groups of similar size whose working set (padded full-resolution images, resampling
matrices and intermediate rows) stays under `max_working_bytes` (default 1 GiB); a group's full-resolution images are
freed once its crops are taken, so the device holds at most one group of them, plus the batch's crops. A single
image whose own working set exceeds the bound (about 50 megapixels at the default) is processed alone.
`DeviceCrops.last_working_bytes` says how large the largest group of the last batch was.

Failures: a JPEG that the device decoder rejects (it decodes a list all or nothing) is retried alone, then decoded on
the host; an image the host cannot decode either is dropped from its batch (the batch is one image short) and
counted with the workers' skipped images under its reason.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from selfpatch_hf.data.augmentation import MultiCropAugmentation
from selfpatch_hf.data.batched_photometric import NUM_PARAMETERS, finish_crops, sample_crop_parameters
from selfpatch_hf.data.decoding import (
    ImageDecodeError,
    JpegDecoder,
    JpegHeader,
    decode_image,
    exif_transpose_tensor,
    read_jpeg_header,
)
from selfpatch_hf.data.resampling import FILTER_SUPPORT, resize_crops

DEFAULT_WORKING_BYTES = 2**30
# Columns of the layout table, one row per image.
KIND, OFFSET, LENGTH, HEIGHT, WIDTH, ORIENTATION = range(6)
PIXELS, JPEG = 0, 1  # kinds: decoded RGB pixels (H, W, 3) in "pixels", or an encoded JPEG in "encoded"


# ------------------------------------------------------------------------------------------------ worker side


class SourceBatch:
    """The images of one batch as a worker hands them to the training device: encoded JPEGs or decoded RGB pixels,
    with every crop's box, flip and photometric parameters.

    `add_image(data, path, rng)` is a worker's whole share per image; `add_jpeg` / `add_pixels` add prepared ones.

    Args:
        augmentation: the recipe whose crops are drawn.
        min_size: images whose shorter side is smaller are skipped (`ImageDecodeError` "too_small").
        jpegs_on_device: keep JPEGs a device decoder takes encoded (else every image is decoded here).
    """

    def __init__(
        self, augmentation: MultiCropAugmentation, min_size: int = 16, jpegs_on_device: bool = False
    ):
        self.augmentation = augmentation
        self.num_crops = 2 + augmentation.num_local_crops
        self.min_size = int(min_size)
        self.jpegs_on_device = jpegs_on_device
        self._payloads: list[tuple[int, np.ndarray]] = []  # (kind, bytes or pixels)
        self._layout: list[list[int]] = []
        self._draws: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self._layout)

    def _add(self, kind: int, payload: np.ndarray, height: int, width: int, orientation: int, draws) -> None:
        boxes, flips, parameters = draws
        if boxes.shape != (self.num_crops, 4) or parameters.shape != (self.num_crops, NUM_PARAMETERS):
            raise ValueError(f"Expected draws for {self.num_crops} crops, got boxes {boxes.shape}.")
        self._payloads.append((kind, payload))
        self._layout.append([kind, 0, payload.size, height, width, orientation])
        self._draws.append((boxes, flips, parameters))

    def add_image(self, data: bytes, path: str | None, rng: np.random.Generator) -> None:
        """Read one image's bytes into the batch with its draws from `rng`: kept encoded when it is a JPEG the device
        decoder takes (only its header is read), else decoded here as on the CPU path. Raises `ImageDecodeError` for
        images to skip."""
        header = read_jpeg_header(data) if self.jpegs_on_device else None
        if header is None:
            image = decode_image({"bytes": data, "path": path}, self.min_size)
            draws = sample_crop_parameters(self.augmentation, rng, image.width, image.height)
            # read-only view of one copy of the pixels (np.array(image) would copy them twice)
            pixels = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(image.height, image.width, 3)
            self.add_pixels(pixels, *draws)
            return
        height, width = header.upright_size
        if min(height, width) < self.min_size:
            raise ImageDecodeError(
                "too_small", f"image of {width}x{height} px is smaller than min_size={self.min_size}"
            )
        self.add_jpeg(data, header, *sample_crop_parameters(self.augmentation, rng, width, height))

    def add_jpeg(
        self, data: bytes, header: JpegHeader, boxes: np.ndarray, flips: np.ndarray, parameters: np.ndarray
    ) -> None:
        """An encoded JPEG to decode on the device; `boxes` are in its upright (EXIF-oriented) coordinates."""
        payload = np.frombuffer(data, dtype=np.uint8)
        self._add(JPEG, payload, header.height, header.width, header.orientation, (boxes, flips, parameters))

    def add_pixels(
        self, pixels: np.ndarray, boxes: np.ndarray, flips: np.ndarray, parameters: np.ndarray
    ) -> None:
        """Upright RGB uint8 pixels `(H, W, 3)`, decoded on the host."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"Expected RGB uint8 pixels (H, W, 3), got {pixels.dtype} {pixels.shape}.")
        self._add(PIXELS, pixels, pixels.shape[0], pixels.shape[1], 1, (boxes, flips, parameters))

    def tensors(self, shared: bool = False) -> dict[str, torch.Tensor]:
        """The batch as tensors (in shared memory when `shared`, so that sending them between processes copies
        nothing): `encoded`, `pixels` (flat uint8), `layout (B, 6)` int64, `boxes (B, V, 4)` int64, `flips (B, V)`
        bool, `parameters (B, V, 13)` float32."""
        layout = np.asarray(self._layout, dtype=np.int64).reshape(-1, 6)
        totals = {PIXELS: 0, JPEG: 0}
        for row in layout:
            row[OFFSET] = totals[int(row[KIND])]
            totals[int(row[KIND])] += int(row[LENGTH])
        out = {
            "encoded": torch.empty(totals[JPEG], dtype=torch.uint8),
            "pixels": torch.empty(totals[PIXELS], dtype=torch.uint8),
            "layout": torch.from_numpy(layout),
            "boxes": torch.from_numpy(np.stack([d[0] for d in self._draws]).reshape(-1, self.num_crops, 4)),
            "flips": torch.from_numpy(np.stack([d[1] for d in self._draws]).reshape(-1, self.num_crops)),
            "parameters": torch.from_numpy(
                np.stack([d[2] for d in self._draws])
                .astype(np.float32)
                .reshape(-1, self.num_crops, NUM_PARAMETERS)
            ),
        }
        if shared:
            for tensor in out.values():
                tensor.share_memory_()
        buffers = {JPEG: out["encoded"].numpy(), PIXELS: out["pixels"].numpy()}
        for (kind, payload), row in zip(self._payloads, layout):
            buffers[kind][row[OFFSET] : row[OFFSET] + row[LENGTH]] = payload.reshape(-1)
        return out


# ------------------------------------------------------------------------------------------------ device side


@dataclass
class DeviceCropsOutput:
    """Normalised float32 crops `global_crops (B', 2, 3, H, W)`, `local_crops (B', L, 3, h, w)` on the device, and
    the images dropped from the batch (`B' = B - len(dropped)`) as `(reason, message)` pairs."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    dropped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def dropped_by_reason(self) -> Counter:
        return Counter(reason for reason, _ in self.dropped)


class DeviceCrops:
    """The training device's share of `augmentation_device="device_crops"` (see the module docstring).

    Args:
        augmentation: the recipe (crop sizes, interpolation, mean and std; its photometric ops are the batched ones).
        device: where the crops are made (default: the CPU).
        jpeg_decoder: decodes a list of encoded JPEGs on `device` (`decoding.device_jpeg_decoder`); `None` when the
            workers decode every image.
        max_working_bytes: bound of the working set of one group of images (see the module docstring).
    """

    def __init__(
        self,
        augmentation: MultiCropAugmentation,
        device: str | torch.device | None = None,
        jpeg_decoder: JpegDecoder | None = None,
        max_working_bytes: int = DEFAULT_WORKING_BYTES,
    ):
        if not max_working_bytes > 0:
            raise ValueError(f"max_working_bytes must be > 0, got {max_working_bytes!r}.")
        self.augmentation = augmentation
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.jpeg_decoder = jpeg_decoder
        self.max_working_bytes = int(max_working_bytes)
        self.sizes = [augmentation.global_crop_size, augmentation.local_crop_size]
        self.counts = [2, augmentation.num_local_crops]
        self.last_working_bytes = 0

    # -- memory ---------------------------------------------------------------------------------------------------

    def working_bytes(self, height: int, width: int) -> int:
        """Bytes one image padded to `height x width` needs while its crops are made: the float image, its decoded
        copy, both resampling matrices, the rows of the horizontal pass (twice: the vertical pass reads a permuted
        copy) and its crops."""
        columns = sum(count * size[1] for size, count in zip(self.sizes, self.counts))  # sum of V w
        rows = sum(count * size[0] for size, count in zip(self.sizes, self.counts))  # sum of V h
        smallest_output = min(min(size) for size, count in zip(self.sizes, self.counts) if count)
        largest_scale = max(height, width, smallest_output) / smallest_output
        taps = math.ceil(2 * FILTER_SUPPORT[self.augmentation.interpolation] * largest_scale) + 2
        crops = sum(count * size[0] * size[1] for size, count in zip(self.sizes, self.counts))
        floats = (
            3 * height * width  # the padded float image
            + columns * (width + taps)  # column weights, with their spare taps
            + rows * (height + taps)
            + 2 * 3 * height * columns  # the horizontal pass and its permuted copy
            + 2 * 3 * crops
        )
        return 4 * floats + 3 * height * width  # + the decoded uint8 image

    def _groups(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        """Rows grouped by similar size (largest first), each group's working set under the bound (one image at
        least)."""
        order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], sizes[i]), reverse=True)
        groups: list[list[int]] = []
        current: list[int] = []
        height = width = 0
        for row in order:
            h, w = max(height, sizes[row][0]), max(width, sizes[row][1])
            if current and (len(current) + 1) * self.working_bytes(h, w) > self.max_working_bytes:
                groups.append(current)
                current, h, w = [], sizes[row][0], sizes[row][1]
            current.append(row)
            height, width = h, w
        if current:
            groups.append(current)
        return groups

    # -- decoding -------------------------------------------------------------------------------------------------

    def _decode_jpegs(
        self, encoded: list[torch.Tensor], headers: list[JpegHeader]
    ) -> list[torch.Tensor | ImageDecodeError]:
        """Upright `(3, H, W)` uint8 images on the device, or the error that makes one unusable."""
        decoded: list = [None] * len(encoded)
        try:
            batch = self.jpeg_decoder(encoded) if encoded else []
        except Exception:  # one bad file fails the whole list: find it
            batch = None
        if batch is not None and len(batch) != len(encoded):
            batch = None
        for index, (data, header) in enumerate(zip(encoded, headers)):
            image = batch[index] if batch is not None else None
            if image is None:
                try:
                    image = self.jpeg_decoder([data])[0]
                except Exception:
                    image = None
            if image is not None and tuple(image.shape) == (3, header.height, header.width):
                decoded[index] = exif_transpose_tensor(image, header.orientation)
                continue
            # the device decoder refused it: decode it on the host, which also applies the orientation
            try:
                pixels = np.array(decode_image(data.numpy().tobytes(), min_size=1))
            except ImageDecodeError as error:
                decoded[index] = error
                continue
            decoded[index] = torch.from_numpy(pixels).to(self.device).permute(2, 0, 1)
        return decoded

    # -- the batch ------------------------------------------------------------------------------------------------

    def __call__(self, sources: dict[str, torch.Tensor]) -> DeviceCropsOutput:
        """Crops of one batch from a worker (`SourceBatch.tensors()`)."""
        layout = sources["layout"].tolist()
        count = len(layout)
        pixels = sources["pixels"].to(self.device, non_blocking=True)  # one copy for every host-decoded image
        upright = [
            (row[WIDTH], row[HEIGHT]) if row[ORIENTATION] >= 5 else (row[HEIGHT], row[WIDTH])
            for row in layout
        ]
        outputs = [
            torch.empty(count, crops, 3, *size, device=self.device)
            for size, crops in zip(self.sizes, self.counts)
        ]
        dropped: dict[int, tuple[str, str]] = {}
        self.last_working_bytes = 0
        for group in self._groups(upright):
            images: dict[int, torch.Tensor] = {}
            for row in group:
                if layout[row][KIND] == PIXELS:
                    first, length = layout[row][OFFSET], layout[row][LENGTH]
                    images[row] = pixels[first : first + length].view(*upright[row], 3).permute(2, 0, 1)
            jpeg_rows = [row for row in group if layout[row][KIND] == JPEG]
            encoded = [
                sources["encoded"][layout[row][OFFSET] : layout[row][OFFSET] + layout[row][LENGTH]]
                for row in jpeg_rows
            ]
            headers = [
                JpegHeader(*(layout[row][c] for c in (HEIGHT, WIDTH, ORIENTATION))) for row in jpeg_rows
            ]
            for row, image in zip(jpeg_rows, self._decode_jpegs(encoded, headers)):
                if isinstance(image, ImageDecodeError):
                    dropped[row] = (image.reason, f"{image.reason}: {image}")
                else:
                    images[row] = image
            rows = [row for row in group if row in images]
            if rows:
                self._crop_group(rows, images, sources, outputs)
        kept = [row for row in range(count) if row not in dropped]
        parameters = sources["parameters"]
        if dropped:
            selection = torch.tensor(kept, dtype=torch.long)
            outputs = [output[selection.to(self.device)] for output in outputs]
            parameters = parameters[selection]
        finished, first = [], 0
        for output, crops in zip(outputs, self.counts):
            if crops:
                size = output.shape[-2:]
                flat = output.view(-1, 3, *size).div_(255.0)
                flat_parameters = parameters[:, first : first + crops].reshape(-1, NUM_PARAMETERS)
                aug = self.augmentation
                output = finish_crops(flat, flat_parameters, aug.mean, aug.std).view(
                    len(kept), crops, 3, *size
                )
            finished.append(output)
            first += crops
        return DeviceCropsOutput(finished[0], finished[1], [dropped[row] for row in sorted(dropped)])

    def _crop_group(
        self,
        rows: list[int],
        images: dict[int, torch.Tensor],
        sources: dict[str, torch.Tensor],
        outputs: list[torch.Tensor],
    ) -> None:
        """Resized, flipped crops (in [0, 255]) of the images of one group, written to their rows of `outputs`."""
        height = max(images[row].shape[1] for row in rows)
        width = max(images[row].shape[2] for row in rows)
        self.last_working_bytes = max(self.last_working_bytes, len(rows) * self.working_bytes(height, width))
        padded = torch.zeros(len(rows), 3, height, width, device=self.device)
        for slot, row in enumerate(rows):
            image = images.pop(row)  # the full-resolution image lives on only in the padded group
            padded[slot, :, : image.shape[1], : image.shape[2]].copy_(image)
        selection = torch.tensor(rows, dtype=torch.long)
        crops = resize_crops(
            padded,
            sources["boxes"][selection],
            self.sizes,
            self.counts,
            self.augmentation.interpolation,
            sources["flips"][selection],
        )
        on_device = selection.to(self.device, non_blocking=True)
        for output, group_crops in zip(outputs, crops):
            output.index_copy_(0, on_device, group_crops)


__all__ = ["DEFAULT_WORKING_BYTES", "DeviceCrops", "DeviceCropsOutput", "SourceBatch"]
