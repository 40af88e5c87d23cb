"""Speed and memory measurements shared by validation and the benchmark.

Throughput: warm-up batches are run and discarded, then each timed batch is synchronised and
timed on its own; the median is reported (robust to a noisy shared machine).
Operators per step: a dispatch mode counts them (on a GPU, about the kernel launches).
Profile: torch.profiler's operators with the most self time, and on a GPU how busy it was.
Peak memory: on CUDA the allocator's high-water mark; on CPU, where PyTorch keeps no such
statistic, a dispatch mode counts the bytes of tensors alive at once during the call.
Private memory: the pages a process holds alone (Linux), e.g. those a forked worker copied.
"""

from __future__ import annotations

import os
import statistics
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_seconds(step: Callable[[], object], device: torch.device, warmup: int, timed: int) -> list[float]:
    """Run `step` warmup times untimed, then `timed` times, each timed alone; the timings."""
    if timed < 1:
        raise ValueError("need at least one timed step")
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def inference_throughput(model: nn.Module, batch_size: int, resolution: int, device: torch.device,
                         warmup: int = 3, timed: int = 10, channels_last: bool = False,
                         autocast=None) -> dict[str, float]:
    """Images/s of model(x) on a fixed random batch: eval mode, no autograd, median over batches."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 3, resolution, resolution, device=device).contiguous(memory_format=memory_format)
    was_training = model.training
    model.eval()

    def step() -> None:
        with torch.inference_mode(), (autocast() if autocast else nullcontext()):
            model(x)

    try:
        times = median_step_seconds(step, device, warmup, timed)
    finally:
        model.train(was_training)
    median = statistics.median(times)
    return dict(images_per_s=batch_size / median, median_batch_s=median, timed_batches=len(times))


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created inside the mode and still alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # storage pointer -> [live tensor count, bytes]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self._refs.get(key)
            if entry is None:
                entry = self._refs[key] = [0, storage.nbytes()]
                self.current += entry[1]
                self.peak = max(self.peak, self.current)
            entry[0] += 1
            weakref.finalize(tensor, self._release, key)
        return out


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators run inside the mode, views excluded. On a GPU each is about one
    kernel launch, and the host's time to issue them bounds a step made of many small ones."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def operators_per_call(fn: Callable[[], object]) -> int:
    """ATen operators (views excluded) that one call of `fn` runs, its backward included."""
    with OperatorCount() as counter:
        fn()
    return counter.count


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors allocated while `fn` runs (inputs and weights made before it excluded)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveTensorBytes() as tracker:
        result = fn()
        del result
    return tracker.peak


SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")  # Linux's per-process memory figures


def private_memory_bytes() -> int:
    """This process's pages that are its own: never shared, or copied since a fork."""
    fields = (line.split() for line in SMAPS_ROLLUP.read_text().splitlines())
    return sum(int(f[1]) * 1024 for f in fields if f[0] in ("Private_Clean:", "Private_Dirty:"))


def profile_summary(fn: Callable[[], object], device: torch.device, calls: int = 3, rows: int = 15) -> str:
    """Where `calls` calls of `fn` spend their time, from torch.profiler: the `rows` operators with
    the most self time on the device (the GPU's kernels on CUDA, the host's operators on CPU),
    after a line with the wall time per call and, on a GPU, the share of it the GPU was busy. A
    GPU busy for much less than the wall time waits for the host to issue work (launch-bound);
    the table then says which operators to fuse or batch."""
    from torch.profiler import ProfilerActivity, profile

    # without this, Kineto logs "ERROR ... gpuGetDeviceCount failed" on a machine without a GPU;
    # a level the user set is kept
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # not a first call's one-time work (allocations, autotuning)
    synchronize(device)
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        wall = (time.perf_counter() - start) / calls
    events = profiler.key_averages()
    line = f"wall {wall * 1e3:.1f} ms a call (profiled, {calls} calls)"
    if device.type == "cuda":
        busy = device_busy_us(events) / 1e3 / calls  # ms a call
        line += f"; GPU busy {busy:.1f} ms a call ({100 * busy / 1e3 / wall:.0f} %)"
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return line + "\n" + events.table(sort_by=sort, row_limit=rows)


def device_busy_us(events) -> float:
    """µs the GPU spent in kernels and copies: the device's own events only. An operator's event
    also carries the device time of the kernels it launched, so summing every event would count
    each kernel twice (the profiler's table footer sums the same way)."""
    from torch.autograd import DeviceType

    return sum(event.self_device_time_total for event in events
               if event.device_type == DeviceType.CUDA and not event.is_user_annotation)
