"""Graceful stop on SIGTERM / SIGINT: the training loop finishes its step, writes a checkpoint and exits.

Cluster schedulers pre-empt jobs with SIGTERM and a grace period before SIGKILL; Ctrl-C sends SIGINT. Either only
sets a flag here; the loop polls `requested` after every optimiser step (all-reducing it, so that every process stops
at the same step even when only one of them got the signal). A second SIGINT restores Python's default behaviour and
raises `KeyboardInterrupt` at once, for a user who does not want to wait for the checkpoint.

SLURM, Kubernetes and a terminal's Ctrl-C signal the whole process group, DataLoader workers included: a worker
killed by its SIGTERM makes the training process fail ("DataLoader worker ... killed by signal") before it can
checkpoint. Workers are therefore started inside `stop_signals_held()`: forked with SIGTERM / SIGINT blocked, they
take those signals only from the process that started them (a thread reads each one with `sigwaitinfo` and
checks its sender), so a signal to the group leaves them working while the training process finishes its step and
checkpoints, and the training process can still end them (torch's worker shutdown, the interpreter's exit). The
training process handles its own copy of the signal, held back only while it starts the workers. This needs the
`fork` start method (torch's default on Linux); elsewhere the workers take signals as before.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
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


_held_for_children = False  # inside `stop_signals_held`: children forked now filter their stop signals


def _take_stop_signals_from_the_parent_only() -> None:
    """In a child forked while the stop signals were held (they stay blocked in all its threads): ends the child
    the default way when its parent sends one, ignores them from anyone else (a signal to the process group)."""
    parent = os.getppid()
    while True:
        received = signal.sigwaitinfo(STOP_SIGNALS)
        if received.si_pid == parent:  # as the signal's default action would (a thread cannot restore that)
            os._exit(128 + received.si_signo)


def _after_fork_in_child() -> None:
    if _held_for_children:
        threading.Thread(
            target=_take_stop_signals_from_the_parent_only, name="stop-signals", daemon=True
        ).start()


if hasattr(os, "register_at_fork") and hasattr(signal, "sigwaitinfo"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def stop_signals_held(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Blocks `signals` in the calling thread while the block runs. Processes forked meanwhile (DataLoader workers)
    take them only from this process (see the module docstring), so a signal sent to the whole process group
    leaves them running; this process receives its own copy when the block ends (or on another thread meanwhile).
    A no-op off the main thread, without `fork` as the start method, and where the system lacks the calls."""
    usable = (
        threading.current_thread() is threading.main_thread()
        and hasattr(signal, "pthread_sigmask")
        and hasattr(signal, "sigwaitinfo")
        and multiprocessing.get_context().get_start_method() == "fork"  # torch's DataLoader default context
    )
    if not usable:
        yield
        return
    global _held_for_children
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    _held_for_children = True
    try:
        yield
    finally:
        _held_for_children = False
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


__all__ = ["STOP_SIGNALS", "StopRequest", "stop_signals_held"]
