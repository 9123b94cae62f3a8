"""Where one rank is in its image stream, saved with each checkpoint so that a resumed run continues it exactly.

`StreamPosition` is the resumable state of a `MultiCropDataLoader` (selfpatch_hf.data.streaming): the epoch, the
batches yielded in it, the next worker in the loader's round-robin order, and for each DataLoader worker its
`datasets` stream state, the examples it has read and the images it skipped. Every random draw of a crop (box, flip,
photometric decision and factor) is made in the worker from a generator seeded by `(seed, epoch, rank, worker,
example index)`, also where the crops are finished on the training device, so this position is the whole state:
there is no other random state, on the host or on the device, to save.

`state_dict()` is JSON-serialisable (one per rank); `load_state_dict(state)` refuses a state saved with other settings
(rank, world size, workers, batch size, seed, shuffle buffer), naming the differences.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

from selfpatch_hf.data.decoding import SKIP_REASONS

STATE_VERSION = 1


class StreamPosition:
    """The resumable position of one rank's stream (see the module docstring).

    `settings` are the loader settings a position only makes sense with; `epoch_position` is `None` before the first
    batch of an epoch, else `{"epoch", "batches", "next_worker", "workers": [worker state or None, ...]}`, a
    worker state being what the worker stream reports with each batch, plus `"device_skipped": {reason: count}` once
    the training device has dropped an image it could not decode.
    """

    def __init__(self, settings: dict[str, int]):
        self.settings = dict(settings)
        self.epoch = 0
        self.epoch_position: dict | None = None
        self._skipped_before: Counter = Counter()  # finished epochs

    # -- epochs ---------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next pass iterates; a saved position of another epoch is dropped."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        if epoch != self.epoch:
            self.finish_epoch()
            self.epoch = int(epoch)

    def start(self, num_workers: int) -> dict:
        """The position of the current epoch, created empty unless a pass (or a loaded state) already began it."""
        if self.epoch_position is None or self.epoch_position["epoch"] != self.epoch:
            self.epoch_position = {
                "epoch": self.epoch,
                "batches": 0,
                "next_worker": 0,
                "workers": [None] * num_workers,
            }
        return self.epoch_position

    def finish_epoch(self) -> None:
        """Fold the current epoch's skip counts into the totals and forget its position."""
        self._skipped_before.update(self._epoch_skips())
        self.epoch_position = None

    def complete_pass(self) -> None:
        """A pass reached the end of every worker's stream: the next pass is the next epoch."""
        self.finish_epoch()
        self.epoch += 1

    # -- skipped images -------------------------------------------------------------------------------------------

    def _epoch_skips(self) -> Counter:
        counts: Counter = Counter()
        if self.epoch_position is not None:
            for worker_state in self.epoch_position["workers"]:
                if worker_state is not None:
                    counts.update(worker_state["skipped"])
            counts.update(self.epoch_position.get("device_skipped", {}))
        return counts

    def add_device_skips(self, reasons: Counter) -> None:
        """Images of a batch the training device could not decode (counted with the workers' skips)."""
        skipped = Counter(self.epoch_position.setdefault("device_skipped", {}))
        skipped.update(reasons)
        self.epoch_position["device_skipped"] = dict(skipped)

    @property
    def skipped_images_by_reason(self) -> dict[str, int]:
        counts = self._skipped_before + self._epoch_skips()
        return {reason: counts[reason] for reason in SKIP_REASONS if counts[reason]}

    @property
    def epoch_skips(self) -> int:
        return sum(self._epoch_skips().values())

    @property
    def batches_in_epoch(self) -> int:
        return 0 if self.epoch_position is None else self.epoch_position["batches"]

    # -- saving and restoring -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "version": STATE_VERSION,
                **self.settings,
                "epoch": self.epoch,
                "position": self.epoch_position,
                "skipped_before": dict(self._skipped_before),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Unknown data loader state version {state.get('version')!r} (expected {STATE_VERSION})."
            )
        different = {
            name: (state.get(name), value)
            for name, value in self.settings.items()
            if state.get(name) != value
        }
        if different:
            details = ", ".join(
                f"{name}: saved {saved}, now {now}" for name, (saved, now) in different.items()
            )
            raise ValueError(
                f"Cannot resume this data stream with different settings ({details}). Resume with the saved "
                "values, or start the epoch over (do not load the data loader state)."
            )
        self.epoch = int(state["epoch"])
        self.epoch_position = copy.deepcopy(state["position"])
        self._skipped_before = Counter(state["skipped_before"])


__all__ = ["STATE_VERSION", "StreamPosition"]
