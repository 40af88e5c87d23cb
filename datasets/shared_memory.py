"""Shared memory for the loader's worker processes: checked before a run, so that a small
/dev/shm (a container's default is 64 MiB) is an error that says what to change, not a hang.

Each worker collates its batch straight into shared memory and keeps up to `PREFETCH` of them in
flight. When /dev/shm is full, the worker's queue thread fails to send the batch and drops it,
and the main process waits for it forever: so the loader also gets a timeout (`BATCH_TIMEOUT_S`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .image_folder import DataError

SHARED_MEMORY = Path("/dev/shm")
PREFETCH = 2  # DataLoader's prefetch_factor default
BATCH_TIMEOUT_S = 600.0  # far above any batch's loading time; ends a hang on a lost batch


def batch_bytes(batch_size: int, resolution: int) -> int:
    """One batch of float32 RGB images, as the transforms give them."""
    return batch_size * 3 * resolution * resolution * 4


def shared_batches(workers: int) -> int:
    """Batches one loader holds in shared memory at its peak: each worker's in flight, and the ones
    the main process has taken (measured on the demo: 3, 5 and 9 batches for 1, 2 and 4 workers)."""
    return workers * PREFETCH + 2


def check_shared_memory(workers: int, processes: int, largest_batch_bytes: int, options: str,
                        folder: Path | None = None) -> None:
    """Raise DataError when the batches of `processes` loaders of `workers` workers each (one
    loader per training process on this host) would not fit in `folder` (/dev/shm)."""
    folder = folder or SHARED_MEMORY
    if workers == 0 or not folder.is_dir():  # no workers, or not Linux: nothing to check
        return
    batches = processes * shared_batches(workers)
    need = batches * largest_batch_bytes
    free = shutil.disk_usage(folder).free
    if free < need:
        who = f"{workers} data loader workers" + (f" in each of {processes} processes" if processes > 1 else "")
        raise DataError(
            f"{who} need about {need / 2**20:.0f} MiB of shared memory ({folder}) for the batches they hold "
            f"({batches} of {largest_batch_bytes / 2**20:.1f} MiB), but {free / 2**20:.0f} MiB is free: lower "
            f"{options}, or give the container more (docker run --shm-size)"
        )


def loader_failure(error: BaseException) -> str | None:
    """A one-line explanation when `error` is the DataLoader reporting a lost batch or a dead
    worker (its own message is a traceback's worth), else None."""
    text = str(error)
    if "DataLoader timed out" in text:
        return (f"no batch from the data loader in {BATCH_TIMEOUT_S:.0f} s: a worker lost it, most often for want of "
                f"shared memory ({SHARED_MEMORY} full); lower --workers or --micro-batch-size, or give the container "
                f"more (docker run --shm-size)")
    if "DataLoader worker" in text and ("exited unexpectedly" in text or "killed by signal" in text):
        first = text.strip().splitlines()[0]
        return (f"a data loader worker died ({first}); if it was killed by the system, memory ran out: lower --workers "
                f"or --micro-batch-size, or use --workers 0 to see the error in the main process")
    return None
