"""Decode, crop and resize on the training device (`augmentation_device="device_crops"`), on CPU tensors.

Measured tolerances: the batched resize (selfpatch_hf.data.resampling) equals torch's float antialiased resize within
float32 rounding (weights and tap windows are the same), and the workers path's uint8 crops (torch's PIL-compatible
integer kernel) within 1 grey level, 0.28 on average (0.25 of it is the workers path's rounding to 8 bits). nvJPEG
itself cannot run here: a Pillow decoder stands in for it (it returns the stored pixels as nvJPEG does), so
everything around the one `decode_jpeg(..., device="cuda")` call is exercised.
"""

from __future__ import annotations

import io
import logging
import math
import sys
import types

import datasets
import numpy as np
import pytest
import scipy.stats
import skimage.data
import torch
from PIL import Image

from selfpatch_hf.data import augmentation as augmentation_module
from selfpatch_hf.data import batched_photometric as bp
from selfpatch_hf.data.augmentation import MultiCropAugmentation
from selfpatch_hf.data.decoding import (
    JpegHeader,
    NvJpegDecoder,
    decode_image,
    device_jpeg_decoder,
    exif_transpose_tensor,
    read_jpeg_header,
)
from selfpatch_hf.data.device_crops import DeviceCrops, SourceBatch
from selfpatch_hf.data.resampling import resampling_weights, resize_crops
from selfpatch_hf.data.streaming import MultiCropDataLoader, load_image_stream


@pytest.fixture(autouse=True)
def _quiet_datasets(monkeypatch):
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    datasets.disable_progress_bars()


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    names = ("astronaut", "chelsea", "coffee", "rocket")
    return [np.asarray(getattr(skimage.data, name)()) for name in names]


def resized(photo: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.BICUBIC))


def encode(image: Image.Image | np.ndarray, format: str = "JPEG", **kwargs) -> bytes:
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(pixels, exif=exif.tobytes(), quality=92)


