"""Image entries given only as a path are read where the user's source allows it, never at a URL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_data import batch_ids, id_image, identity_crops

from selfpatch_hf.data.streaming import (
    ImagePaths,
    MultiCropDataLoader,
    decode_image,
    image_paths_of_source,
    load_image_stream,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_datasets(monkeypatch):
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    datasets.disable_progress_bars()


@pytest.fixture
def image_server():
    """A loopback HTTP server that serves a valid image and counts the requests it gets."""
    requests = []
    body = id_image(200)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def write_crafted_parquet(folder: Path, entries: list[dict]) -> Path:
    """A parquet shard whose Image column holds the given {"bytes", "path"} entries as they are (no embedding)."""
    folder.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image()})
    table = pa.Table.from_pydict({"image": entries}, schema=features.arrow_schema)
    pq.write_table(table, folder / "train-00000.parquet")
    return folder


def test_a_crafted_dataset_cannot_make_training_read_files_or_send_requests(tmp_path, image_server):
    url, requests = image_server
    secret = tmp_path / "private" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(id_image(100))
    source = write_crafted_parquet(
        tmp_path / "dataset",
        [
            {"bytes": id_image(1), "path": None},
            {"bytes": None, "path": str(secret)},
            {"bytes": None, "path": str(tmp_path / "dataset" / ".." / "private" / "secret.png")},
            {"bytes": None, "path": f"{url}/image.png"},
            {"bytes": None, "path": f"zip://image.png::{url}/archive.zip"},
            {"bytes": id_image(2), "path": None},
        ],
    )
    dataset, column = load_image_stream(str(source))
    assert dataset.image_paths == ImagePaths(local=(str(source),))
    loader = MultiCropDataLoader(
        dataset, column, identity_crops(), batch_size=6, num_workers=0, shuffle_buffer_size=0, drop_last=False
    )
    (batch,) = list(loader)
    assert sorted(batch_ids(batch)) == [1, 2]  # only the images that carry their bytes
    assert requests == []  # no request was sent
    assert loader.skipped_images_by_reason["unreadable"] == 4


def test_paths_inside_the_named_source_are_read(tmp_path):
    folder = tmp_path / "photos" / "cats"
    folder.mkdir(parents=True)
    for index in range(3):
        (folder / f"{index}.png").write_bytes(id_image(10 + index))
    (tmp_path / "elsewhere.png").write_bytes(id_image(99))
    for source in (str(tmp_path / "photos"), str(folder / "*.png")):
        dataset, column = load_image_stream(source)
        loader = MultiCropDataLoader(
            dataset, column, identity_crops(), batch_size=3, num_workers=0, shuffle_buffer_size=0
        )
        assert sorted(i for batch in loader for i in batch_ids(batch)) == [10, 11, 12]
        assert not dataset.image_paths.allows(str(tmp_path / "elsewhere.png"))
    # a glob of images allows exactly those files
    assert image_paths_of_source(str(folder / "*.png")).local == tuple(
        sorted(str(p) for p in folder.iterdir())
    )
    # an opened dataset without image_paths: paths are read only where the caller allows
    dataset, column = load_image_stream(str(tmp_path / "photos"))
    del dataset.image_paths
    refused = MultiCropDataLoader(
        dataset, column, identity_crops(), batch_size=3, num_workers=0, shuffle_buffer_size=0
    )
    assert list(refused) == [] and refused.skipped_images == 3
    allowed = MultiCropDataLoader(
        dataset,
        column,
        identity_crops(),
        batch_size=3,
        num_workers=0,
        shuffle_buffer_size=0,
        image_paths=ImagePaths.of_folders(tmp_path / "photos"),
    )
    assert len(list(allowed)) == 1


def test_image_paths_rules(tmp_path):
    paths = ImagePaths(local=(str(tmp_path / "data"),), hub_dataset="user/photos")
    assert paths.allows(str(tmp_path / "data" / "a" / "b.jpg"))
    assert paths.allows(f"file://{tmp_path / 'data' / 'b.jpg'}")
    assert paths.allows(f"zip://b.jpg::{tmp_path / 'data' / 'images.zip'}")
    assert paths.allows("hf://datasets/user/photos@0123abcd/train/b.jpg")
    assert paths.allows("zip://b.jpg::hf://datasets/user/photos@main/train.zip")
    assert not paths.allows(str(tmp_path / "data" / ".." / "other" / "b.jpg"))
    assert not paths.allows(str(tmp_path / "data-other" / "b.jpg"))  # a sibling with the same prefix
    assert not paths.allows("hf://datasets/user/photos-private/b.jpg")
    assert not paths.allows("hf://datasets/someone/else@main/b.jpg")
    assert not paths.allows("https://example.com/b.jpg")
    assert not paths.allows("zip://b.jpg::https://example.com/a.zip")
    assert not paths.allows(f"https://x/y::{tmp_path / 'data' / 'images.zip'}")
    assert not ImagePaths().allows(str(tmp_path / "data" / "b.jpg"))
    assert image_paths_of_source("user/photos") == ImagePaths(hub_dataset="user/photos")
    (tmp_path / "shard.parquet").write_bytes(b"")
    assert image_paths_of_source(str(tmp_path / "shard.parquet")) == ImagePaths()


def test_decode_image_called_directly_reads_local_paths_but_never_urls(tmp_path, image_server):
    url, requests = image_server
    (tmp_path / "a.png").write_bytes(id_image(5))
    assert np.asarray(decode_image(str(tmp_path / "a.png")))[0, 0, 0] == 5
    assert np.asarray(decode_image({"bytes": None, "path": str(tmp_path / "a.png")}))[0, 0, 0] == 5
    with pytest.raises(ValueError, match="refused to follow the image path"):
        decode_image({"bytes": None, "path": f"{url}/a.png"})
    with pytest.raises(ValueError, match="refused to follow the image path"):
        decode_image(f"{url}/a.png")
    with pytest.raises(
        ValueError, match=r"refused .* \(nowhere: this source's images must carry their bytes\)"
    ):
        decode_image({"bytes": None, "path": str(tmp_path / "a.png")}, image_paths=ImagePaths())
    assert requests == []


def test_a_hub_imagefolder_streams_its_own_files(tmp_path):
    """A streamed imagefolder repo on the loopback Hub yields hf:// paths of that repo: they are read."""
    from hub_server import LoopbackHub
    from huggingface_hub import HfApi

    folder = tmp_path / "repo" / "train" / "cats"
    folder.mkdir(parents=True)
    for index in range(4):
        Image.open(__import__("io").BytesIO(id_image(20 + index))).save(folder / f"{index}.png")
    code = """
import sys
from selfpatch_hf.data.streaming import build_pretraining_dataloader
from test_data import batch_ids, identity_crops
loader = build_pretraining_dataloader(
    sys.argv[1], identity_crops(), batch_size=4, token=sys.argv[2], num_workers=0, shuffle_buffer_size=0
)
print("IDS", sorted(i for batch in loader for i in batch_ids(batch)), "SKIPPED", loader.skipped_images)
print("PATHS", loader.image_paths)
"""
    with LoopbackHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("loopback-user/cat-folder", repo_type="dataset")
        api.upload_folder(
            folder_path=tmp_path / "repo", repo_id="loopback-user/cat-folder", repo_type="dataset"
        )
        env = {
            **os.environ,
            **hub.client_env(tmp_path / "hf_home", token=False),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]),
        }
        result = subprocess.run(
            [sys.executable, "-c", code, "loopback-user/cat-folder", hub.token],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert "IDS [20, 21, 22, 23] SKIPPED 0" in result.stdout, result.stdout + result.stderr[-3000:]
