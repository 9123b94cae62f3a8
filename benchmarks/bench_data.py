"""Multi-crop data pipeline throughput: selfpatch_hf vs the reference torchvision recipe, measured in one run.

Two measurements, each for both pipelines, interleaved over `--repeats` rounds so that machine noise hits both:

1. per core: decode a 500x375 JPEG and produce 2 x 224 + 8 x 96 normalised crops, one process, one thread
   (`torch.set_num_threads(1)`, `cv2.setNumThreads(1)`);
2. end to end: the same JPEGs in 4 local parquet shards streamed through `datasets`, 2 DataLoader workers, batches of
   `--batch-size` collated into `(B, 2, 3, 224, 224)` and `(B, 8, 3, 96, 96)` tensors; images/s over a whole
   pass, worker start-up included.

The reference is DINO's `DataAugmentationDINO` (torchvision transforms on PIL images, DINO's `GaussianBlur` and
`Solarization` helpers) with SelfPatch's crop scales; its end-to-end loader is a plain DataLoader over the
`datasets` stream with `Image` decoding and the transform applied per example in the workers.

torchvision: PyPI's torchvision wheels are CUDA builds whose compiled operators do not register beside the CPU-only
torch, and the project does not depend on torchvision. If `import torchvision` fails, the script fetches the
matching wheel with `pip download --no-deps` (or uses `--torchvision-dir`, an unpacked wheel), unpacks it under
`--cache-dir` (nothing is installed) and imports it with its operator meta-registrations stubbed out; the
transforms used here are pure Python over PIL and never touch those operators. If that fails too
(`--no-torchvision-download`), the reference runs as the same PIL operations written out with PIL + torch
(`--reference pil`), and the output says so.

    python benchmarks/bench_data.py                      # about a minute on the 2-core CI machine
    python benchmarks/bench_data.py --images 96 --repeats 1   # quick look
    python benchmarks/bench_data.py --worker-shares-only      # only the worker's CPU time by --augmentation_device

The last table is a worker's CPU time per image (one thread) for each `--augmentation_device`, measured interleaved:
`workers` (everything), `device` (decode, crops, flips; photometric ops on the GPU), `device_crops` with nvJPEG
(read the bytes, the JPEG header, draw the crops) and without it (decode in the worker, draw), and the cores a GPU
needs at 2,000 and 4,000 images/s; then the device's share run on this CPU (a GPU's own figures, and its peak
memory: benchmarks/device_check.py).
"""

from __future__ import annotations

import argparse
import glob
import io
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import datasets  # noqa: E402

from selfpatch_hf.data.augmentation import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
)
from selfpatch_hf.data.batched_photometric import apply_photometric, crops_with_parameters  # noqa: E402
from selfpatch_hf.data.decoding import decode_image, read_image_bytes  # noqa: E402
from selfpatch_hf.data.device_crops import DeviceCrops, SourceBatch  # noqa: E402
from selfpatch_hf.data.streaming import build_pretraining_dataloader  # noqa: E402

GLOBAL_SCALE, LOCAL_SCALE, NUM_LOCAL = (0.25, 1.0), (0.05, 0.25), 8


# ----------------------------------------------------------------------------------------------- test images


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """500x375 JPEGs (quality 90): random crops, flips and rescales of scikit-image's colour photographs."""
    import skimage.data

    photos = [
        getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "retina")
    ]
    photos += [skimage.data.hubble_deep_field(), skimage.data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    jpegs = []
    for index in range(count):
        photo = Image.fromarray(photos[index % len(photos)])
        width, height = photo.size
        crop_width = int(width * rng.uniform(0.6, 1.0))
        crop_height = min(height, int(crop_width * 0.75))
        left = int(rng.integers(0, width - crop_width + 1))
        top = int(rng.integers(0, height - crop_height + 1))
        image = photo.crop((left, top, left + crop_width, top + crop_height)).resize(
            (500, 375), Image.BICUBIC
        )
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def write_parquet(jpegs: list[bytes], directory: Path, num_shards: int = 4) -> Path:
    features = datasets.Features({"image": datasets.Image()})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in jpegs]}, features=features
    )
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(num_shards):
        table.shard(num_shards, index, contiguous=True).to_parquet(
            str(directory / f"train-{index:05d}.parquet")
        )
    return directory


