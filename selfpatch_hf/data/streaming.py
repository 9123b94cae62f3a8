"""Multi-crop batches from an image stream, per rank and resumable: the DataLoader workers' stream and its loader.

The pieces, in data-flow order: `selfpatch_hf.data.sources` opens the images (`load_image_stream`),
`selfpatch_hf.data.decoding` decodes them (`decode_image`, skip reasons), `selfpatch_hf.data.augmentation` holds the
multi-crop recipe, and this module runs them in DataLoader workers and batches the result. Where the crops are
finished is `augmentation_device`: in the workers (`selfpatch_hf.data.augmentation`), photometric ops on the training
device (`selfpatch_hf.data.batched_photometric`), or decode, crops and photometric ops on the device
(`selfpatch_hf.data.device_crops`). The resumable position is `selfpatch_hf.data.stream_state.StreamPosition`. The
names of `sources` and `decoding` are importable from here too.

`MultiCropDataLoader(dataset, image_column, augmentation, batch_size, *, num_workers=2, rank=0, world_size=1, seed=0,
shuffle_buffer_size=1000, drop_last=True, min_image_size=16, pin_memory=None, prefetch_factor=2, token=None,
device=None, augmentation_device="workers", image_paths=None, jpeg_decoder="auto")` iterates
`MultiCropBatch(global_crops (B, 2, 3, H, W), local_crops (B, L, 3, h, w))` named tuples (float32, normalised), one
epoch per `for` loop, and has:

- `set_epoch(epoch)`: new shard order, shuffle buffer order and crops per epoch. A completed pass moves `epoch` on by
  one by itself, so a loop without `set_epoch` still sees a new order each epoch.
- `state_dict()` / `load_state_dict(state)`: this rank's stream position (JSON-serialisable). A run restored from
  it continues with the next unseen examples and, for the same settings, produces the same batches as the
  uninterrupted run, except that examples that sat in a shuffle buffer are lost (`datasets` does not save buffer
  contents); with `shuffle_buffer_size=0` the continuation is exact. A `for` loop that stops early and starts
  again also continues where it stopped.
- `skipped_images` / `skipped_images_by_reason`: unusable images (corrupt, truncated, too small, unsupported
  pixel format) skipped on this rank since the start of training, summed over workers; every batch that brings
  new skips is reported with `logging.warning`.

Each rank reads its own part of the data, and inside a rank each DataLoader worker decodes and augments its own
examples. The split uses `datasets.distributed.split_dataset_by_node`, on the shuffled stream (same seed on every
rank, so the parts are disjoint and together cover the data once per epoch):

- when there are at least as many shards as readers (`world_size * num_workers`), each (rank, worker) pair is a
  reader of whole shards (`split_dataset_by_node(dataset, rank * num_workers + worker, world_size * num_workers,
  strategy="shards")`): no shard is read twice;
- otherwise (few shards, e.g. one imagefolder archive) the ranks split with `split_dataset_by_node(dataset, rank,
  world_size)` (whole shards when `num_shards % world_size == 0`, else every rank reads all shards and keeps every
  `world_size`-th example), and every worker of a rank reads the rank's stream and keeps every `num_workers`-th
  example: the raw bytes are read once per worker, but all workers stay busy.

Do not pass this loader to `accelerator.prepare` (each rank reads its own part: nothing to dispatch). Ranks may
yield different numbers of batches; a DDP loop must stop all ranks together (e.g. a fixed number of steps per
epoch, or `accelerator.join_uneven_inputs`). Batches are returned in a fixed round-robin order over workers (not
arrival order), so the sequence of batches depends only on the data, the seed, the epoch and the settings, and a
resumed run can continue it.

The crops of an example are drawn from `numpy.random.default_rng([seed, epoch, rank, worker, index])`, `index`
counting the examples the worker has read this epoch, so a resumed run reproduces the same crops. Resuming needs the
same `rank`, `world_size`, `num_workers`, `batch_size`, `seed` and `shuffle_buffer_size`.

`build_pretraining_dataloader(source, augmentation=None, batch_size=64, *, split="train", image_column=None, token=None,
streaming=True, **loader_kwargs)` opens `source` (anything `load_image_stream` accepts, or an opened
`IterableDataset`) and returns the loader.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import sys
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node

from selfpatch_hf.data.augmentation import MultiCropAugmentation
from selfpatch_hf.data.batched_photometric import NUM_PARAMETERS, apply_photometric, crops_with_parameters
from selfpatch_hf.data.decoding import (
    SKIP_REASONS,
    ImageDecodeError,
    JpegDecoder,
    decode_image,
    device_jpeg_decoder,
    read_image_bytes,
)
from selfpatch_hf.data.device_crops import DeviceCrops, SourceBatch
from selfpatch_hf.data.sources import (
    ImagePaths,
    as_raw_image_stream,
    hub_dataset_id,
    image_paths_of_source,
    load_image_stream,
)
from selfpatch_hf.data.stream_state import STATE_VERSION, StreamPosition
from selfpatch_hf.models.selfpatch.recipes import NUM_GLOBAL_CROPS

logger = logging.getLogger(__name__)

AUGMENTATION_DEVICES = ("workers", "device", "device_crops")
# datasets >= 5 can hand out whole shards to readers even when they do not divide evenly; older versions fall back
# to their "auto" rule (shards only when num_shards % readers == 0).
_SHARDS_STRATEGY = (
    {"strategy": "shards"} if "strategy" in inspect.signature(split_dataset_by_node).parameters else {}
)
_MAX_SKIP_MESSAGES = 3  # per batch; the counts are complete, the examples in the log are a sample


class MultiCropBatch(NamedTuple):
    global_crops: torch.Tensor  # (B, 2, 3, H, W)
    local_crops: torch.Tensor  # (B, L, 3, h, w)


def _identity(item: Any) -> Any:
    return item


def _init_worker(worker_id: int) -> None:
    # Workers share the machine's cores with the training process: one thread each, or the
    # workers' default thread pools (one thread per core each) oversubscribe the cores.
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # albumentations brings OpenCV; without it there is nothing to limit
        pass
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    import fsspec.asyn

    fsspec.asyn.reset_lock()  # forked fsspec event-loop locks would hang remote reads


@contextlib.contextmanager
def _opencv_pool_stopped(forking: bool) -> Iterator[None]:
    # OpenCV's thread pool does not survive fork(): a worker forked while the parent's pool threads exist inherits
    # the pool's state without its threads and hangs on its first OpenCV call (seen in `cv2.setNumThreads`). Stop
    # the parent's pool for the moment the workers are forked, then give it back its threads.
    cv2 = sys.modules.get("cv2") if forking else None
    if cv2 is None:
        yield
        return
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


class _CropBuffers:
    """One batch of uint8 crops, channels last, filled image by image (`augmentation_device` "workers" and
    "device"); with "device" also each crop's photometric parameters.

    uint8 crops are 4x less to pass between processes than normalised float32 (measured ~2x faster end to end on 2
    workers); in a worker they are allocated in shared memory, so sending them copies nothing."""

    def __init__(self, augmentation: MultiCropAugmentation, batch_size: int, parameters: bool, shared: bool):
        buffers = [
            torch.empty((batch_size, NUM_GLOBAL_CROPS, *augmentation.global_crop_size, 3), dtype=torch.uint8),
            torch.empty(
                (batch_size, augmentation.num_local_crops, *augmentation.local_crop_size, 3),
                dtype=torch.uint8,
            ),
        ]
        if parameters:  # each crop's photometric decisions, applied on the training device
            buffers.append(
                torch.empty((batch_size, NUM_GLOBAL_CROPS + augmentation.num_local_crops, NUM_PARAMETERS))
            )
        if shared:
            for buffer in buffers:
                buffer.share_memory_()
        self.buffers = tuple(buffers)
        self._views = [buffer.numpy() for buffer in buffers]
        self.filled = 0

    def __len__(self) -> int:
        return self.filled

    def add(self, crops: tuple[np.ndarray, ...]) -> None:
        for view, crop in zip(self._views, crops):
            view[self.filled] = crop
        self.filled += 1

    def tensors(self) -> tuple[torch.Tensor, ...]:
        if self.filled == self.buffers[0].shape[0]:
            return self.buffers
        return tuple(buffer[: self.filled] for buffer in self.buffers)


class _MultiCropStream(torch.utils.data.IterableDataset):
    """One epoch of one rank, as produced inside each DataLoader worker (or in-process with num_workers=0).

    Yields dicts: batches `{"worker", "end": False, "crops", "state", "skip_messages"}`, then one `{"worker",
    "end": True, "state", "skip_messages"}` marker when the worker's stream is exhausted. `crops` is a tuple of uint8
    crop tensors (and photometric parameters) for `mode` "workers" and "device", the tensors of a
    `device_crops.SourceBatch` for "device_crops".
    """

    def __init__(
        self,
        dataset: IterableDataset,
        image_column: str,
        augmentation: MultiCropAugmentation,
        batch_size: int,
        drop_last: bool,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        worker_split: str,
        resume: list[dict | None] | None,
        min_image_size: int,
        download_config: Any,
        mode: str = "workers",
        image_paths: ImagePaths | None = None,
        jpegs_on_device: bool = False,
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.augmentation = augmentation
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.worker_split = worker_split
        self.resume = resume
        self.min_image_size = min_image_size
        self.download_config = download_config
        self.mode = mode
        self.image_paths = image_paths if image_paths is not None else ImagePaths()
        self.jpegs_on_device = jpegs_on_device

    def _examples(self, worker: int, num_workers: int, state: dict) -> tuple[IterableDataset, Iterator[Any]]:
        """(dataset whose state_dict tracks the stream, iterator over this worker's raw image values)."""
        column = self.image_column
        readers = self.world_size * num_workers
        if self.worker_split == "shards":
            # Each (rank, worker) pair is one reader of its own shards. The split is made here rather than by
            # datasets inside DataLoader workers: restoring a worker's state there fails on shuffled multi-shard
            # streams (datasets 5.2 first applies it to the unsplit stream).
            dataset = (
                split_dataset_by_node(
                    self.dataset,
                    rank=self.rank * num_workers + worker,
                    world_size=readers,
                    **_SHARDS_STRATEGY,
                )
                if readers > 1
                else copy.deepcopy(self.dataset)
            )
            dataset.set_epoch(self.epoch)
            if self.resume and self.resume[worker] is not None:
                dataset.load_state_dict(self.resume[worker]["dataset"])
            # .iter() reads this dataset as it is, without datasets' own DataLoader-worker split.
            return dataset, (batch[column][0] for batch in dataset.iter(batch_size=1))

        # Fewer shards than readers: every worker reads the rank's stream and keeps the examples whose index is its
        # own modulo num_workers. All workers resume from the earliest saved position, so their streams stay equal.
        if self.world_size > 1:
            dataset = split_dataset_by_node(self.dataset, rank=self.rank, world_size=self.world_size)
        else:
            dataset = copy.deepcopy(self.dataset)
        dataset.set_epoch(self.epoch)
        saved = [entry for entry in (self.resume or []) if entry is not None and not entry["exhausted"]]
        start = min(saved, key=lambda entry: entry["position"]) if saved else None
        if start is not None:
            dataset.load_state_dict(start["dataset"])
        first_index = start["position"] if start is not None else 0
        own_from = state["position"]

        def own_examples() -> Iterator[Any]:
            for index, batch in enumerate(dataset.iter(batch_size=1), start=first_index):
                state["position"] = index + 1
                if index >= own_from and index % num_workers == worker:
                    yield batch[column][0]

        return dataset, own_examples()

    def _new_batch(self, in_worker: bool) -> _CropBuffers | SourceBatch:
        if self.mode == "device_crops":
            return SourceBatch(self.augmentation, self.min_image_size, self.jpegs_on_device)
        return _CropBuffers(self.augmentation, self.batch_size, self.mode == "device", shared=in_worker)

    def _add_example(self, batch: _CropBuffers | SourceBatch, value: Any, rng: np.random.Generator) -> None:
        """Decode (or, for `device_crops`, read) one example into `batch`; raises `ImageDecodeError` to skip it."""
        augmentation = self.augmentation
        if self.mode == "workers":
            image = decode_image(value, self.min_image_size, self.download_config, self.image_paths)
            batch.add(augmentation.crops_uint8(image, rng))
        elif self.mode == "device":
            image = decode_image(value, self.min_image_size, self.download_config, self.image_paths)
            batch.add(crops_with_parameters(augmentation, image, rng))
        else:
            batch.add_image(*read_image_bytes(value, self.download_config, self.image_paths), rng)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resumed = self.resume[worker] if self.resume else None
        state = copy.deepcopy(resumed) if resumed is not None else None
        if state is None:
            state = {"dataset": None, "consumed": 0, "position": 0, "skipped": {}, "exhausted": False}
        if state["exhausted"]:
            yield {"worker": worker, "end": True, "state": state, "skip_messages": []}
            return

        dataset, examples = self._examples(worker, num_workers, state)
        in_worker = info is not None
        skipped = Counter(state["skipped"])
        skip_messages: list[str] = []

        def emit(end: bool, batch=None) -> dict:
            nonlocal skip_messages
            snapshot = dict(state, dataset=dataset.state_dict(), skipped=dict(skipped), exhausted=end)
            item = {"worker": worker, "end": end, "state": snapshot, "skip_messages": skip_messages}
            if batch is not None:
                item["crops"] = (
                    batch.tensors(shared=in_worker) if isinstance(batch, SourceBatch) else batch.tensors()
                )
            skip_messages = []
            return item

        batch = self._new_batch(in_worker)
        try:
            for value in examples:
                index = state["consumed"]
                state["consumed"] = index + 1
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, index])
                try:
                    self._add_example(batch, value, rng)
                except ImageDecodeError as error:
                    skipped[error.reason] += 1
                    if len(skip_messages) < _MAX_SKIP_MESSAGES:
                        skip_messages.append(f"{error.reason}: {error}")
                    continue
                if len(batch) == self.batch_size:
                    item = emit(False, batch)
                    batch = self._new_batch(in_worker)
                    yield item
            if len(batch) and not self.drop_last:
                yield emit(False, batch)
            yield emit(True)
        finally:
            close = getattr(examples, "close", None)
            if close is not None:
                close()


