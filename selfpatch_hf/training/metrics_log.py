"""Metrics of a training run: a JSONL file in the output directory plus accelerate's trackers (TensorBoard, W&B).

Only the main process writes. Every record is one JSON object per line with a `step` (optimiser steps done) and a
`time` (UNIX seconds); event records (`"event": "start" | "resumed" | "checkpoint" | "export" | "stopped" | ...`) mark
what happened between metric records. A resumed run appends to the same file after a `resumed` event, so steps
between the checkpoint and the interruption appear twice: readers keep the last record of each step.

A run killed in the middle of a write can leave a partial last line. Opening the log for appending repairs it
(the partial line is cut off and a `repaired` event records what was dropped), and `read_metrics` skips a partial
last line with a warning, so that the file stays readable as a whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

METRICS_FILENAME = "metrics.jsonl"
_SHOWN_PARTIAL = 200  # characters of a dropped partial line kept in the `repaired` event

logger = logging.getLogger(__name__)


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
        self._checked = False
        self._write_failed = False

    def _append(self, record: Mapping[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._checked:  # once per run: a previous run may have been killed mid-line
            self._checked = True
            dropped = repair_partial_last_line(self.path)
            if dropped is not None:
                self._write(
                    {
                        "event": "repaired",
                        "step": record.get("step"),
                        "time": round(time.time(), 3),
                        "dropped_partial_line": dropped[:_SHOWN_PARTIAL],
                        "dropped_bytes": len(dropped),
                    }
                )
        self._write(record)

    def _write(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps({key: _json_safe(value) for key, value in record.items()}) + "\n").encode()
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "ab") as handle:
                handle.write(line)  # one write of a whole line: a kill cuts at most this line
        except OSError as error:
            # e.g. a full disk: undo a partial line (the next record must start on its own line) and go on; the
            # metrics are a record of the run, not its state (a checkpoint write fails with its own message)
            try:
                os.truncate(self.path, size)
            except OSError:
                pass
            if not self._write_failed:
                logger.warning(
                    "Cannot write to %s (%s): metrics are not recorded until it works again.",
                    self.path,
                    error,
                )
            self._write_failed = True
        else:
            self._write_failed = False

    def metrics(self, step: int, values: Mapping[str, float | int | None]) -> None:
        """A metrics record: written to the file and, prefixed `train/`, to the trackers."""
        present = {key: value for key, value in values.items() if value is not None}
        self._append({"step": step, "time": round(time.time(), 3), **present})
        if self.accelerator.trackers:
            self.accelerator.log({f"train/{key}": value for key, value in present.items()}, step=step)

    def event(self, event: str, step: int, **fields: Any) -> None:
        self._append({"event": event, "step": step, "time": round(time.time(), 3), **fields})


def repair_partial_last_line(path: str | os.PathLike) -> str | None:
    """Cuts a partial last line (no trailing newline, e.g. a run killed mid-write) off the metrics file, so that the
    next record starts on a line of its own. Returns the dropped text, or None when the file ended cleanly. A last
    line that is complete JSON and only lacks its newline is kept (the newline is added)."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return None
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return None
        # find the start of the last line
        start = size
        while start > 0:
            step = min(start, 1 << 16)
            handle.seek(start - step)
            block = handle.read(step)
            cut = block.rfind(b"\n")
            if cut >= 0:
                start = start - step + cut + 1
                break
            start -= step
        handle.seek(start)
        tail = handle.read()
        text = tail.decode("utf-8", errors="replace")
        try:
            json.loads(text)
        except ValueError:
            handle.truncate(start)
            logger.warning(
                "%s ended with a partial line (a run stopped mid-write); dropped %d byte(s): %r",
                path,
                len(tail),
                text[:_SHOWN_PARTIAL],
            )
            return text
        handle.write(b"\n")
        return None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics file, in order. A partial last line (a run killed mid-write) is skipped with a
    warning; a damaged line elsewhere raises a ValueError naming the file and line."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as error:
            if number == len(lines):  # no newline after it: cut by a kill mid-write
                logger.warning("%s: skipping a partial last line (%d characters)", path, len(line))
                continue
            raise ValueError(
                f"{path}, line {number} is not a JSON record ({error}): {line[:_SHOWN_PARTIAL]!r}"
            ) from None
    return records


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


__all__ = [
    "METRICS_FILENAME",
    "MetricsLog",
    "WindowMeans",
    "last_metrics_per_step",
    "read_metrics",
    "repair_partial_last_line",
]