# ------------------------------------------------------------------------------------------------ torchvision


def _import_unpacked_torchvision(directory: Path):
    sys.path.insert(0, str(directory))
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]
    # The CUDA wheel's C++ operators are missing beside a CPU torch; their meta registrations are the only import-
    # time use. Stub that module: the PIL transforms below never call the operators.
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision

    return torchvision


def load_torchvision(
    cache_dir: Path, torchvision_dir: str | None, download: bool
) -> tuple[object | None, str]:
    try:
        import torchvision

        return torchvision, f"torchvision {torchvision.__version__} (installed)"
    except Exception as error:  # missing, or a CUDA build beside CPU torch
        first_error = f"{type(error).__name__}: {error}"
    if torchvision_dir:
        module = _import_unpacked_torchvision(Path(torchvision_dir))
        return (
            module,
            f"torchvision {module.__version__} (unpacked wheel {torchvision_dir}, operators stubbed)",
        )
    if not download:
        return None, f"torchvision unavailable ({first_error})"
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    wanted = f"0.{minor + 15}.*" if major == 2 else None
    target = cache_dir / f"torchvision-for-torch-{major}.{minor}"
    if not (target / "torchvision").is_dir():
        wheels = cache_dir / "wheels"
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-d",
            str(wheels),
            f"torchvision=={wanted}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        candidates = sorted(glob.glob(str(wheels / "torchvision-*.whl")))
        if result.returncode != 0 or not candidates:
            return (
                None,
                f"torchvision unavailable ({first_error}; pip download failed: {result.stderr[-300:]})",
            )
        staging = Path(tempfile.mkdtemp(dir=cache_dir))
        with zipfile.ZipFile(candidates[-1]) as wheel:
            wheel.extractall(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    try:
        module = _import_unpacked_torchvision(target)
    except Exception as error:
        return None, f"torchvision unavailable ({first_error}; unpacked wheel failed: {error})"
    return (
        module,
        f"torchvision {module.__version__} (pip-downloaded CUDA wheel, unpacked, operators stubbed)",
    )


class DinoGaussianBlur:
    """DINO `utils.GaussianBlur`."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() <= self.prob:
            return img.filter(
                ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max))
            )
        return img


class DinoSolarization:
    """DINO `utils.Solarization`."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def torchvision_recipe(tv) -> callable:
    """DINO's `DataAugmentationDINO(global_crops_scale, local_crops_scale, local_crops_number)`."""
    transforms = tv.transforms
    flip_and_color_jitter = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
            ),
            transforms.RandomGrayscale(p=0.2),
        ]
    )
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    bicubic = transforms.InterpolationMode.BICUBIC
    global_1 = transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=GLOBAL_SCALE, interpolation=bicubic),
            flip_and_color_jitter,
            DinoGaussianBlur(1.0),
            normalize,
        ]
    )
    global_2 = transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=GLOBAL_SCALE, interpolation=bicubic),
            flip_and_color_jitter,
            DinoGaussianBlur(0.1),
            DinoSolarization(0.2),
            normalize,
        ]
    )
    local = transforms.Compose(
        [
            transforms.RandomResizedCrop(96, scale=LOCAL_SCALE, interpolation=bicubic),
            flip_and_color_jitter,
            DinoGaussianBlur(p=0.5),
            normalize,
        ]
    )

    def recipe(image):
        return [global_1(image), global_2(image)] + [local(image) for _ in range(NUM_LOCAL)]

    return recipe