class PillowDeviceDecoder:
    """Stands in for nvJPEG: decodes each JPEG as stored (no EXIF orientation) to `(3, H, W)` uint8, all or nothing;
    `refuse` holds files it fails on, as nvJPEG fails on some that libjpeg decodes."""

    def __init__(self, refuse: tuple[bytes, ...] = ()):
        self.refuse = set(refuse)
        self.calls: list[int] = []

    def __call__(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls.append(len(encoded))
        out = []
        for data in encoded:
            raw = data.numpy().tobytes()
            if raw in self.refuse:
                raise RuntimeError("nvjpeg: unsupported image")
            pixels = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
            out.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        return out


def tiny_augmentation(**overrides) -> MultiCropAugmentation:
    return MultiCropAugmentation(
        **{"global_crop_size": 32, "local_crop_size": 16, "num_local_crops": 3, **overrides}
    )


def write_parquet(path, images: list[bytes]) -> str:
    features = datasets.Features({"image": datasets.Image()})
    rows = {"image": [{"bytes": data, "path": None} for data in images]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return str(path)


def open_loader(path: str, augmentation, **kwargs) -> MultiCropDataLoader:
    dataset, column = load_image_stream(path)
    settings = {
        "batch_size": 3,
        "num_workers": 0,
        "shuffle_buffer_size": 0,
        "seed": 11,
        "device": "cpu",
        "drop_last": False,
        "augmentation_device": "device_crops",
        "jpeg_decoder": None,
        **kwargs,
    }
    batch_size = settings.pop("batch_size")
    return MultiCropDataLoader(dataset, column, augmentation, batch_size, **settings)


# ------------------------------------------------------------------------------------------------ the resize


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resampling_matrices_are_torchs_antialiased_weights(photos, interpolation):
    """Row weights @ crop @ column weights^T equals torch's float `interpolate(antialias=True)` of the crop, for
    shrinking, enlarging and mixed boxes (before any clamping)."""
    image = torch.from_numpy(resized(photos[0], 90, 70)).permute(2, 0, 1).float()
    rng = np.random.default_rng(0)
    for size in [(32, 32), (96, 40), (7, 120), (64, 64)]:
        for _ in range(8):
            top, left, h, w = augmentation_module.sample_crop_box(rng, 90, 70, (0.02, 1.0), (0.5, 2.0))
            wy = resampling_weights(torch.tensor([top]), torch.tensor([h]), 70, size[0], interpolation)[0]
            wx = resampling_weights(torch.tensor([left]), torch.tensor([w]), 90, size[1], interpolation)[0]
            ours = wy @ image @ wx.T
            crop = image[None, :, top : top + h, left : left + w]
            reference = torch.nn.functional.interpolate(crop, size=size, mode=interpolation, antialias=True)[
                0
            ]
            torch.testing.assert_close(ours, reference, atol=2e-3, rtol=0)
            torch.testing.assert_close(wy.sum(1), torch.ones(size[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_batched_crops_match_the_worker_paths_resize(photos, interpolation, one_torch_thread):
    """For the same boxes, images of different sizes in one batch: within 1 grey level of the workers path's uint8
    crops (`MultiCropAugmentation.resize_crop`), 0.28 on average; flips mirror the crop exactly."""
    aug = tiny_augmentation(
        global_crop_size=(40, 48), local_crop_size=24, num_local_crops=4, interpolation=interpolation
    )
    rng = np.random.default_rng(1)
    sizes = [(int(rng.integers(40, 150)), int(rng.integers(40, 150))) for _ in range(6)]
    images = [resized(photos[i % 4], w, h) for i, (h, w) in enumerate(sizes)]
    boxes = np.stack([aug.crop_boxes(rng, w, h) for h, w in sizes])
    flips = rng.random(boxes.shape[:2]) < 0.5
    padded = torch.zeros(len(images), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for index, image in enumerate(images):
        padded[index, :, : image.shape[0], : image.shape[1]] = torch.from_numpy(image).permute(2, 0, 1)
    groups = resize_crops(
        padded, torch.from_numpy(boxes), [aug.global_crop_size, aug.local_crop_size], [2, 4], interpolation,
        torch.from_numpy(flips),
    )  # fmt: skip
    differences = []
    for index, image in enumerate(images):
        source = torch.from_numpy(image.copy()).permute(2, 0, 1).unsqueeze(0)
        ours = [*groups[0][index], *groups[1][index]]
        for crop, box, size, flip in zip(ours, boxes[index], aug.crop_sizes, flips[index]):
            expected = aug.resize_crop(source, box, size).astype(np.float64)
            expected = expected[:, ::-1] if flip else expected
            ours_crop = crop.permute(1, 2, 0).numpy()
            assert np.abs(ours_crop.round() - expected).max() <= 1, (index, box, size)
            differences.append(np.abs(ours_crop - expected).mean())
    assert np.mean(differences) < 0.33
    assert groups[0].shape == (6, 2, 3, 40, 48) and groups[1].shape == (6, 4, 3, 24, 24)


# ------------------------------------------------------------------------------------------------ decoding


def test_jpeg_headers_route_files_to_the_device_or_the_host(photos):
    pixels = resized(photos[1], 60, 40)
    rgb = encode(pixels, quality=90)
    assert read_jpeg_header(rgb) == JpegHeader(40, 60, 1)
    assert read_jpeg_header(encode(Image.fromarray(pixels).convert("L"))) == JpegHeader(40, 60, 1)
    assert read_jpeg_header(with_orientation(pixels, 6)).upright_size == (60, 40)
    # decoded on the host: other formats and modes, progressive or possibly truncated JPEGs, garbage
    assert read_jpeg_header(encode(Image.fromarray(pixels).convert("CMYK"))) is None
    assert read_jpeg_header(encode(pixels, progressive=True)) is None
    assert read_jpeg_header(encode(pixels, format="PNG")) is None
    assert read_jpeg_header(rgb[: len(rgb) // 2]) is None
    assert read_jpeg_header(b"\xff\xd8 not a jpeg \xff\xd9") is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_the_device_equals_pil_exif_transpose(photos, orientation):
    data = with_orientation(resized(photos[2], 30, 20), orientation)
    stored = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    upright = exif_transpose_tensor(stored, read_jpeg_header(data).orientation)
    expected = np.asarray(decode_image(data, min_size=1))
    assert np.array_equal(upright.permute(1, 2, 0).numpy(), expected)
    assert tuple(upright.shape[1:]) == read_jpeg_header(data).upright_size


def test_nvjpeg_decoder_is_found_lazily_and_falls_back_with_one_line(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="selfpatch_hf.data.decoding"):
        assert device_jpeg_decoder("cpu") is None
    assert len(caplog.records) == 1 and "needs a CUDA device" in caplog.records[0].getMessage()
    caplog.clear()
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    with caplog.at_level(logging.INFO, logger="selfpatch_hf.data.decoding"):
        assert device_jpeg_decoder("cuda") is None
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "torchvision" in caplog.records[0].getMessage()

    calls = []
    fake_io = types.ModuleType("torchvision.io")
    fake_io.ImageReadMode = types.SimpleNamespace(RGB="RGB-mode")
    fake_io.decode_jpeg = lambda encoded, mode, device: calls.append((encoded, mode, device)) or ["decoded"]
    fake = types.ModuleType("torchvision")
    fake.io = fake_io
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.io", fake_io)
    decoder = device_jpeg_decoder("cuda:1")
    assert isinstance(decoder, NvJpegDecoder)
    encoded = [torch.zeros(4, dtype=torch.uint8)]
    assert decoder(encoded) == ["decoded"]
    assert calls == [(encoded, "RGB-mode", torch.device("cuda:1"))]  # one batched call, RGB, on the device


# ------------------------------------------------------------------------------------------------ the loader


@pytest.fixture(scope="module")
def mixed_images(photos) -> dict[str, bytes]:
    """Every kind of file a dataset may hold, as on the CPU path's decoding tests."""
    base = resized(photos[0], 64, 48)
    rgba = np.dstack([resized(photos[3], 50, 40), np.full((40, 50), 128, np.uint8)])
    sixteen = (np.linspace(0, 65535, 56 * 44).reshape(44, 56)).astype(np.uint16)
    jpeg = encode(base, quality=90)
    return {
        "rgb": jpeg,
        "gray": encode(Image.fromarray(resized(photos[1], 52, 60)).convert("L"), quality=90),
        "rotated": with_orientation(resized(photos[2], 70, 45), 6),
        "mirrored": with_orientation(resized(photos[1], 45, 58), 2),
        "cmyk": encode(Image.fromarray(resized(photos[2], 48, 48)).convert("CMYK"), quality=90),
        "progressive": encode(resized(photos[3], 66, 50), quality=90, progressive=True),
        "png_rgba": encode(Image.fromarray(rgba, "RGBA"), format="PNG"),
        "png_16bit": encode(Image.fromarray(sixteen), format="PNG"),
        "palette": encode(Image.fromarray(base).convert("P"), format="PNG"),
        "truncated": jpeg[: len(jpeg) // 3],
        "garbage": b"definitely not an image",
        "too_small": encode(resized(photos[0], 12, 30), quality=90),
        "headers_only": jpeg[: jpeg.index(b"\xff\xda")] + b"\xff\xd9",  # a valid header, no image data
    }


def test_every_kind_of_file_behaves_as_on_the_cpu_path(tmp_path, mixed_images):
    """With the JPEGs decoded 'on the device' (the stand-in decoder) or all in the workers, the same batches; the
    same images skipped, for the same reasons, as the workers path; only baseline RGB / gray JPEGs reach the device
    decoder; one the device decoder rejects is decoded on the host; one nobody can decode is dropped and counted."""
    path = write_parquet(tmp_path / "mixed.parquet", list(mixed_images.values()))
    aug = tiny_augmentation()
    workers = open_loader(path, aug, augmentation_device="workers")
    list(workers)
    host = open_loader(path, aug)
    host_batches = list(host)
    decoder = PillowDeviceDecoder(refuse=(mixed_images["mirrored"],))
    device = open_loader(path, aug, jpeg_decoder=decoder)
    device_batches = list(device)

    # the workers skip the truncated, garbage and too-small files in every mode; the file without image data passes
    # the header check in `device_crops` mode and is dropped when the host fails to decode it too
    assert workers.skipped_images_by_reason == {"unreadable": 3, "too_small": 1}
    assert host.skipped_images_by_reason == workers.skipped_images_by_reason
    assert device.skipped_images_by_reason == {"unreadable": 3, "too_small": 1}
    assert sum(len(b.global_crops) for b in host_batches) == 9
    assert sum(len(b.global_crops) for b in device_batches) == 9
    state = device.state_dict()
    assert state["skipped_before"] == {"unreadable": 3, "too_small": 1}
    # rgb, gray, rotated, mirrored (refused, then alone, then on the host), headers_only -> the device decoder
    assert sum(decoder.calls) >= 5 and max(decoder.calls) <= 3
    # the dropped image leaves its batch one short, so compare image by image
    for name in ("global_crops", "local_crops"):
        ours = torch.cat([getattr(batch, name) for batch in device_batches])
        torch.testing.assert_close(
            ours, torch.cat([getattr(b, name) for b in host_batches]), atol=1e-4, rtol=0
        )
    assert [len(b.global_crops) for b in device_batches] != [len(b.global_crops) for b in host_batches]


def test_device_crops_continue_the_device_modes_draws(tmp_path, photos, one_torch_thread):
    """Same seed, same boxes, flips and photometric parameters as `augmentation_device="device"`: the batches agree up
    to the resize's rounding, amplified at most by the contrast factors (measured over 24 images: 0.15 grey levels on
    average, 2.8 at most)."""
    images = [encode(resized(photos[i % 4], 60 + 7 * i, 50 + 5 * i), quality=90) for i in range(6)]
    path = write_parquet(tmp_path / "train.parquet", images)
    aug = tiny_augmentation()
    device = list(open_loader(path, aug, augmentation_device="device"))
    crops = list(open_loader(path, aug))
    std = torch.tensor(aug.std).view(3, 1, 1) * 255  # in grey levels
    for a, b in zip(device, crops, strict=True):
        for x, y in ((a.global_crops, b.global_crops), (a.local_crops, b.local_crops)):
            difference = ((x - y) * std).abs()
            assert difference.mean() < 0.4 and difference.amax() < 4, (difference.mean(), difference.amax())


def test_device_crops_resume_exactly_and_reproduce(tmp_path, photos):
    images = [encode(resized(photos[i % 4], 50 + 3 * i, 40 + 2 * i), quality=90) for i in range(10)]
    path = write_parquet(tmp_path / "train.parquet", images)
    aug = tiny_augmentation()
    decoder = PillowDeviceDecoder()
    settings = {"num_workers": 2, "batch_size": 2, "jpeg_decoder": decoder, "drop_last": True}
    reference = list(open_loader(path, aug, **settings))
    assert len(reference) == 4  # 2 workers, 5 images each: 2 full batches each
    again = list(open_loader(path, aug, **settings))
    first = open_loader(path, aug, **settings)
    iterator = iter(first)
    for _ in range(2):
        next(iterator)
    state = first.state_dict()
    del iterator
    resumed = open_loader(path, aug, **settings)
    resumed.load_state_dict(state)
    for batches in (again[2:], list(resumed)):
        for batch, expected in zip(batches, reference[2:], strict=True):
            assert torch.equal(batch.global_crops, expected.global_crops)
            assert torch.equal(batch.local_crops, expected.local_crops)


def test_a_small_memory_bound_processes_one_image_at_a_time_with_the_same_crops(photos):
    aug = tiny_augmentation()
    batch = SourceBatch(aug)
    rng = np.random.default_rng(3)
    for index in range(5):
        image = resized(photos[index % 4], 40 + 9 * index, 70 - 5 * index)
        draws = bp.sample_crop_parameters(aug, rng, image.shape[1], image.shape[0])
        if index % 2:
            data = encode(image, quality=90)
            batch.add_jpeg(data, read_jpeg_header(data), *draws)
        else:
            batch.add_pixels(image, *draws)
    sources = batch.tensors()
    together = DeviceCrops(aug, jpeg_decoder=PillowDeviceDecoder())
    alone = DeviceCrops(aug, jpeg_decoder=PillowDeviceDecoder(), max_working_bytes=1)
    a, b = together(sources), alone(sources)
    assert alone.last_working_bytes < together.last_working_bytes
    assert alone.last_working_bytes == max(
        alone.working_bytes(*size) for size in [(70 - 5 * i, 40 + 9 * i) for i in range(5)]
    )
    torch.testing.assert_close(a.global_crops, b.global_crops, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.local_crops, b.local_crops, atol=1e-4, rtol=0)
    assert a.global_crops.shape == (5, 2, 3, 32, 32) and a.local_crops.shape == (5, 3, 3, 16, 16)
    for bad in (0, -5, float("nan")):
        with pytest.raises(ValueError, match="max_working_bytes"):
            DeviceCrops(aug, max_working_bytes=bad)


def test_two_views_without_local_crops_and_bilinear_resampling(tmp_path, photos):
    """MoBY's recipe (2 views, no local crops, bilinear) runs through the device path too."""
    path = write_parquet(tmp_path / "train.parquet", [encode(resized(p, 64, 48)) for p in photos])
    aug = MultiCropAugmentation.from_recipe("moby", global_crop_size=24)
    batches = list(open_loader(path, aug, batch_size=2))
    assert [tuple(b.global_crops.shape) for b in batches] == [(2, 2, 3, 24, 24)] * 2
    assert all(b.local_crops.shape == (2, 0, 3, 96, 96) for b in batches)


def test_bad_options_are_refused(tmp_path, photos):
    path = write_parquet(tmp_path / "train.parquet", [encode(resized(photos[0], 40, 40))])
    with pytest.raises(ValueError, match="augmentation_device must be one of workers, device, device_crops"):
        open_loader(path, tiny_augmentation(), augmentation_device="gpu")
    with pytest.raises(ValueError, match="jpeg_decoder"):
        open_loader(path, tiny_augmentation(), jpeg_decoder="nvjpeg")


# ------------------------------------------------------------------------------------------------ distributions


def test_crop_boxes_and_decisions_follow_the_workers_paths_distributions(photos, monkeypatch):
    """Boxes drawn for `device_crops` against the boxes the workers path draws (recorded from its own calls):
    two-sample Kolmogorov-Smirnov tests on the area fraction and the log aspect ratio, per crop kind, at
    alpha = 1e-3 (2,400 global and 4,800 local boxes a side: critical KS distances 0.056 / 0.040, so a true distance of
    about 0.075 (global) / 0.055 (local) or more is detected with power above 0.9); flips and the photometric
    decisions at the recipe's rates (4.5 sigma)."""
    aug = MultiCropAugmentation(global_crop_size=8, local_crop_size=8, num_local_crops=4)
    image = resized(photos[0], 120, 90)
    recorded = []
    sample = augmentation_module.sample_crop_box

    def recording(rng, width, height, scale, ratio):
        box = sample(rng, width, height, scale, ratio)
        recorded.append((scale, box))
        return box

    monkeypatch.setattr(augmentation_module, "sample_crop_box", recording)
    for seed in range(1200):
        aug.crops_uint8(image, seed)
    workers = {kind: np.array([box for scale, box in recorded if scale == s]) for kind, s in
               (("global", aug.global_crops_scale), ("local", aug.local_crops_scale))}  # fmt: skip
    recorded.clear()
    draws = [
        bp.sample_crop_parameters(aug, np.random.default_rng([7, seed]), 120, 90) for seed in range(1200)
    ]
    boxes = np.stack([d[0] for d in draws])
    device = {"global": boxes[:, :2].reshape(-1, 4), "local": boxes[:, 2:].reshape(-1, 4)}
    for kind in ("global", "local"):
        for name, statistic in (
            ("area", lambda b: b[:, 2] * b[:, 3] / (120 * 90)),
            ("log ratio", lambda b: np.log(b[:, 3] / b[:, 2])),
        ):
            result = scipy.stats.ks_2samp(statistic(workers[kind]), statistic(device[kind]))
            assert result.pvalue > 1e-3, (kind, name, result)
        assert len(workers[kind]) == len(device[kind])

    flips = np.stack([d[1] for d in draws]).astype(float)
    parameters = np.stack([d[2] for d in draws])

    def close(observed, p, count):
        assert abs(observed - p) <= 4.5 * math.sqrt(p * (1 - p) / count) + 1e-9, (observed, p)

    close(flips.mean(), 0.5, flips.size)
    close(parameters[..., bp.JITTER].mean(), 0.8, flips.size)
    close(parameters[..., bp.GRAYSCALE].mean(), 0.2, flips.size)
    close(parameters[:, 1, bp.SOLARIZE].mean(), 0.2, len(draws))
    close(parameters[:, 2:, bp.BLUR].mean(), 0.5, len(draws) * 4)


def test_finished_crops_have_the_cpu_paths_statistics(photos, one_torch_thread):
    """Over 300 images the finished crops of `device_crops` and of the workers path have the same statistics per crop
    position (grayscale share, brightness, colourfulness, sharpness): means within 4.5 standard errors."""
    aug = MultiCropAugmentation(global_crop_size=24, local_crop_size=12, num_local_crops=2)
    images = [resized(photo, 72, 56) for photo in photos]
    device = DeviceCrops(aug)
    stats = {"cpu": [], "device": []}
    for first in range(0, 300, 20):
        batch = SourceBatch(aug)
        for seed in range(first, first + 20):
            image = images[seed % 4]
            batch.add_pixels(image, *bp.sample_crop_parameters(aug, np.random.default_rng([seed, 1]), 72, 56))
            cpu_global, cpu_local = aug.crops_uint8(image, seed)
            cpu = [torch.from_numpy(c).permute(2, 0, 1).float() / 255 for c in [*cpu_global, *cpu_local]]
            stats["cpu"].append(cpu)
        out = device(batch.tensors())
        mean, std = torch.tensor(aug.mean).view(3, 1, 1), torch.tensor(aug.std).view(3, 1, 1)
        for index in range(20):
            crops = [*out.global_crops[index], *out.local_crops[index]]
            stats["device"].append([crop * std + mean for crop in crops])

    def summary(crops):
        return [
            [
                float((c.max(0).values - c.min(0).values).max() < 2 / 255),
                c.mean().item(),
                (c.max(0).values - c.min(0).values).mean().item(),
                (c[:, :, 1:] - c[:, :, :-1]).abs().mean().item(),
            ]
            for c in crops
        ]

    cpu = np.array([summary(c) for c in stats["cpu"]])
    device_stats = np.array([summary(c) for c in stats["device"]])
    for position in range(4):
        for statistic in range(4):
            a, b = cpu[:, position, statistic], device_stats[:, position, statistic]
            spread = math.sqrt((a.var() + b.var()) / len(a)) + 1e-6
            assert abs(a.mean() - b.mean()) < 4.5 * spread, (position, statistic, a.mean(), b.mean())
