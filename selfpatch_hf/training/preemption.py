"""Graceful stop on SIGTERM / SIGINT: the training loop finishes its step, writes a checkpoint and exits.

Cluster schedulers pre-empt jobs with SIGTERM and a grace period before SIGKILL; Ctrl-C sends SIGINT. Either only
sets a flag here; the loop polls `requested` after every optimiser step (all-reducing it, so that every process stops
at the same step even when only one of them got the signal). A second SIGINT restores Python's default behaviour and
raises `KeyboardInterrupt` at once, for a user who does not want to wait for the checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager that turns SIGTERM / SIGINT into a stop request (main thread only; a no-op elsewhere)."""

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
        action: str = "stopping after the current optimiser step and writing a checkpoint",
    ):
        self.signals = signals
        self.action = action
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal_name = name
        logger.warning(
            "Received %s: %s%s.",
            name,
            self.action,
            " (press Ctrl-C again to abort at once)" if signum == signal.SIGINT else "",
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


__all__ = ["STOP_SIGNALS", "StopRequest"]