def pil_recipe() -> callable:
    """The same recipe with the PIL operations torchvision runs for PIL images, written out (no torchvision)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def resized_crop(image, size, scale):
        width, height = image.size
        area = width * height
        for _ in range(10):
            target = area * random.uniform(*scale)
            aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)

    def hue(image, factor):
        h, s, v = image.convert("HSV").split()
        shifted = np.array(h, dtype=np.uint8)
        with np.errstate(over="ignore"):
            shifted += np.int32(factor * 255).astype(np.uint8)
        return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")

    def photometric(image):
        if random.random() < 0.5:
            image = ImageOps.mirror(image)
        if random.random() < 0.8:
            ops = [
                lambda im: ImageEnhance.Brightness(im).enhance(random.uniform(0.6, 1.4)),
                lambda im: ImageEnhance.Contrast(im).enhance(random.uniform(0.6, 1.4)),
                lambda im: ImageEnhance.Color(im).enhance(random.uniform(0.8, 1.2)),
                lambda im: hue(im, random.uniform(-0.1, 0.1)),
            ]
            random.shuffle(ops)
            for op in ops:
                image = op(image)
        if random.random() < 0.2:
            image = image.convert("L").convert("RGB")
        return image

    def to_tensor(image):
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)
        return (pixels - mean) / std

    def crop(image, size, scale, blur_p, solarize_p=0.0):
        out = DinoGaussianBlur(blur_p)(photometric(resized_crop(image, size, scale)))
        return to_tensor(DinoSolarization(solarize_p)(out) if solarize_p else out)

    def recipe(image):
        crops = [crop(image, 224, GLOBAL_SCALE, 1.0), crop(image, 224, GLOBAL_SCALE, 0.1, 0.2)]
        return crops + [crop(image, 96, LOCAL_SCALE, 0.5) for _ in range(NUM_LOCAL)]

    return recipe


# ------------------------------------------------------------------------------------------------ measurements


class OpenCVResizeAugmentation(MultiCropAugmentation):
    """For comparison only: the crop resampled like albumentations' RandomResizedCrop (OpenCV INTER_CUBIC, not
    antialiased when shrinking, not PIL's kernel) instead of PIL-equivalent antialiased bicubic."""

    def resize_crop(self, source, box, size):
        top, left, crop_height, crop_width = box
        pixels = source[0].permute(1, 2, 0).numpy()[top : top + crop_height, left : left + crop_width]
        return cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)


def per_core_ours(jpegs: list[bytes], augmentation_class=MultiCropAugmentation) -> float:
    augmentation = augmentation_class(224, 96, NUM_LOCAL, GLOBAL_SCALE, LOCAL_SCALE)
    start = time.perf_counter()
    for index, data in enumerate(jpegs):
        global_crops, local_crops = augmentation(decode_image(data), rng=index)
    assert global_crops.shape == (2, 3, 224, 224) and local_crops.shape == (NUM_LOCAL, 3, 96, 96)
    return len(jpegs) / (time.perf_counter() - start)


# What a DataLoader worker does per image, by `--augmentation_device` (the rows of the worker-share table).
WORKER_SHARES = {
    "workers": "decode + crops + photometric ops (`workers`)",
    "device": "decode + crops + flips + parameters (`device`)",
    "device_crops": "read bytes + JPEG header + draws (`device_crops`, nvJPEG on the GPU)",
    "device_crops_host_decode": "decode + draws (`device_crops`, no nvJPEG: decoded in the worker)",
    "decode": "(decode alone, for reference)",
}


def worker_share(jpegs: list[bytes], share: str, batch_size: int = 32) -> float:
    """CPU seconds per image (one thread) of what a DataLoader worker does per image in `share` (`WORKER_SHARES`):
    the stream's own per-example calls, from the raw column value to what the worker hands over (for
    `device_crops`, the batch's tensors in shared memory)."""
    augmentation = MultiCropAugmentation(224, 96, NUM_LOCAL, GLOBAL_SCALE, LOCAL_SCALE)
    values = [{"bytes": data, "path": None} for data in jpegs]
    batch = None
    start = time.process_time()
    for index, value in enumerate(values):
        rng = np.random.default_rng([0, 0, 0, 0, index])
        if share == "workers":
            crops = augmentation.crops_uint8(decode_image(value), rng)
        elif share == "device":
            crops = crops_with_parameters(augmentation, decode_image(value), rng)
        elif share == "decode":
            crops = np.asarray(decode_image(value))
        else:
            if batch is None:
                batch = SourceBatch(augmentation, jpegs_on_device=share == "device_crops")
            batch.add_image(*read_image_bytes(value), rng)
            if len(batch) == batch_size or index == len(values) - 1:
                crops = batch.tensors(shared=True)
                batch = None
    seconds = time.process_time() - start
    assert crops is not None
    return seconds / len(values)


