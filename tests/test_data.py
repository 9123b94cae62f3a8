"""Image sources, robust decoding, the multi-crop data loader (sharding, workers, resume) and the sample dataset."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from selfpatch_hf.data.augmentation import MultiCropAugmentation
from selfpatch_hf.data.samples.photographs import SAMPLE_IMAGES, build_sample_dataset, sample_dataset_path
from selfpatch_hf.data.streaming import (
    ImageDecodeError,
    MultiCropDataLoader,
    build_pretraining_dataloader,
    decode_image,
    load_image_stream,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers


def encode(pixels: np.ndarray | Image.Image, format: str = "PNG", **save_kwargs) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_kwargs)
    return buffer.getvalue()


def id_image(index: int, size: tuple[int, int] = (20, 24)) -> bytes:
    """A lossless solid image whose colour encodes `index`."""
    pixels = np.empty((*size, 3), dtype=np.uint8)
    pixels[...] = (index % 256, index // 256, 77)
    return encode(pixels)


def write_parquet_shards(directory: Path, shards: list[list[bytes]]) -> Path:
    """One parquet file per shard, with an `image` (Image feature) and a `label` column."""
    directory.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    for index, images in enumerate(shards):
        rows = {
            "image": [{"bytes": data, "path": None} for data in images],
            "label": list(range(len(images))),
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(directory / f"train-{index:05d}.parquet")
        )
    return directory


def id_shards(num_examples: int, num_shards: int) -> list[list[bytes]]:
    return [
        [id_image(i) for i in range(num_examples) if i % num_shards == shard] for shard in range(num_shards)
    ]


class IdentityCrops(MultiCropAugmentation):
    """Test double: every crop is filled with the image's top-left colour, so a batch tells which examples it holds.
    Normalisation is the identity, so batches carry the raw colour values."""

    def crops_uint8(self, image, rng=None):
        pixel = np.asarray(image.convert("RGB"))[0, 0]
        global_crops = np.empty((2, *self.global_crop_size, 3), dtype=np.uint8)
        local_crops = np.empty((self.num_local_crops, *self.local_crop_size, 3), dtype=np.uint8)
        global_crops[...] = pixel
        local_crops[...] = pixel
        return global_crops, local_crops

    def normalize(self, crops, device=None, pin_memory=False):
        return torch.as_tensor(np.ascontiguousarray(crops)).movedim(-1, -3).float()


def identity_crops() -> IdentityCrops:
    return IdentityCrops(global_crop_size=4, local_crop_size=2, num_local_crops=1)


def batch_ids(batch) -> list[int]:
    colours = batch.global_crops[:, 0, :, 0, 0].long()  # (B, 3)
    assert torch.equal(batch.global_crops[:, 1, :, 0, 0].long(), colours)
    return (colours[:, 0] + 256 * colours[:, 1]).tolist()


def epoch_ids(loader) -> list[int]:
    return [i for batch in loader for i in batch_ids(batch)]


def tiny_augmentation() -> MultiCropAugmentation:
    return MultiCropAugmentation(global_crop_size=16, local_crop_size=8, num_local_crops=2)


def open_loader(path: Path, augmentation=None, **kwargs) -> MultiCropDataLoader:
    dataset, column = load_image_stream(str(path))
    kwargs = {"batch_size": 3, "num_workers": 2, "shuffle_buffer_size": 0, "drop_last": False, **kwargs}
    return MultiCropDataLoader(dataset, column, augmentation or identity_crops(), **kwargs)


@pytest.fixture(autouse=True)
def _quiet_datasets(monkeypatch):
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    datasets.disable_progress_bars()


# ------------------------------------------------------------------------------------------------ sources


def test_local_sources_are_streamed_with_the_image_column_found(tmp_path):
    ids = list(range(6))
    write_parquet_shards(tmp_path / "parquet", id_shards(6, 2))
    for class_name in ("cat", "dog"):
        (tmp_path / "folder" / "train" / class_name).mkdir(parents=True)
    for i in ids:
        (tmp_path / "folder" / "train" / ("cat" if i % 2 else "dog") / f"{i}.png").write_bytes(id_image(i))
    (tmp_path / "wds").mkdir()
    for shard in range(2):
        with tarfile.open(tmp_path / "wds" / f"shard-{shard}.tar", "w") as archive:
            for i in ids[shard::2]:
                for name, payload in ((f"{i:04d}.png", id_image(i)), (f"{i:04d}.cls", b"1")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))

    cases = {
        str(tmp_path / "parquet"): "image",
        str(tmp_path / "parquet" / "*.parquet"): "image",
        str(tmp_path / "parquet" / "train-00001.parquet"): "image",
        str(tmp_path / "folder"): "image",
        str(tmp_path / "folder" / "**" / "*.png"): "image",
        str(tmp_path / "wds"): "png",
        str(tmp_path / "wds" / "*.tar"): "png",
    }
    for source, expected_column in cases.items():
        dataset, column = load_image_stream(source)
        assert column == expected_column, source
        assert list(dataset.features) == [column]  # labels dropped
        assert dataset.features[column] == datasets.Image(decode=False)
        found = sorted(int(np.asarray(decode_image(ex[column], min_size=1))[0, 0, 0]) for ex in dataset)
        assert found == ([1, 3, 5] if source.endswith("00001.parquet") else ids), source


def test_prepared_dataset_is_iterated_with_the_requested_shards(tmp_path):
    write_parquet_shards(tmp_path / "data", id_shards(6, 1))
    dataset, column = load_image_stream(
        str(tmp_path / "data"), streaming=False, num_shards=3, cache_dir=str(tmp_path / "cache")
    )
    assert dataset.num_shards == 3
    assert sorted(int(np.asarray(decode_image(ex[column], 1))[0, 0, 0]) for ex in dataset) == list(range(6))
    with pytest.raises(ValueError, match="streaming=False"):
        load_image_stream(str(tmp_path / "data"), num_shards=3)


def test_image_column_choice_and_errors(tmp_path):
    features = datasets.Features(
        {"image": datasets.Image(), "mask": datasets.Image(), "label": datasets.Value("int64")}
    )
    rows = {"image": [{"bytes": id_image(1), "path": None}], "mask": [{"bytes": id_image(2), "path": None}]}
    rows["label"] = [0]
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    source = str(tmp_path / "train.parquet")
    with pytest.raises(
        ValueError, match=r"several Image columns.*image \(Image\), mask \(Image\), label \(Value\)"
    ):
        load_image_stream(source)
    dataset, column = load_image_stream(source, image_column="mask")
    assert column == "mask"
    assert np.asarray(decode_image(next(iter(dataset))["mask"], min_size=1))[0, 0, 0] == 2
    with pytest.raises(ValueError, match=r"No column 'photo'.*Available columns: image \(Image\)"):
        load_image_stream(source, image_column="photo")
    with pytest.raises(ValueError, match="not images"):
        load_image_stream(source, image_column="label")


def test_missing_sources_raise_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_stream(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="No file matches"):
        load_image_stream(str(tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No readable data files"):
        load_image_stream(str(tmp_path / "empty"))
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="Cannot tell how to read"):
        load_image_stream(str(tmp_path / "notes.csv"))
    # A Hub name without network: the error says how to work offline (huggingface_hub reads the flag at import).
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="sample_dataset_path"):
        load_image_stream("someone/some-images")


def test_hub_dataset_streams_from_a_hub_server_with_token(tmp_path):
    """A private parquet dataset repo on the loopback Hub: read with an explicit token, refused without one."""
    from hub_server import LoopbackHub
    from huggingface_hub import HfApi

    write_parquet_shards(tmp_path / "repo", id_shards(5, 2))
    code = """