class MultiCropDataLoader:
    """Batches of multi-crop views of a streamed image dataset, for one rank (see the module docstring).

    Args:
        dataset: an `IterableDataset` of raw images (from `load_image_stream`), NOT yet split by rank.
        image_column: its image column.
        augmentation: the multi-crop recipe.
        batch_size: examples per batch (per rank).
        num_workers: DataLoader worker processes (0: decode and augment in the calling process).
        rank, world_size: this process's place in distributed training.
        seed: seed of the shuffle (identical on all ranks, which keeps their parts disjoint) and of the crops.
        shuffle_buffer_size: examples in the shuffle buffer of each worker (0: no example shuffle; shard order is
            still shuffled per epoch by `datasets`).
        drop_last: drop each worker's last incomplete batch.
        min_image_size: images whose shorter side is smaller are skipped.
        pin_memory: pin batches for faster host-to-GPU copies; default: when CUDA is available.
        device: where batches are normalised and returned (e.g. `accelerator.device`): workers hand over uint8
            crops, and normalising them on the GPU moves 4x fewer bytes to it. Default: the CPU.
        prefetch_factor: batches prefetched per worker.
        token: Hub token, for images referenced by remote path (streamed imagefolder repositories).
        augmentation_device: where the crops are finished. `"workers"` (default): everything in the workers, with
            `augmentation` (OpenCV). `"device"`: workers only decode, crop, resize and flip, and draw each crop's
            photometric parameters from the same per-image generator; colour jitter, grayscale, blur, solarisation
            and normalisation then run batched on `device` (`selfpatch_hf.data.batched_photometric`).
            `"device_crops"`: workers only read each image's bytes (decoding on the host only what the device
            decoder cannot take) and draw the same boxes, flips and parameters as `"device"`; decoding, the resized
            crops, flips and photometric ops run batched on `device` (`selfpatch_hf.data.device_crops`). The device
            modes free the workers' CPU time where `device` is a GPU.
        image_paths: where image entries given only as a path may be read from (`ImagePaths`); default: what
            `load_image_stream` allowed for its source (`dataset.image_paths`), else nowhere. URLs are never
            followed, so a crafted dataset cannot make training read other files or send requests.
        jpeg_decoder: for `"device_crops"`, what decodes JPEGs on `device`: `"auto"` (default) takes torchvision's
            nvJPEG on a CUDA device (`decoding.device_jpeg_decoder`, which logs why when there is none), `None`
            decodes every image in the workers, or a callable taking a list of encoded JPEGs (1-D uint8 host tensors)
            and returning `(3, H, W)` uint8 RGB tensors on `device` as stored (no EXIF orientation).
    """

    def __init__(
        self,
        dataset: IterableDataset,
        image_column: str,
        augmentation: MultiCropAugmentation,
        batch_size: int,
        *,
        num_workers: int = 2,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer_size: int = 1000,
        drop_last: bool = True,
        min_image_size: int = 16,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        token: str | bool | None = None,
        device: str | torch.device | None = None,
        augmentation_device: str = "workers",
        image_paths: ImagePaths | None = None,
        jpeg_decoder: JpegDecoder | str | None = "auto",
    ):
        if augmentation_device not in AUGMENTATION_DEVICES:
            raise ValueError(
                f"augmentation_device must be one of {', '.join(AUGMENTATION_DEVICES)} (where the crops are "
                f"finished: the data workers or the training device), got {augmentation_device!r}."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        if shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        if not (jpeg_decoder is None or jpeg_decoder == "auto" or callable(jpeg_decoder)):
            raise ValueError(f"jpeg_decoder must be 'auto', None or a callable, got {jpeg_decoder!r}.")
        self.image_column = image_column
        self.augmentation = augmentation
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle_buffer_size = int(shuffle_buffer_size)
        self.drop_last = drop_last
        self.min_image_size = int(min_image_size)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.device = torch.device(device) if device is not None else None
        self.prefetch_factor = prefetch_factor
        self.augmentation_device = augmentation_device
        self.download_config = datasets.DownloadConfig(token=token) if token is not None else None
        # image entries given only as a path are read where the source allows (see ImagePaths), else nowhere
        self.image_paths = image_paths or getattr(dataset, "image_paths", None) or ImagePaths()
        self.device_crops: DeviceCrops | None = None
        if augmentation_device == "device_crops":
            if jpeg_decoder == "auto":
                jpeg_decoder = device_jpeg_decoder(self.device)
            self.device_crops = DeviceCrops(augmentation, self.device, jpeg_decoder)

        if self.shuffle_buffer_size:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
        self.dataset = dataset  # split per (rank, worker) when iterated
        readers = self.world_size * max(1, self.num_workers)
        splittable = dataset.num_shards >= readers and (_SHARDS_STRATEGY or dataset.num_shards % readers == 0)
        self.worker_split = "shards" if splittable else "examples"
        self.position = StreamPosition(
            {
                "rank": self.rank,
                "world_size": self.world_size,
                "num_workers": self.num_workers,
                "batch_size": self.batch_size,
                "seed": self.seed,
                "shuffle_buffer_size": self.shuffle_buffer_size,
            }
        )

    # -- epoch and position (selfpatch_hf.data.stream_state) ------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch the next `for` loop iterates (or the current one, during a loop)."""
        return self.position.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next `for` loop iterates; a saved position of another epoch is dropped."""
        self.position.set_epoch(epoch)

    @property
    def skipped_images_by_reason(self) -> dict[str, int]:
        return self.position.skipped_images_by_reason

    @property
    def skipped_images(self) -> int:
        return sum(self.skipped_images_by_reason.values())

    @property
    def batches_in_epoch(self) -> int:
        """Batches yielded so far in the current epoch."""
        return self.position.batches_in_epoch

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: JSON-serialisable; save one per rank."""
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state)

    # -- iteration ----------------------------------------------------------------------------------------------

    def _report_skips(self, worker_state_before: dict | None, item: dict) -> None:
        before = sum(worker_state_before["skipped"].values()) if worker_state_before else 0
        new = sum(item["state"]["skipped"].values()) - before
        if new > 0:
            examples = "; ".join(item["skip_messages"])
            logger.warning(
                "Skipped %d unusable image(s) on rank %d (epoch %d): %s. %d skipped on this rank so far.",
                new,
                self.rank,
                self.epoch,
                examples,
                self.skipped_images,
            )

    def _normalize(self, crops: torch.Tensor) -> torch.Tensor:
        # Without a device, keep the float batch pinned like the uint8 one, for a fast copy by the caller.
        pin = self.pin_memory and self.device is None
        return self.augmentation.normalize(crops, self.device, pin_memory=pin)

    def _finish_batch(self, crops: tuple[torch.Tensor, ...] | dict[str, torch.Tensor]) -> MultiCropBatch:
        if self.augmentation_device == "workers":
            return MultiCropBatch(self._normalize(crops[0]), self._normalize(crops[1]))
        if self.augmentation_device == "device_crops":
            output = self.device_crops(crops)
            if output.dropped:
                self.position.add_device_skips(output.dropped_by_reason)
                logger.warning(
                    "Dropped %d image(s) from a batch on rank %d (epoch %d) that neither the training device nor "
                    "the host could decode: %s. %d skipped on this rank so far.",
                    len(output.dropped),
                    self.rank,
                    self.epoch,
                    "; ".join(message for _, message in output.dropped[:_MAX_SKIP_MESSAGES]),
                    self.skipped_images,
                )
            return MultiCropBatch(output.global_crops, output.local_crops)
        # the crops go to the device; the parameters stay on the host, where the per-crop decisions are read
        global_crops, local_crops = (
            tensor.to(self.device, non_blocking=True) if self.device is not None else tensor
            for tensor in crops[:2]
        )
        parameters = crops[2]
        mean, std = self.augmentation.mean, self.augmentation.std
        return MultiCropBatch(
            apply_photometric(global_crops, parameters[:, :2], mean, std),
            apply_photometric(local_crops, parameters[:, 2:], mean, std),
        )

    def __iter__(self) -> Iterator[MultiCropBatch]:
        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # parquet streaming otherwise sleeps 5 s per pass
        workers = max(1, self.num_workers)
        position = self.position.start(workers)
        resume = position["workers"] if any(entry is not None for entry in position["workers"]) else None
        active = [
            w
            for w in range(workers)
            if position["workers"][w] is None or not position["workers"][w]["exhausted"]
        ]
        stream = _MultiCropStream(
            self.dataset,
            self.image_column,
            self.augmentation,
            self.batch_size,
            self.drop_last,
            self.seed,
            self.epoch,
            self.rank,
            self.world_size,
            self.worker_split,
            copy.deepcopy(resume),
            self.min_image_size,
            self.download_config,
            mode=self.augmentation_device,
            image_paths=self.image_paths,
            jpegs_on_device=self.device_crops is not None and self.device_crops.jpeg_decoder is not None,
        )
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            worker_init_fn=_init_worker if self.num_workers else None,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )
        pending: list[deque] = [deque() for _ in range(workers)]
        with _opencv_pool_stopped(self.num_workers > 0):
            items = iter(loader)  # forks the workers
        try:
            while active:
                # Next worker in round-robin order among those not exhausted.
                worker = min(active, key=lambda w: (w - position["next_worker"]) % workers)
                while not pending[worker]:
                    try:
                        item = next(items)
                    except StopIteration:
                        raise RuntimeError(
                            f"Data worker {worker} stopped without finishing its stream."
                        ) from None
                    pending[item["worker"]].append(item)
                item = pending[worker].popleft()
                previous_state, position["workers"][worker] = position["workers"][worker], item["state"]
                self._report_skips(previous_state, item)
                position["next_worker"] = (worker + 1) % workers
                if item["end"]:
                    active.remove(worker)
                    continue
                position["batches"] += 1
                yield self._finish_batch(item["crops"])
        finally:
            del items  # shuts the workers down, also when the caller stops early
        logger.info(
            "Finished epoch %d on rank %d: %d batches, %d images skipped.",
            self.epoch,
            self.rank,
            position["batches"],
            self.position.epoch_skips,
        )
        self.position.complete_pass()


