"""Keep the host memory a training step frees, so the next step does not fault it back in.

A step frees and reallocates the same activations every batch. glibc's malloc hands a block above its
mmap threshold (at most 32 MiB, raised as such blocks are freed) to the kernel on ``free`` and gives the
top of its heap back once more than the trim threshold lies free there; the next step then takes a page
fault for every 4 KiB of its working set again: on 2 cores, resnet50 at batch 16, 128 px, up to 260,000
minor faults a step, none with the thresholds raised (BENCHMARKS.md, "Host memory kept between steps").

``keep_freed_host_memory()`` raises both thresholds for the process (``mallopt``); freed memory then
stays in the heap and the next step reuses it. The trainer calls it unless the recipe says
``host_memory: release``. It does nothing (and returns False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_host_memory", "KEEP_BYTES"]

# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# blocks up to this size come from the heap, and this much may lie free at its top: above any one
# activation of the models trained on a CPU, below what would keep a finished job's memory for long
KEEP_BYTES = 1 << 30


def keep_freed_host_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """Have glibc keep up to ``keep_bytes`` of freed memory and serve blocks up to that size from its
    heap; process-wide. True where it took effect, False where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # the mmap threshold first: setting either fixes both (glibc stops adjusting them), so a refused
    # mmap threshold (a glibc that caps it) must leave the trim threshold alone too
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, keep_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, keep_bytes))
