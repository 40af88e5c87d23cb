"""Keep freed host memory in the process, so that a CPU training step stops paying for page faults.

glibc's malloc serves each large block (a feature map of a batch) with a fresh `mmap` and gives it
back to the OS on free: every step then touches its ~2 GB of activations as new pages, which the
kernel must fault in and zero one 4 KiB page at a time. Measured on B0 at 224 px, batch 32, fp32:
about 450,000 page faults and 0.7 s of system time per 1.2 s step (docs/benchmarks.md). With mmap
off and trimming off, freed blocks stay in the heap and the next step reuses them. The price: the
process keeps its peak memory until it exits, which a training process does anyway.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1


def retain_freed_memory() -> bool:
    """Set glibc malloc to serve large blocks from the heap and never trim it. Returns whether
    it applied (False off Linux or with another C library: nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
