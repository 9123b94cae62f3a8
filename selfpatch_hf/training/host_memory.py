"""Host-memory allocator settings for training on the CPU.

A training step allocates and frees the same few gigabytes of activations every step. With glibc's defaults,
blocks above a dynamic threshold (at most 32 MiB) get fresh `mmap`s and freed memory at the top of the heap goes
back to the operating system, so each step page-faults its activations in again. Minor faults are expensive in
virtual machines (about 5 us each on this project's CI machines): a ViT-S/16 SelfPatch step at batch 8 took
440,000-550,000 faults (about 2 GiB) and 1.16-1.26x as long as the same step with the memory kept for reuse
(BENCHMARKS.md, model training step). PyTorch has no caching allocator on the CPU, and tcmalloc/jemalloc need
`LD_PRELOAD` before the process starts; `mallopt` gets the same effect from inside the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DISABLED = -1  # for M_TRIM_THRESHOLD: never trim (mallopt(3))


def keep_freed_host_memory() -> bool:
    """Makes glibc's malloc serve every block from its heap and never return freed memory to the system.

    Memory freed by one step is then reused by the next without page faults. The price: the process keeps its peak
    resident size until it exits (a training process returns to that peak every step anyway). Affects the whole
    process, including data-loader workers forked after the call.

    Returns:
        `True` if the settings were applied; `False` where the C library is not glibc (macOS, Windows, musl), where
        there is nothing to do or no `mallopt`.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _DISABLED) == 1
    if not applied:
        logger.warning(
            "glibc rejected the allocator settings; host memory is page-faulted in again every step."
        )
    return applied
