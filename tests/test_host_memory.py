"""`keep_freed_host_memory`: freed blocks come back without page faults (each case in a fresh process)."""

import platform
import statistics
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import torch
from selfpatch_hf.training.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(10):  # a training step's pattern: the same large blocks allocated and freed again and again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(64 * 2**20), torch.ones(16 * 2**20)]  # 256 + 64 MiB, above any mmap threshold
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del blocks
print(applied, *faults)
"""

PAGES = 320 * 2**20 // 4096  # of one round's two blocks


def faults_in_steady_state(mode: str) -> tuple[str, int]:
    """The median page faults of one round, first round excluded.

    The median, not the sum: with memory kept, the heap still grows once or twice in the early rounds (the blocks
    land at shifted addresses when a small allocation settles between them; seen in rounds 1 to 3), and each growth
    faults in its new pages once. Growth stops when the heap holds the whole pattern, so most rounds fault nothing.
    """
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    return applied, int(statistics.median(int(f) for f in faults[1:]))


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)
def test_freed_memory_is_reused_without_page_faults():
    applied, kept_faults = faults_in_steady_state("keep")
    _, default_faults = faults_in_steady_state("default")
    assert applied == "True"
    # glibc's default maps both blocks afresh each round: one fault per 4 KiB page (fewer with huge pages)
    assert default_faults > PAGES // 1000
    assert kept_faults < default_faults / 20


@pytest.mark.parametrize(
    ("system", "libc"), [("Linux", ("musl", "1.2")), ("Darwin", ("", "")), ("Windows", ("", ""))]
)
def test_other_c_libraries_are_left_alone(monkeypatch, system, libc):
    """Runs on every host (CI is glibc): another C library is simulated, and no C function may be called."""
    import ctypes

    from selfpatch_hf.training import host_memory

    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: libc)

    def no_c_library(*args, **kwargs):
        raise AssertionError("a C library was loaded on a system without glibc")

    monkeypatch.setattr(ctypes, "CDLL", no_c_library)
    assert host_memory.keep_freed_host_memory() is False


class _Mallopt:
    """glibc's `mallopt` as `keep_freed_host_memory` calls it: records the settings, answers `status`."""

    def __init__(self, status: int):
        self.status, self.calls = status, []

    def __call__(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.status


@pytest.mark.parametrize("status", [1, 0], ids=["accepted", "rejected"])
def test_the_settings_asked_of_glibc_and_a_refusal(monkeypatch, caplog, status):
    """Without touching this process's allocator: the exact mallopt calls (M_MMAP_MAX 0, M_TRIM_THRESHOLD -1) and
    what a refusal returns and says."""
    import ctypes
    import types

    from selfpatch_hf.training import host_memory

    mallopt = _Mallopt(status)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: ("glibc", "2.36"))
    monkeypatch.setattr(ctypes, "CDLL", lambda name: types.SimpleNamespace(mallopt=mallopt))
    assert host_memory.keep_freed_host_memory() is bool(status)
    assert mallopt.calls[0] == (-4, 0)  # M_MMAP_MAX = 0: every block from the heap
    if status:
        assert mallopt.calls == [(-4, 0), (-1, -1)]  # M_TRIM_THRESHOLD = -1: never trim
        assert "rejected" not in caplog.text
    else:
        assert "glibc rejected the allocator settings" in caplog.text