import sys
from selfpatch_hf.data.augmentation import MultiCropAugmentation
from selfpatch_hf.data.streaming import build_pretraining_dataloader, load_image_stream
name, token = sys.argv[1], sys.argv[2]
try:
    load_image_stream(name)
except FileNotFoundError as error:
    assert "hf auth login" in str(error) and "HF_TOKEN" in str(error), error
else:
    raise AssertionError("a private dataset was read without a token")
loader = build_pretraining_dataloader(
    name, MultiCropAugmentation(16, 8, 1), batch_size=5, token=token, num_workers=0, shuffle_buffer_size=0
)
(batch,) = list(loader)
assert batch.global_crops.shape == (5, 2, 3, 16, 16), batch.global_crops.shape
print("OK")
"""
    with LoopbackHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("loopback-user/tiny-images", repo_type="dataset", private=True)
        api.upload_folder(
            folder_path=tmp_path / "repo", repo_id="loopback-user/tiny-images", repo_type="dataset"
        )
        env = {
            **os.environ,
            **hub.client_env(tmp_path / "hf_home", token=False),
            "PYTHONPATH": str(REPO_ROOT),
        }
        env.pop("HF_TOKEN", None)
        result = subprocess.run(
            [sys.executable, "-c", code, "loopback-user/tiny-images", hub.token],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ decoding


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """A 40x20 (w x h) JPEG stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif), np.rot90(stored, k=-1)


