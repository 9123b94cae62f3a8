"""Metrics of a training run: a JSONL file in the output directory plus accelerate's trackers (TensorBoard, W&B).

Only the main process writes. Every record is one JSON object per line with a `step` (optimiser steps done) and a
`time` (UNIX seconds); event records (`"event": "start" | "resumed" | "checkpoint" | "export" | "stopped" | ...`) mark
what happened between metric records. A resumed run appends to the same file after a `resumed` event, so steps
between the checkpoint and the interruption appear twice: readers keep the last record of each step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

METRICS_FILENAME = "metrics.jsonl"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    if isinstance(value, Path):
        return str(value)
    return value


class MetricsLog:
    """Appends records to `output_dir/metrics.jsonl` and forwards numeric metrics to `accelerator.log`."""

    def __init__(self, accelerator, output_dir: str | os.PathLike):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILENAME

    def _append(self, record: Mapping[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({key: _json_safe(value) for key, value in record.items()})
        with open(self.path, "a") as handle:
            handle.write(line + "\n")

    def metrics(self, step: int, values: Mapping[str, float | int | None]) -> None:
        """A metrics record: written to the file and, prefixed `train/`, to the trackers."""
        present = {key: value for key, value in values.items() if value is not None}
        self._append({"step": step, "time": round(time.time(), 3), **present})
        if self.accelerator.trackers:
            self.accelerator.log({f"train/{key}": value for key, value in present.items()}, step=step)

    def event(self, event: str, step: int, **fields: Any) -> None:
        self._append({"event": event, "step": step, "time": round(time.time(), 3), **fields})


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics file, in order."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def last_metrics_per_step(records: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """`{step: record}` keeping the last metrics record of each step (a resumed run rewrites the steps after its
    checkpoint)."""
    return {record["step"]: dict(record) for record in records if "event" not in record}


class WindowMeans:
    """Means of per-step values over a logging window, plus the window's training throughput."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.seconds = 0.0

    def add(self, values: Mapping[str, float | None], images: int, seconds: float) -> None:
        for key, value in values.items():
            if value is None:
                continue
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.images += images
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums}

    @property
    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None


__all__ = ["METRICS_FILENAME", "MetricsLog", "WindowMeans", "last_metrics_per_step", "read_metrics"]
