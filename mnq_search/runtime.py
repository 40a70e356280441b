"""Process-level defaults for fast CPU runs (no torch import here: the CLI loads it lazily).

- ``EVAL_BATCH``: evaluation and calibration batch. On two CPU cores a batch of 100 ran a quantized
  DeiT-Tiny 1.4x faster than 250: the integer kernels' float64 intermediates (up to 80 MB at 250)
  stop falling out of the caches and the allocator.
- :func:`keep_freed_memory`: glibc hands every block above its mmap threshold (at most 32 MB)
  back to the kernel when freed, so each of the kernels' many large temporaries is page-faulted in
  again; in one measurement this was 23 s of system time for 20 s of quantized evaluation. Raising
  the mmap and trim thresholds keeps freed memory for reuse (system time 23 s -> 4 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

EVAL_BATCH = 100

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds to 1 GiB for this process; False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
