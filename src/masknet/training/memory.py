"""Keep freed memory for reuse: a training step's tensors are allocated again every step.

glibc's malloc serves large blocks (above a threshold that starts at 128 KiB) with mmap and
hands them back to the kernel on free, and trims the heap top; the next step's tensors of the
same sizes then page-fault on first touch, every step (~700-2,000 minor faults per SerMaskNet
step, batch 1024, 1 thread; docs/performance.md). `keep_freed_memory` raises both thresholds so
that freed blocks stay in the heap and the next step reuses them: ~20-70 faults per step after.
Peak memory is unchanged (a step needs those blocks again); memory freed after the run is
returned to the system only when the process ends. A no-op where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: blocks up to 32 MiB come from the heap
_TRIM_THRESHOLD = 1 << 30  # free heap above 1 GiB is still returned
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process). Returns whether it applied."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done
