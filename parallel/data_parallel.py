"""Replicas: DistributedDataParallel, with the all-reduce skipped on non-final micro-batches of a
gradient-accumulation window (`no_sync`)."""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .context import Context


class Runner:
    """What the training loop calls: the module to run forward, and the sync switch."""

    def __init__(self, model: nn.Module, ctx: Context) -> None:
        self.model = model
        if ctx.distributed and ctx.replicas > 1:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp: DistributedDataParallel | None = DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.ddp = None

    @property
    def module_for_forward(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model

    def sync_gradients(self, final_micro_batch: bool):
        """All-reduce gradients only on the last micro-batch of an accumulation window."""
        if self.ddp is None or final_micro_batch:
            return nullcontext()
        return self.ddp.no_sync()
