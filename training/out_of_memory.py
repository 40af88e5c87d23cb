"""Recognising a failed allocation, so that the entry points can say what to lower instead of
printing a traceback."""

from __future__ import annotations

import re

import torch


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's
    RuntimeError (PyTorch raises a plain RuntimeError when host memory runs out)."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)


def allocation_failed(error: BaseException) -> str:
    """What the allocator said it could not allocate (the size), else the error's type."""
    found = re.search(r"tried to allocate (\d+) bytes", str(error))
    if found:
        return f"could not allocate {int(found.group(1)) / 2**30:.1f} GiB"
    found = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]iB)", str(error))  # CUDA's wording
    return f"could not allocate {found.group(1)}" if found else type(error).__name__