def test_decode_converts_every_pixel_format_to_rgb():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(18, 20), dtype=np.uint8)
    out = np.asarray(decode_image({"bytes": encode(gray), "path": None}))
    assert out.shape == (18, 20, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))

    rgba = rng.integers(0, 256, size=(18, 20, 4), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(decode_image(encode(rgba))), rgba[..., :3])  # alpha dropped

    palette = Image.fromarray(
        np.array([[0, 1], [2, 1]], dtype=np.uint8).repeat(10, 0).repeat(10, 1), mode="P"
    )
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (3 * 253))
    palette.info["transparency"] = 2
    out = np.asarray(decode_image(encode(palette)))
    assert (
        tuple(out[0, 0]) == (255, 0, 0)
        and tuple(out[0, 15]) == (0, 255, 0)
        and tuple(out[15, 0]) == (0, 0, 255)
    )

    sixteen = np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16).repeat(16, 0).repeat(4, 1)
    image16 = Image.fromarray(sixteen)
    assert image16.mode.startswith("I;16")
    out = np.asarray(decode_image(encode(image16)))
    np.testing.assert_array_equal(out[0, ::4, 0], [0, 100, 255, 128])

    wide = Image.fromarray(np.array([[0, 40000, 65535, 200]], dtype=np.int32).repeat(16, 0).repeat(4, 1))
    assert wide.mode == "I"  # 32-bit integers holding 16-bit data (e.g. from TIFF)
    np.testing.assert_array_equal(np.asarray(decode_image(encode(wide, "TIFF")))[0, ::4, 0], [0, 156, 255, 1])
    unit_float = Image.fromarray(
        np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32).repeat(16, 0).repeat(4, 1)
    )
    np.testing.assert_array_equal(
        np.asarray(decode_image(encode(unit_float, "TIFF")))[0, ::4, 0], [0, 128, 255, 64]
    )

    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    out = np.asarray(decode_image(encode(cmyk, "JPEG", quality=95))).astype(int)
    assert np.abs(out - np.array([0, 255, 255])).max() <= 8

    data, upright = exif_rotated_jpeg()
    out = np.asarray(decode_image(data)).astype(int)
    assert out.shape == (40, 20, 3)
    assert (
        np.abs(out[2, 10] - upright[2, 10]).max() <= 16 and np.abs(out[37, 10] - upright[37, 10]).max() <= 16
    )
    assert out[2, 10, 0] > 200 and out[37, 10, 2] > 200  # red on top, blue at the bottom