def device_share_on_cpu(jpegs: list[bytes], batch_size: int) -> float:
    """Images/s of `apply_photometric` on CPU tensors, 1 thread (on a GPU this part costs the host nothing)."""
    augmentation = MultiCropAugmentation(224, 96, NUM_LOCAL, GLOBAL_SCALE, LOCAL_SCALE)
    items = [
        crops_with_parameters(augmentation, decode_image(data), index) for index, data in enumerate(jpegs)
    ]
    start = time.perf_counter()
    for first in range(0, len(items) - batch_size + 1, batch_size):
        chunk = items[first : first + batch_size]
        parameters = torch.from_numpy(np.stack([item[2] for item in chunk]))
        for position, crops in enumerate(
            (np.stack([item[0] for item in chunk]), np.stack([item[1] for item in chunk]))
        ):
            views = parameters[:, :2] if position == 0 else parameters[:, 2:]
            apply_photometric(torch.from_numpy(crops), views, IMAGENET_MEAN, IMAGENET_STD)
    return (len(items) // batch_size * batch_size) / (time.perf_counter() - start)


def device_crops_on_cpu(jpegs: list[bytes], batch_size: int) -> tuple[float, int]:
    """Images/s of `DeviceCrops` (crops, resizes, flips, photometric ops) on CPU tensors, 1 thread, and the largest
    working set of a batch in bytes (`DeviceCrops.last_working_bytes`; device_check.py measures the GPU's peak)."""
    augmentation = MultiCropAugmentation(224, 96, NUM_LOCAL, GLOBAL_SCALE, LOCAL_SCALE)
    batches = []
    for first in range(0, len(jpegs) - batch_size + 1, batch_size):
        batch = SourceBatch(augmentation)
        for index in range(first, first + batch_size):
            batch.add_image(jpegs[index], None, np.random.default_rng(index))
        batches.append(batch.tensors())
    device_crops = DeviceCrops(augmentation)
    working = 0
    start = time.perf_counter()
    for sources in batches:
        device_crops(sources)
        working = max(working, device_crops.last_working_bytes)
    return len(batches) * batch_size / (time.perf_counter() - start), working


def per_core_reference(jpegs: list[bytes], recipe) -> float:
    random.seed(0)
    torch.manual_seed(0)
    start = time.perf_counter()
    for data in jpegs:
        crops = recipe(Image.open(io.BytesIO(data)).convert("RGB"))
    assert crops[0].shape == (3, 224, 224) and crops[-1].shape == (3, 96, 96)
    return len(jpegs) / (time.perf_counter() - start)


class ReferenceCollate:
    """Applies the reference recipe per example in the DataLoader worker and stacks like our loader does."""

    def __init__(self, recipe):
        self.recipe = recipe

    def __call__(self, examples):
        crops = [self.recipe(example["image"].convert("RGB")) for example in examples]
        global_crops = torch.stack([torch.stack(c[:2]) for c in crops])
        local_crops = torch.stack([torch.stack(c[2:]) for c in crops])
        return global_crops, local_crops


def _single_thread_worker(worker_id):
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0


def _timed_epoch(batches) -> tuple[float, int]:
    """Images/s over a whole pass, worker start-up included (the same for both loaders), and the image count."""
    start, count = time.perf_counter(), 0
    for global_crops, local_crops in batches:
        assert global_crops.shape[1:] == (2, 3, 224, 224) and local_crops.shape[1:] == (NUM_LOCAL, 3, 96, 96)
        count += global_crops.shape[0]
    return count / (time.perf_counter() - start), count


def end_to_end_ours(parquet_dir: Path, batch_size: int, epoch: int) -> tuple[float, int]:
    loader = build_pretraining_dataloader(
        str(parquet_dir),
        MultiCropAugmentation(224, 96, NUM_LOCAL, GLOBAL_SCALE, LOCAL_SCALE),
        batch_size=batch_size,
        num_workers=2,
        shuffle_buffer_size=256,
        pin_memory=False,
    )
    loader.set_epoch(epoch)
    return _timed_epoch(loader)


def end_to_end_reference(parquet_dir: Path, batch_size: int, recipe, epoch: int) -> tuple[float, int]:
    dataset = datasets.load_dataset(str(parquet_dir), split="train", streaming=True)
    dataset = dataset.select_columns(["image"]).shuffle(seed=0, buffer_size=256)
    dataset.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=2,
        collate_fn=ReferenceCollate(recipe),
        worker_init_fn=_single_thread_worker,
        drop_last=True,
    )
    return _timed_epoch(loader)


