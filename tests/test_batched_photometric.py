"""GPU-side photometric augmentation (selfpatch_hf.data.batched_photometric) against the CPU path, on CPU tensors.

Tolerances, in 8-bit grey levels, of each op on identical parameters against the CPU path's OpenCV op (which rounds
to 8 bits; ours stays float): brightness, contrast, saturation, grayscale, blur at most 1; solarisation exact; hue
below 1.5 on average and at most 12 (OpenCV's 8-bit HSV keeps hue in 180 steps and truncates the shift to them; ours is exact).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import albumentations.augmentations.pixel.functional as AF
import cv2
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from selfpatch_hf.data import batched_photometric as bp
from selfpatch_hf.data.augmentation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    pil_gaussian_kernel_1d,
    sample_crop_box,
)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((72, 64), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Several real photographs (saturated colours, skin, sky, dark and bright scenes)."""
    names = ("astronaut", "chelsea", "coffee", "rocket")
    return [
        np.asarray(Image.fromarray(getattr(skimage.data, name)()).resize((48, 40), Image.Resampling.BICUBIC))
        for name in names
    ]


def as_float(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def as_levels(pixels: torch.Tensor) -> np.ndarray:
    return (pixels[0].permute(1, 2, 0) * 255.0).round().clamp(0, 255).numpy().astype(np.int32)


def level_difference(ours: torch.Tensor, reference: np.ndarray) -> np.ndarray:
    return np.abs(as_levels(ours) - reference.astype(np.int32))


# ------------------------------------------------------------------------------------ per-op agreement


@pytest.mark.parametrize("factor", [0.6, 0.85, 1.2, 1.4])
def test_brightness_and_contrast_match_the_cpu_ops_within_one_level(photo, factor):
    ours = bp.adjust_brightness(as_float(photo), torch.tensor([factor]))
    assert level_difference(ours, AF.adjust_brightness_torchvision(photo, factor)).max() <= 1
    ours = bp.adjust_contrast(as_float(photo), torch.tensor([factor]))
    assert level_difference(ours, AF.adjust_contrast_torchvision(photo, factor)).max() <= 1


@pytest.mark.parametrize("factor", [0.8, 0.93, 1.2])
def test_saturation_matches_the_cpu_op_within_one_level(photo, factor):
    ours = bp.adjust_saturation(as_float(photo), torch.tensor([factor]))
    assert level_difference(ours, AF.adjust_saturation_torchvision(photo, factor)).max() <= 1


@pytest.mark.parametrize("shift", [-0.1, -0.04, 0.03, 0.1])
def test_hue_matches_the_cpu_op_up_to_opencv_hue_quantisation(photos, shift):
    for photo in photos:
        difference = level_difference(
            bp.adjust_hue(as_float(photo), torch.tensor([shift])),
            AF.adjust_hue_torchvision(photo.copy(), shift),
        )
        assert difference.mean() < 1.5 and difference.max() <= 12, (difference.mean(), difference.max())
    # a zero shift is the identity (the HSV round trip loses nothing at 8 bits)
    assert level_difference(bp.adjust_hue(as_float(photos[0]), torch.tensor([0.0])), photos[0]).max() == 0


def test_hue_shift_rotates_pure_colours():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    # a third of a turn takes red to green, two thirds to blue
    assert (as_levels(bp.adjust_hue(as_float(red), torch.tensor([1 / 3])))[0, 0] == (0, 255, 0)).all()
    assert (as_levels(bp.adjust_hue(as_float(red), torch.tensor([-1 / 3])))[0, 0] == (0, 0, 255)).all()


def test_grayscale_and_solarisation_match_the_cpu_ops(photo):
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    assert (
        level_difference(bp.to_grayscale(as_float(photo)), np.repeat(gray[..., None], 3, axis=2)).max() <= 1
    )
    reference = AF.solarize(photo, (128 - 0.5) / 255)  # the CPU path's threshold (PIL's 128)
    assert np.array_equal(reference, np.where(photo >= 128, 255 - photo, photo))
    assert level_difference(bp.solarize(as_float(photo)), reference).max() == 0


@pytest.mark.parametrize("sigma", [0.1, 0.35, 0.9, 1.5, 2.0])
def test_blur_uses_pil_kernels_and_matches_the_cpu_op(photo, sigma):
    kernel = bp.pil_gaussian_kernels(torch.tensor([sigma]))[0].double().numpy()
    reference_kernel = pil_gaussian_kernel_1d(sigma)
    pad = (len(kernel) - len(reference_kernel)) // 2
    np.testing.assert_allclose(kernel, np.pad(reference_kernel, pad), atol=1e-6)
    reference = cv2.sepFilter2D(photo, -1, reference_kernel, reference_kernel, borderType=cv2.BORDER_REFLECT)
    assert level_difference(bp.gaussian_blur(as_float(photo), torch.tensor([sigma])), reference).max() <= 1


def test_per_image_kernels_in_one_batch_equal_one_by_one(photos):
    batch = torch.cat([as_float(p) for p in photos])
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    together = bp.gaussian_blur(batch.clone(), sigmas)
    for index, sigma in enumerate(sigmas):
        alone = bp.gaussian_blur(batch[index : index + 1].clone(), sigma.view(1))
        torch.testing.assert_close(together[index : index + 1], alone, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- whole pipeline, one parameter set


def cpu_reference(crop: np.ndarray, row: np.ndarray) -> np.ndarray:
    """The CPU path's ops (albumentations functional, 8-bit after each op), driven by one parameter row."""
    out = crop.copy()
    if row[bp.JITTER] > 0.5:
        ops = (
            AF.adjust_brightness_torchvision,
            AF.adjust_contrast_torchvision,
            AF.adjust_saturation_torchvision,
            AF.adjust_hue_torchvision,
        )
        columns = (bp.BRIGHTNESS, bp.CONTRAST, bp.SATURATION, bp.HUE)
        for op_index in row[bp.ORDER].astype(int):
            out = ops[op_index](out.copy(), float(row[columns[op_index]]))
    if row[bp.GRAYSCALE] > 0.5:
        out = np.repeat(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if row[bp.BLUR] > 0.5:
        kernel = pil_gaussian_kernel_1d(float(row[bp.SIGMA]))
        out = cv2.sepFilter2D(out, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    if row[bp.SOLARIZE] > 0.5:
        out = np.where(out >= 128, 255 - out, out).astype(np.uint8)
    return out


def test_batched_pipeline_equals_the_cpu_ops_applied_one_crop_at_a_time(photos):
    rng = np.random.default_rng(0)
    crops = np.stack([photos[i % len(photos)] for i in range(24)])
    # every crop jittered, half grayscale, half blurred, half solarised, all 24 orders once
    _, parameters = bp.sample_photometric_parameters(rng, [0.5] * 24, [0.5] * 24)
    parameters[:, bp.JITTER] = 1
    parameters[:, bp.ORDER] = np.array(sorted(itertools.permutations(range(4))))
    out = bp.apply_photometric(
        torch.from_numpy(crops), torch.from_numpy(parameters), IMAGENET_MEAN, IMAGENET_STD
    )
    assert out.shape == (24, 3, 40, 48) and out.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for index in range(24):
        ours = ((out[index] * std + mean) * 255.0).round().clamp(0, 255).permute(1, 2, 0).numpy()
        difference = np.abs(
            ours.astype(np.int32) - cpu_reference(crops[index], parameters[index]).astype(np.int32)
        )
        # up to six 8-bit truncations or roundings (and a quantised hue) on the CPU side against none here
        assert difference.mean() < 3 and np.percentile(difference, 99) <= 10, (index, difference.mean())
    # batched = each crop's ops composed one by one, in its own order, in float
    ops = (bp.adjust_brightness, bp.adjust_contrast, bp.adjust_saturation, bp.adjust_hue)
    columns = (bp.BRIGHTNESS, bp.CONTRAST, bp.SATURATION, bp.HUE)
    for index in range(24):
        row = torch.from_numpy(parameters[index])
        pixels = torch.from_numpy(crops[index]).permute(2, 0, 1).unsqueeze(0).float() / 255
        for op_index in row[bp.ORDER].long().tolist():
            pixels = ops[op_index](pixels, row[columns[op_index]].view(1))
        if row[bp.GRAYSCALE]:
            pixels = bp.to_grayscale(pixels)
        if row[bp.BLUR]:
            pixels = bp.gaussian_blur(pixels, row[bp.SIGMA].view(1))
        if row[bp.SOLARIZE]:
            pixels = bp.solarize(pixels)
        torch.testing.assert_close(out[index] * std + mean, pixels[0], atol=1e-5, rtol=0)
    # the order matters: the same factors in another order give another image
    reordered = parameters.copy()
    reordered[:, bp.ORDER] = reordered[:, bp.ORDER][:, ::-1]
    other = bp.apply_photometric(
        torch.from_numpy(crops), torch.from_numpy(reordered), IMAGENET_MEAN, IMAGENET_STD
    )
    assert (other - out).abs().amax(dim=(1, 2, 3)).gt(0.02).sum() >= 20


def test_bad_parameter_shapes_are_rejected(photo):
    with pytest.raises(ValueError, match="parameters of shape"):
        bp.apply_photometric(
            torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.zeros(3, 13), IMAGENET_MEAN, IMAGENET_STD
        )


# ------------------------------------------------------------------------------------ distributions and seeds


def test_parameters_follow_the_recipe_distributions():
    rng = np.random.default_rng(1)
    blur, solarize = bp.crop_probabilities(num_local_crops=8)
    draws = [bp.sample_photometric_parameters(rng, blur, solarize) for _ in range(3000)]
    flips = np.stack([d[0] for d in draws]).astype(float)  # (n, 10)
    parameters = np.stack([d[1] for d in draws])  # (n, 10, 13)
    n = len(draws)

    def close(observed, p, count):
        assert abs(observed - p) <= 4.5 * math.sqrt(p * (1 - p) / count) + 1e-9, (observed, p)

    close(flips.mean(), 0.5, flips.size)
    close(parameters[..., bp.JITTER].mean(), 0.8, n * 10)
    close(parameters[..., bp.GRAYSCALE].mean(), 0.2, n * 10)
    close(parameters[:, 0, bp.BLUR].mean(), 1.0, n)
    close(parameters[:, 1, bp.BLUR].mean(), 0.1, n)
    close(parameters[:, 2:, bp.BLUR].mean(), 0.5, n * 8)
    close(parameters[:, 1, bp.SOLARIZE].mean(), 0.2, n)
    assert parameters[:, [0, *range(2, 10)], bp.SOLARIZE].sum() == 0
    for column, low, high in (
        (bp.BRIGHTNESS, 0.6, 1.4),
        (bp.CONTRAST, 0.6, 1.4),
        (bp.SATURATION, 0.8, 1.2),
        (bp.HUE, -0.1, 0.1),
        (bp.SIGMA, 0.1, 2.0),
    ):
        values = parameters[..., column].ravel()
        assert low <= values.min() and values.max() <= high
        assert abs(values.mean() - (low + high) / 2) < 0.02 * (high - low)
        assert abs(values.std() - (high - low) / math.sqrt(12)) < 0.02 * (high - low)
    orders = Counter(tuple(row) for row in parameters[..., bp.ORDER].reshape(-1, 4).astype(int))
    assert len(orders) == 24 and all(sorted(order) == [0, 1, 2, 3] for order in orders)
    expected = n * 10 / 24
    chi_square = sum((count - expected) ** 2 / expected for count in orders.values())
    assert chi_square < 60  # 23 degrees of freedom: p < 1e-4


@pytest.fixture
def one_torch_thread():
    """Thousands of tiny tensor ops: with two threads they spend their time handing work over (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_device_and_cpu_paths_give_matching_crop_statistics(photos, one_torch_thread):
    """Over many images, the two paths give crops with the same statistics (grayscale share, solarised share,
    brightness, colourfulness, sharpness), per crop position."""
    aug = MultiCropAugmentation(global_crop_size=32, local_crop_size=16, num_local_crops=2)
    stats = {"cpu": [], "device": []}
    for seed in range(400):
        image = photos[seed % len(photos)]
        cpu_global, cpu_local = aug.crops_uint8(image, seed)
        dev_global, dev_local, parameters = bp.crops_with_parameters(aug, image, seed + 10_000)
        dev_global = bp.apply_photometric(
            torch.from_numpy(dev_global), torch.from_numpy(parameters[:2]), (0, 0, 0), (1, 1, 1)
        )
        dev_local = bp.apply_photometric(
            torch.from_numpy(dev_local), torch.from_numpy(parameters[2:]), (0, 0, 0), (1, 1, 1)
        )
        cpu = [torch.from_numpy(c).permute(2, 0, 1).float() / 255 for c in [*cpu_global, *cpu_local]]
        for name, crops in (("cpu", cpu), ("device", [*dev_global, *dev_local])):
            stats[name].append(
                [
                    [
                        float((crop.max(0).values - crop.min(0).values).max() < 2 / 255),  # grayscale
                        crop.mean().item(),
                        (crop.max(0).values - crop.min(0).values).mean().item(),  # colourfulness
                        (crop[:, :, 1:] - crop[:, :, :-1]).abs().mean().item(),  # sharpness
                    ]
                    for crop in crops
                ]
            )
    cpu, device = np.array(stats["cpu"]), np.array(stats["device"])  # (images, crops, statistics)
    for position in range(4):
        for statistic in range(4):
            a, b = cpu[:, position, statistic], device[:, position, statistic]
            spread = math.sqrt((a.var() + b.var()) / len(a)) + 1e-6
            assert abs(a.mean() - b.mean()) < 4.5 * spread, (position, statistic, a.mean(), b.mean())


def test_same_seed_same_crops_and_parameters(photo):
    aug = MultiCropAugmentation(global_crop_size=32, local_crop_size=16, num_local_crops=3)
    first = bp.crops_with_parameters(aug, photo, 7)
    second = bp.crops_with_parameters(aug, photo, np.random.default_rng(7))
    other = bp.crops_with_parameters(aug, photo, 8)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    assert first[0].shape == (2, 32, 32, 3) and first[1].shape == (3, 16, 16, 3) and first[2].shape == (5, 13)
    # the crops are the CPU path's resized crops, drawn first from the image's generator, then flipped as drawn
    rng = np.random.default_rng(7)
    source = torch.from_numpy(photo.copy()).permute(2, 0, 1).unsqueeze(0)
    boxes = [sample_crop_box(rng, *photo.shape[1::-1], aug.global_crops_scale, aug.ratio) for _ in range(2)]
    boxes += [sample_crop_box(rng, *photo.shape[1::-1], aug.local_crops_scale, aug.ratio) for _ in range(3)]
    resized = [aug.resize_crop(source, box, size) for box, size in zip(boxes, aug.crop_sizes)]
    flips, parameters = bp.sample_photometric_parameters(rng, *bp.crop_probabilities(3))
    assert np.array_equal(parameters, first[2])
    for crop, flip, produced in zip(resized, flips, [*first[0], *first[1]]):
        assert np.array_equal(crop[:, ::-1] if flip else crop, produced)


# ------------------------------------------------------------------------------------------- the data loader


def test_loader_runs_the_photometric_ops_on_the_device_reproducibly_and_resumes(tmp_path, photos):
    import io

    import datasets

    from selfpatch_hf.data.streaming import MultiCropDataLoader, load_image_stream

    features = datasets.Features({"image": datasets.Image()})
    images = []
    for index in range(8):
        buffer = io.BytesIO()
        Image.fromarray(photos[index % len(photos)][:, index:]).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    datasets.Dataset.from_dict({"image": images}, features=features).to_parquet(
        str(tmp_path / "train.parquet")
    )
    aug = MultiCropAugmentation(global_crop_size=32, local_crop_size=16, num_local_crops=2)

    def loader(**kwargs):
        dataset, column = load_image_stream(str(tmp_path / "train.parquet"))
        settings = {
            "num_workers": 1,
            "shuffle_buffer_size": 0,
            "seed": 3,
            "device": "cpu",
            "augmentation_device": "device",
        }
        return MultiCropDataLoader(dataset, column, aug, 2, **{**settings, **kwargs})

    batches = list(loader())
    assert len(batches) == 4
    assert batches[0].global_crops.shape == (2, 2, 3, 32, 32) and batches[0].local_crops.shape == (
        2,
        2,
        3,
        16,
        16,
    )
    # example 3 (batch 1, row 1) from its own generator [seed, epoch, rank, worker, index], finished here
    global_crops, local_crops, parameters = bp.crops_with_parameters(
        aug, photos[3][:, 3:], np.random.default_rng([3, 0, 0, 0, 3])
    )
    expected = bp.apply_photometric(
        torch.from_numpy(global_crops), torch.from_numpy(parameters[:2]), aug.mean, aug.std
    )
    torch.testing.assert_close(batches[1].global_crops[1], expected, atol=1e-5, rtol=0)
    expected = bp.apply_photometric(
        torch.from_numpy(local_crops), torch.from_numpy(parameters[2:]), aug.mean, aug.std
    )
    torch.testing.assert_close(batches[1].local_crops[1], expected, atol=1e-5, rtol=0)

    # a run restored after 2 batches continues with the same batches
    first = loader(num_workers=0)
    iterator = iter(first)
    for _ in range(2):
        next(iterator)
    state = first.state_dict()
    del iterator
    resumed = loader(num_workers=0)
    resumed.load_state_dict(state)
    for batch, reference in zip(resumed, batches[2:], strict=True):
        torch.testing.assert_close(batch.global_crops, reference.global_crops, atol=1e-6, rtol=0)
        torch.testing.assert_close(batch.local_crops, reference.local_crops, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="augmentation_device"):
        loader(augmentation_device="cuda")