def test_decode_rejects_unusable_images_with_a_reason(tmp_path):
    good_jpeg = encode(np.full((32, 32, 3), 128, dtype=np.uint8), "JPEG")
    cases = {
        "unreadable": [
            b"not an image at all",
            good_jpeg[: len(good_jpeg) // 2],
            b"",
            {"bytes": None, "path": None},
        ],
        "too_small": [encode(np.zeros((8, 40, 3), dtype=np.uint8))],
        "unsupported_mode": [encode(Image.fromarray(np.full((20, 20), np.nan, dtype=np.float32)), "TIFF")],
    }
    for reason, values in cases.items():
        for value in values:
            with pytest.raises(ImageDecodeError) as caught:
                decode_image(value, min_size=16)
            assert caught.value.reason == reason
    with pytest.raises(ImageDecodeError, match="cannot read"):
        decode_image({"bytes": None, "path": str(tmp_path / "gone.jpg")})
    path = tmp_path / "ok.jpg"
    path.write_bytes(good_jpeg)
    assert decode_image({"bytes": None, "path": str(path)}).size == (32, 32)


# ------------------------------------------------------------------------------------------------ the loader


def test_batches_have_the_documented_shapes(tmp_path):
    write_parquet_shards(tmp_path / "data", id_shards(7, 2))
    augmentation = MultiCropAugmentation(global_crop_size=(16, 12), local_crop_size=8, num_local_crops=0)
    loader = open_loader(
        tmp_path / "data", augmentation, batch_size=3, num_workers=0, drop_last=True, device="cpu"
    )
    batches = list(loader)
    assert len(batches) == 2  # one in-process stream of 7 examples: 2 full batches of 3
    for global_crops, local_crops in batches:
        assert global_crops.shape == (3, 2, 3, 16, 12) and global_crops.dtype == torch.float32
        assert local_crops.shape == (3, 0, 3, 8, 8)
    assert loader.epoch == 1  # a finished pass moves to the next epoch


@pytest.mark.parametrize("num_shards, expected_split", [(4, "shards"), (1, "examples")])
def test_workers_read_every_example_once(tmp_path, num_shards, expected_split):
    write_parquet_shards(tmp_path / "data", id_shards(23, num_shards))
    loader = open_loader(tmp_path / "data", num_workers=2, shuffle_buffer_size=5)
    assert loader.worker_split == expected_split
    ids = epoch_ids(loader)
    assert sorted(ids) == list(range(23))
    assert ids != sorted(ids)  # shuffled


@pytest.mark.parametrize(
    "num_shards, num_workers, expected_split",
    [(4, 0, "shards"), (3, 0, "shards"), (4, 2, "shards"), (2, 2, "examples"), (3, 2, "examples")],
)
def test_ranks_read_disjoint_parts(tmp_path, num_shards, num_workers, expected_split):
    """2 ranks, num_shards divisible by world_size or not; per-(rank, worker) shards or a per-rank example split."""
    write_parquet_shards(tmp_path / "data", id_shards(22, num_shards))
    parts = []
    for rank in range(2):
        loader = open_loader(
            tmp_path / "data", num_workers=num_workers, rank=rank, world_size=2, shuffle_buffer_size=4, seed=3
        )
        assert loader.worker_split == expected_split
        parts.append(epoch_ids(loader))
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(22))
    assert min(len(part) for part in parts) >= 4  # both ranks got work


def test_unusable_images_are_skipped_counted_and_logged(tmp_path, caplog):
    bad = [b"garbage", encode(np.zeros((40, 40, 3), np.uint8), "JPEG")[:100], id_image(99, size=(4, 4))]
    shards = id_shards(10, 2)
    shards[0].insert(1, bad[0])
    shards[1][2:2] = bad[1:]
    write_parquet_shards(tmp_path / "data", shards)
    loader = open_loader(tmp_path / "data", num_workers=2, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="selfpatch_hf.data.streaming"):
        ids = epoch_ids(loader)
    assert sorted(ids) == list(range(10))
    assert loader.skipped_images == 3
    assert loader.skipped_images_by_reason == {"unreadable": 2, "too_small": 1}
    warnings = [record.getMessage() for record in caplog.records if "Skipped" in record.getMessage()]
    assert warnings and sum(int(message.split()[1]) for message in warnings) == 3
    assert "too_small" in " ".join(warnings) and "unreadable" in " ".join(warnings)
    # The count survives epochs and a state_dict round trip.
    state = loader.state_dict()
    restored = open_loader(tmp_path / "data", num_workers=2, batch_size=2)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.skipped_images == 3


@pytest.mark.parametrize(
    "num_shards, num_workers, rank, world_size",
    [(4, 2, 0, 1), (1, 2, 0, 1), (3, 0, 0, 1), (5, 1, 1, 2)],
    ids=["worker-shards", "worker-examples", "in-process", "rank-1-of-2"],
)
def test_resume_continues_with_the_same_batches(tmp_path, num_shards, num_workers, rank, world_size):
    """Stop after n batches, restore the state in a new loader: the next batches equal the uninterrupted run's."""
    shards = id_shards(20 * world_size, num_shards)
    for shard in shards:
        shard.insert(1, b"corrupt")
    write_parquet_shards(tmp_path / "data", shards)

    def fresh():
        return open_loader(
            tmp_path / "data",
            tiny_augmentation(),
            num_workers=num_workers,
            rank=rank,
            world_size=world_size,
            batch_size=2,
            seed=11,
            drop_last=True,
        )

    reference = fresh()
    reference.set_epoch(1)
    full = list(reference)
    assert len(full) >= 8
    for stop_after in (3, 4):
        interrupted = fresh()
        interrupted.set_epoch(1)
        head = []
        for batch in interrupted:
            head.append(batch)
            if len(head) == stop_after:
                break
        state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint would store it
        resumed = fresh()
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # what a training loop does on resume: a no-op for the saved epoch
        tail = list(resumed)
        assert len(head) + len(tail) == len(full)
        for got, expected in zip(head + tail, full):
            assert torch.equal(got.global_crops, expected.global_crops)
            assert torch.equal(got.local_crops, expected.local_crops)
        assert resumed.skipped_images == reference.skipped_images >= 1
        assert resumed.epoch == 2