def print_worker_shares(
    shares: dict[str, list[float]], device_rates: dict[str, list], batch_size: int
) -> None:
    print(
        "CPU time per image of a data worker (1 thread, process CPU time), by --augmentation_device; cores a GPU "
        "needs at this rate:"
    )
    print(
        "| worker share | ms per image (median) | img/s per core | cores for 2,000 img/s | cores for 4,000 img/s |"
    )
    print("|---|---|---|---|---|")
    for share, seconds in shares.items():
        median = statistics.median(seconds)
        rate = 1.0 / median
        print(
            f"| {WORKER_SHARES[share]} | {1000 * median:.2f} | {rate:.0f} | {2000 / rate:.2f} | {4000 / rate:.2f} |"
        )
    decode = statistics.median(shares["decode"])
    read = statistics.median(shares["device_crops"])
    host = statistics.median(shares["device_crops_host_decode"])
    print(
        f"goal (BENCHMARKS.md, Goals): `device_crops` worker share <= 0.5 ms with nvJPEG: {1000 * read:.2f} ms "
        f"({'met' if read <= 5e-4 else 'NOT met'}); without it, decode + 0.5 ms: {1000 * host:.2f} ms vs decode "
        f"{1000 * decode:.2f} ms + 0.5 ({'met' if host <= decode + 5e-4 else 'NOT met'})"
    )
    print()
    print(
        f"The device's share run on this CPU instead (1 thread, batch {batch_size}; a GPU's share costs the host nothing):"
    )
    print("| device share | img/s (median) | ms per image | working set per batch |")
    print("|---|---|---|---|")
    rate = statistics.median(device_rates["photometric"])
    print(f"| photometric ops + normalisation (`device`) | {rate:.1f} | {1000 / rate:.2f} | - |")
    rate = statistics.median(rate for rate, _ in device_rates["device_crops"])
    working = max(bytes_ for _, bytes_ in device_rates["device_crops"])
    print(
        f"| crops + resizes + flips + photometric ops (`device_crops`, decoded pixels in) | {rate:.1f} | "
        f"{1000 / rate:.2f} | {working / 2**20:.0f} MiB (computed; GPU peak: device_check.py) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=160, help="JPEGs for the per-core measurement")
    parser.add_argument("--loader-images", type=int, default=512, help="JPEGs in the parquet shards")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", choices=("torchvision", "pil"), default="torchvision")
    parser.add_argument("--torchvision-dir", help="an unpacked torchvision wheel to import")
    parser.add_argument("--no-torchvision-download", action="store_true")
    parser.add_argument(
        "--worker-shares-only",
        action="store_true",
        help="only the CPU cost of a worker by --augmentation_device (and the device share run on this CPU)",
    )
    parser.add_argument(
        "--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "selfpatch_hf", "bench")
    )
    args = parser.parse_args()
    if min(args.images, args.loader_images, args.batch_size, args.repeats) < 1:
        parser.error("--images, --loader-images, --batch-size and --repeats must be >= 1")

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    datasets.disable_progress_bars()
    load_before = os.getloadavg()[0]
    shares: dict[str, list[float]] = {share: [] for share in WORKER_SHARES}
    device_rates: dict[str, list] = {"photometric": [], "device_crops": []}

    def measure_shares(jpegs: list[bytes]) -> None:
        for share in shares:  # interleaved: each round measures every share once
            shares[share].append(worker_share(jpegs, share, args.batch_size))
        device_rates["photometric"].append(device_share_on_cpu(jpegs, args.batch_size))
        device_rates["device_crops"].append(device_crops_on_cpu(jpegs, args.batch_size))

    if args.worker_shares_only:
        jpegs = make_jpegs(args.images)
        print(f"{args.images} JPEGs 500x375, 2x224 + {NUM_LOCAL}x96 crops; torch {torch.__version__}")
        for repeat in range(args.repeats):
            measure_shares(jpegs)
            print(
                f"  round {repeat + 1}: " + ", ".join(f"{k} {1000 * v[-1]:.2f} ms" for k, v in shares.items())
            )
        print(f"machine load average (1 min) at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
        print()
        print_worker_shares(shares, device_rates, args.batch_size)
        return

    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    recipe, reference_name = None, "PIL + torch re-implementation of the torchvision recipe"
    if args.reference == "torchvision":
        tv, description = load_torchvision(cache_dir, args.torchvision_dir, not args.no_torchvision_download)
        if tv is not None:
            recipe, reference_name = torchvision_recipe(tv), f"torchvision transforms v1 ({description})"
        else:
            print(f"note: {description}; falling back to the PIL re-implementation")
    if recipe is None:
        recipe = pil_recipe()

    jpegs = make_jpegs(max(args.images, args.loader_images))
    print(f"reference: {reference_name}")
    print(
        f"ours: selfpatch_hf (torch resampling + albumentations); torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"per-core: {args.images} JPEGs 500x375, 2x224 + {NUM_LOCAL}x96 crops incl. decode + normalisation")

    with tempfile.TemporaryDirectory() as tmp:
        parquet_dir = write_parquet(jpegs[: args.loader_images], Path(tmp) / "parquet")
        ours_core, ref_core, ours_e2e, ref_e2e, opencv_core = [], [], [], [], []
        for repeat in range(args.repeats):
            ours_core.append(per_core_ours(jpegs[: args.images]))
            ref_core.append(per_core_reference(jpegs[: args.images], recipe))
            opencv_core.append(per_core_ours(jpegs[: args.images], OpenCVResizeAugmentation))
            ours_e2e.append(end_to_end_ours(parquet_dir, args.batch_size, repeat)[0])
            ref_e2e.append(end_to_end_reference(parquet_dir, args.batch_size, recipe, repeat)[0])
            measure_shares(jpegs[: args.images])
            print(
                f"  round {repeat + 1}: per-core ours {ours_core[-1]:.1f} ref {ref_core[-1]:.1f} img/s; "
                f"2 workers ours {ours_e2e[-1]:.1f} ref {ref_e2e[-1]:.1f} img/s"
            )

    def row(name, ours, ref):
        ratio = [o / r for o, r in zip(ours, ref)]
        return (
            f"| {name} | {statistics.median(ours):.1f} (best {max(ours):.1f}) | "
            f"{statistics.median(ref):.1f} (best {max(ref):.1f}) | {statistics.median(ratio):.2f}x |"
        )

    print(f"machine load average (1 min) at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print()
    print(
        "| measurement | selfpatch_hf img/s (median) | reference img/s (median) | ratio (median of rounds) |"
    )
    print("|---|---|---|---|")
    print(row("1 process, 1 thread: decode + multi-crop", ours_core, ref_core))
    print(row(f"parquet stream, 2 workers, batch {args.batch_size}", ours_e2e, ref_e2e))
    print(row("(not used) same, crops resized by OpenCV INTER_CUBIC, 1 thread", opencv_core, ref_core))
    print()
    print_worker_shares(shares, device_rates, args.batch_size)


if __name__ == "__main__":
    main()
