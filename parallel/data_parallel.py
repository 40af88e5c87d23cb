"""Replicas: DistributedDataParallel, gradients all-reduced once per accumulation window
(`no_sync` on the other micro-batches). Also the single-process case (no wrapper at all)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .context import Context


@dataclass
class StepSettings:
    """How a micro-batch is trained, handed from the training loop to the runner."""

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scaler: torch.amp.GradScaler
    autocast: Callable[[], object]
    accumulation: int


class Runner:
    """Runs micro-batches forward and backward; what the training loop calls."""

    def __init__(self, model: nn.Module, ctx: Context, compile_model: bool = False, compile_mode: str = "default") -> None:
        self.model = model
        self.ctx = ctx
        self.ddp: DistributedDataParallel | None = None
        if ctx.distributed and ctx.replicas > 1:
            # With Proxy Norm, a projection's 1×1 weight gets two gradients (its conv and the SE
            # offset's matmul); their sum can carry other strides on the size-1 kernel dimensions
            # than the channels_last weight. That is the same memory layout (autograd's layout
            # contract ignores size-1 dimensions, and DDP copies the gradient into its bucket
            # either way), but DDP compares every stride and warns. Only that warning is hidden.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        module = self.ddp if self.ddp is not None else model
        self.forward_module = module
        if compile_model:
            # A phase compiles afresh, for its one input shape. Without the reset, the fine-tune phase
            # (another resolution) would meet the train phase's cache entry, and Dynamo would take the
            # changed size as dynamic: a shape-generic graph, not the one a run at that resolution alone
            # compiles (a B2 benchmark row traced so ran past 430 s on an H200, docs C.12). The reset also
            # frees the last phase's graphs (and its CUDA graphs' memory pool). dynamic=False: another
            # shape would get a static graph of its own.
            torch.compiler.reset()
            # reduce-overhead replays CUDA graphs: a step's kernels launched at once, for host-bound models
            self.forward_module = torch.compile(module, mode=compile_mode, dynamic=False)

    def micro_step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None, final: bool,
                   settings: StepSettings, blank: torch.Tensor | None = None,
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Forward + backward of one micro-batch (loss / accumulation); the all-reduce only runs
        on the final micro-batch of the window. Returns [(loss, logits, targets)], detached.
        `inputs` None: no image of the micro-batch could be decoded. If it is the window's last,
        `blank` (one input-shaped image) stands in, so that this replica still joins the
        all-reduce the others are waiting in (without it they would wait for ever)."""
        if inputs is None:
            if final and self.ddp is not None:
                self._all_reduce_without_data(blank, settings)
            return []
        sync = nullcontext() if self.ddp is None or final else self.ddp.no_sync()
        with sync:
            with settings.autocast():
                logits = self.forward_module(inputs)
                loss = settings.loss_fn(logits, targets)
            settings.scaler.scale(loss / settings.accumulation).backward()
        return [(loss.detach(), logits.detach(), targets)]

    def _all_reduce_without_data(self, blank: torch.Tensor, settings: StepSettings) -> None:
        """A backward whose gradients are all zero, through DDP, which then all-reduces this
        replica's accumulated gradients with the others'. In eval mode: no norm statistics move
        and no dropout is drawn. Through DDP uncompiled: a compiled model would stop here for minutes
        to compile a graph for this one rare batch."""
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            with settings.autocast():
                logits = self.ddp(blank)
            (logits.float().sum() * 0.0).backward()
        finally:
            for module, training in modes:
                module.train(training)

    # the whole model lives in every process: nothing to merge
    def full_state(self, module: nn.Module) -> dict:
        return module.state_dict()

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def sync_model(self) -> None:
        pass