def test_resume_with_a_shuffle_buffer_never_repeats_examples(tmp_path):
    write_parquet_shards(tmp_path / "data", id_shards(40, 4))
    loader = open_loader(tmp_path / "data", num_workers=2, batch_size=3, shuffle_buffer_size=4, seed=5)
    seen = []
    for batch in loader:
        seen += batch_ids(batch)
        if len(seen) >= 12:
            break
    resumed = open_loader(tmp_path / "data", num_workers=2, batch_size=3, shuffle_buffer_size=4, seed=5)
    resumed.load_state_dict(loader.state_dict())
    rest = epoch_ids(resumed)
    assert not set(seen) & set(rest)
    assert len(set(rest)) == len(rest)
    # Only examples that sat in the two workers' shuffle buffers are lost.
    assert 40 - 2 * 4 <= len(seen) + len(rest) <= 40


def test_seed_and_epoch_determine_the_stream(tmp_path):
    write_parquet_shards(tmp_path / "data", id_shards(24, 4))

    def run(seed, epoch, augmentation=None):
        loader = open_loader(tmp_path / "data", augmentation, num_workers=2, shuffle_buffer_size=8, seed=seed)
        loader.set_epoch(epoch)
        return list(loader)

    first, again = run(1, 0, tiny_augmentation()), run(1, 0, tiny_augmentation())
    assert all(torch.equal(a.global_crops, b.global_crops) for a, b in zip(first, again))
    assert all(torch.equal(a.local_crops, b.local_crops) for a, b in zip(first, again))
    orders = {
        (seed, epoch): [i for b in run(seed, epoch) for i in batch_ids(b)]
        for seed in (1, 2)
        for epoch in (0, 1)
    }
    assert len({tuple(order) for order in orders.values()}) == 4
    assert all(sorted(order) == list(range(24)) for order in orders.values())
    # Without set_epoch, the second pass is epoch 1.
    loader = open_loader(tmp_path / "data", num_workers=2, shuffle_buffer_size=8, seed=1)
    assert epoch_ids(loader) == orders[(1, 0)] and epoch_ids(loader) == orders[(1, 1)]


def test_resume_with_other_settings_is_refused(tmp_path):
    write_parquet_shards(tmp_path / "data", id_shards(6, 2))
    state = open_loader(tmp_path / "data", num_workers=2).state_dict()
    with pytest.raises(ValueError, match="num_workers: saved 2, now 0"):
        open_loader(tmp_path / "data", num_workers=0).load_state_dict(state)


# ------------------------------------------------------------------------------------------------ sample dataset


def test_sample_dataset_is_built_once_and_loads(tmp_path):
    path = sample_dataset_path(cache_dir=tmp_path, num_shards=2)
    shards = sorted(path.glob("*.parquet"))
    assert len(shards) == 2
    stamp = shards[0].stat().st_mtime_ns
    assert sample_dataset_path(cache_dir=tmp_path, num_shards=2) == path
    assert shards[0].stat().st_mtime_ns == stamp  # cached, not rebuilt

    table = datasets.load_dataset(str(path), split="train")
    assert table.num_rows == len(SAMPLE_IMAGES)
    assert isinstance(table.features["image"], datasets.Image)
    licences = dict(zip(table["name"], table["license"]))
    assert licences == {image.name: image.license for image in SAMPLE_IMAGES}
    assert set(licences.values()) <= {"Public domain", "CC0 1.0", "No known copyright restrictions"}

    loader = build_pretraining_dataloader(
        str(path), tiny_augmentation(), batch_size=4, num_workers=0, shuffle_buffer_size=0
    )
    batches = list(loader)
    assert len(batches) == len(SAMPLE_IMAGES) // 4 and loader.skipped_images == 0


def test_build_sample_dataset_writes_the_requested_shards(tmp_path):
    build_sample_dataset(tmp_path, num_shards=3)
    assert len(list(tmp_path.glob("train-*-of-00003.parquet"))) == 3
    assert "CC0" in (tmp_path / "README.md").read_text()