def build_pretraining_dataloader(
    source: str | IterableDataset,
    augmentation: MultiCropAugmentation | str | None = None,
    batch_size: int = 64,
    *,
    split: str = "train",
    image_column: str | None = None,
    token: str | bool | None = None,
    streaming: bool = True,
    **loader_kwargs: Any,
) -> MultiCropDataLoader:
    """Open `source` and wrap it in a `MultiCropDataLoader` (arguments: see that class and `load_image_stream`).

    `augmentation` defaults to the SelfPatch recipe (`MultiCropAugmentation()`: 2 x 224 px + 8 x 96 px); a string
    names a recipe of `MultiCropAugmentation.from_recipe` ("selfpatch", "dino", "moby": MoBY's two views).
    """
    if augmentation is None or isinstance(augmentation, str):
        augmentation = MultiCropAugmentation.from_recipe(augmentation or "selfpatch")
    if isinstance(source, IterableDataset):  # opened by the caller: paths only where `image_paths=` allows
        dataset, column = as_raw_image_stream(source, image_column)
    else:
        dataset, column = load_image_stream(
            source, split=split, image_column=image_column, token=token, streaming=streaming
        )
    return MultiCropDataLoader(dataset, column, augmentation, batch_size, token=token, **loader_kwargs)


__all__ = [
    "AUGMENTATION_DEVICES",
    "SKIP_REASONS",
    "STATE_VERSION",
    "ImageDecodeError",
    "ImagePaths",
    "MultiCropBatch",
    "MultiCropDataLoader",
    "as_raw_image_stream",
    "build_pretraining_dataloader",
    "decode_image",
    "hub_dataset_id",
    "image_paths_of_source",
    "load_image_stream",
]
