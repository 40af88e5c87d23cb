"""Who this process is: rank, replicas, device; collectives that are no-ops in one process.

Launched by `torchrun`, the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) says so,
and a process group is started: gloo on CPU, nccl on CUDA. Without it, one process does it all.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist


class ParallelError(Exception):
    """An impossible parallel layout (world size, splits, batch): refused before any work."""


class MainRankFailed(Exception):
    """On a rank other than 0: work that rank 0 does alone failed there (and rank 0 reports it), so
    this rank stops too. `error_type`: the name of rank 0's exception class."""

    def __init__(self, error_type: str) -> None:
        super().__init__(f"rank 0 stopped with {error_type}")
        self.error_type = error_type


T = TypeVar("T")


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    replicas: int = 1  # data-parallel replicas (world_size / pipeline stages)
    stages: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    local_world_size: int = 1  # processes on this host (they share its memory)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def replica_rank(self) -> int:
        return self.rank // self.stages

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def loss_rank(self) -> int:
        """The rank that computes the first replica's losses: its last pipeline stage (rank 0 without a pipeline)."""
        return self.stages - 1

    def print(self, *args: object, rank: int = 0) -> None:
        """Print on one rank (by default rank 0), to stderr."""
        if self.rank == rank:
            print(*args, file=sys.stderr, flush=True)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum over replicas (one process per replica counts; pipeline stages other than the last
        contribute zeros)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_gather_object(self, value: object) -> list:
        """Every rank's `value` (picklable; tensors on the CPU), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_from_main(self, values: list) -> list:
        """Rank 0's list of plain values, on every rank."""
        if self.distributed:
            dist.broadcast_object_list(values, src=0)
        return values

    def run_on_main(self, work: Callable[[], T]) -> T | None:
        """`work()` on rank 0 alone: its result there, None elsewhere. If it raises, rank 0 raises
        that error and the other ranks MainRankFailed, so that they stop with it instead of waiting
        in a collective rank 0 never joins (or failing on its lost connection, with a traceback)."""
        result, error = None, None
        if self.is_main:
            try:
                result = work()
            except Exception as caught:  # re-raised below, once the others are told
                error = caught
        if self.distributed:
            failed = self.broadcast_from_main([None if error is None else type(error).__name__])[0]
            if failed is not None and not self.is_main:
                raise MainRankFailed(failed)
        if error is not None:
            raise error
        return result

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is true on any (e.g. a non-finite loss seen by the last stage)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self._collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def reduce_eval(self, result: dict) -> dict:
        """Combine the replicas' validation shards (each shard is evaluated by all its stages)."""
        if not self.distributed:
            return result
        n = result["images"]
        sums = self.all_reduce_sum([n, result["top1"] * n / 100 if n else 0.0, result["top5"] * n / 100 if n else 0.0,
                                    result["loss"] * n if n else 0.0, result["skipped"]])
        total = max(sums[0], 1)
        return dict(top1=100 * sums[1] / total, top5=100 * sums[2] / total, loss=sums[3] / total,
                    images=int(sums[0]) // self.stages, skipped=int(sums[4]) // self.stages)

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            # destroy_process_group only drops this module's references to the group: a DDP reducer
            # still holds it. One kept alive by a reference cycle (after a failed checkpoint write, the
            # exception's traceback reaches the frames that hold the model) would otherwise be freed
            # during the interpreter's shutdown, where gloo's threads abort the process (SIGABRT,
            # "terminate called without an active exception"). Collected here, it goes first
            gc.collect()
            dist.destroy_process_group()


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # (the training code is written for these two)
        raise ParallelError(f"--device {requested!r} is not a device (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParallelError(f"--device {requested}: no CUDA device is available")
    if device.type == "cuda" and device.index is None:
        return torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ParallelError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """`--deterministic` for the duration of a run; a caller in the same process (the tests) gets
    its own setting back. On CUDA, PyTorch raises a RuntimeError at a cuBLAS matmul in deterministic
    mode unless CUBLAS_WORKSPACE_CONFIG fixes cuBLAS's workspace (PyTorch's notes on reproducibility),
    so it is set here, where the user has not set it, before the run's first matmul."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def tune_for_device(device: torch.device, deterministic: bool = False) -> None:
    """On CUDA, cuDNN times its convolution algorithms on each new shape and keeps the fastest:
    shapes are fixed within a run, and the default picks are slow for grouped convolutions.
    Off for deterministic runs (the timed choice can differ from run to run)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic


def setup(cfg) -> Context:
    """Read the launcher's environment, check it matches the config, start the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    stages = len(cfg.pipeline_splits) + 1
    if world_size != cfg.replicas * stages:
        raise ParallelError(
            f"world size {world_size} does not match --replicas {cfg.replicas} × {stages} pipeline stage(s) "
            f"= {cfg.replicas * stages}; launch with torchrun --nproc-per-node {cfg.replicas * stages} "
            f"(per host) or change --replicas / --pipeline-splits"
        )
    device = pick_device(cfg.device, local_rank)
    tune_for_device(device, cfg.deterministic)
    ctx = Context(rank, world_size, local_rank, cfg.replicas, stages, device, world_size > 1,
                  int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if ctx.distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(minutes=30)
        # torchrun keeps one store across --max-restarts; without a prefix per attempt, a restarted
        # group reads the dead workers' gloo addresses and cannot connect
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"efficientnet/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return ctx
