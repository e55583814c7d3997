"""Process-level memory settings for training.

glibc's malloc serves large blocks (over 128 KiB at first) with fresh `mmap`s and hands them back to the OS when
they are freed, and trims free memory off the top of the heap as soon as 128 KiB pile up. A training step
allocates and frees the same few megabytes of activations and gradients every time, so every step pays page
faults to touch that memory again; keeping freed blocks in the process for reuse avoids them. This is what the
jemalloc/tcmalloc preloads of CPU performance guides buy, without a dependency or an environment variable.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Serve blocks up to `mmap_threshold` from the heap (32 MiB: glibc's maximum) and keep up to `trim_threshold`
    of free heap for reuse. True when applied; False where the C library is not glibc (macOS, musl), a no-op."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, TypeError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
