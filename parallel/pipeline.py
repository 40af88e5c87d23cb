"""Pipeline stages on torch.distributed.pipelining, combined with replicas.

Ranks form a 2-D mesh: rank = replica × stages + stage. The ranks of one replica form a pipeline
(point-to-point activations and gradients between neighbouring stages); the ranks holding the
same stage in different replicas all-reduce that stage's gradients.

Every rank builds the whole model (so checkpoints keep the single-process format), runs only its
stage's units, and owns only their parameters: the optimizer skips the others (no gradient).
Checkpoints and validation merge the owned slices from every stage, so a pipelined run's
checkpoint loads into a single-process run and back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from .context import Context, ParallelError
from .data_parallel import StepSettings


def split_indices(model: nn.Module, splits: list[str]) -> list[int]:
    """Unit index where each stage after the first begins. `blocks.3` means `blocks.3.0`."""
    names = [name for name, _ in model.units()]
    indices = []
    for split in splits:
        name = f"{split}.0" if split.count(".") == 1 and split.startswith("blocks.") else split
        if name not in names:
            raise ParallelError(
                f"--pipeline-splits: {split!r} is not a block boundary; a stage can begin at "
                f"blocks.I, blocks.I.J, head or classifier (e.g. blocks.3.0)"
            )
        if names.index(name) == 0:
            raise ParallelError(f"--pipeline-splits: {split!r} would leave the first stage empty")
        indices.append(names.index(name))
    if indices != sorted(set(indices)):
        raise ParallelError(f"--pipeline-splits must be distinct and in model order, got {' '.join(splits)}")
    return indices


class StageModule(nn.Module):
    """One pipeline stage: units `start` to `stop` of the model (`EfficientNet.units`), computed by
    the model's own `forward_units`, so a stage runs what the unsplit model runs (Proxy Norm's
    batched moments and folds). It holds its units, so its parameters are the ones it owns.
    Activations cross between stages in the default (NCHW) layout: point-to-point sends and
    receives need contiguous tensors (gloo refuses others), and the receiving stage's buffers are
    made from what the sender's output looked like. A channels_last model turns them back to
    channels_last on arrival.

    `autocast` (a context factory the runner sets for each step) is entered here, around the
    forward only. Around the schedule's step it would also cover the backward, which the engine
    then runs under autocast: hand-written backwards meant to stay in fp32 (Proxy Norm's moments)
    would run in bf16, and the gradients would differ from the unsplit model's."""

    def __init__(self, model: nn.Module, start: int, stop: int, channels_last: bool = False) -> None:
        super().__init__()
        self.units = nn.ModuleList(module for _, module in model.units()[start:stop])
        self.run_units = functools.partial(model.forward_units, start=start, stop=stop)  # not a submodule
        self.channels_last = channels_last
        self.autocast: Callable[[], AbstractContextManager] = nullcontext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = ChannelsLastInside.apply(x)
        with self.autocast():
            return self.run_units(x).contiguous()


class ChannelsLastInside(torch.autograd.Function):
    """x in channels_last, with its gradient given back contiguous (the previous stage receives
    it into a buffer shaped like the tensor this stage was sent)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class PipelineRunner:
    """The Runner interface (micro_step, full_state, ...) for a pipelined, replicated model."""

    def __init__(self, model: nn.Module, ctx: Context, splits: list[str], schedule: str,
                 channels_last: bool = False) -> None:
        self.model = model
        self.ctx = ctx
        bounds = [0, *split_indices(model, splits), len(model.units())]
        self.stage_module = StageModule(model, bounds[ctx.stage], bounds[ctx.stage + 1], channels_last)
        self.owned_ids = {id(t) for t in list(self.stage_module.parameters()) + list(self.stage_module.buffers())}
        self.owned_keys = {name for name, t in list(model.named_parameters()) + list(model.named_buffers())
                           if id(t) in self.owned_ids}
        # every rank creates every group, in the same order
        self.pipe_group = self.stage_group = None
        for replica in range(ctx.replicas):
            group = dist.new_group([replica * ctx.stages + s for s in range(ctx.stages)])
            if replica == ctx.replica_rank:
                self.pipe_group = group
        for stage in range(ctx.stages):
            group = dist.new_group([r * ctx.stages + stage for r in range(ctx.replicas)])
            if stage == ctx.stage:
                self.stage_group = group
        self.stage = PipelineStage(self.stage_module, ctx.stage, ctx.stages, ctx.device, group=self.pipe_group)
        self.schedule_class = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self.schedules: dict[int, object] = {}
        self.window: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.settings: StepSettings | None = None  # the current step's, for the schedule's loss

    @property
    def is_last(self) -> bool:
        return self.ctx.stage == self.ctx.stages - 1

    def micro_step(self, inputs, targets, final: bool, settings: StepSettings, blank: torch.Tensor | None = None):
        """Buffer micro-batches; on the last of the window run the pipeline schedule over all of them.
        (`blank`: see `Runner.micro_step`; a window without images joins the stage's all-reduce.)"""
        if inputs is not None:
            self.window.append((inputs, targets))
        if not final:
            return []
        window, self.window = self.window, []
        count = len(window)
        if count == 0:  # no image decoded in the whole window: the other replicas' ranks of this stage still
            for param in self.stage_module.parameters():  # all-reduce, so join them with zero gradients
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)
            self._all_reduce_stage_gradients()
            return []
        if count not in self.schedules:
            # 1F1B needs a micro-batch per stage; a window cut short (a micro-batch without a decodable
            # image is dropped) runs as GPipe, which computes the same gradients
            schedule_class = self.schedule_class if count >= self.ctx.stages else ScheduleGPipe
            self.schedules[count] = schedule_class(self.stage, n_microbatches=count, loss_fn=self._loss,
                                                   scale_grads=True)
        schedule = self.schedules[count]
        losses: list[torch.Tensor] = []
        # autocast covers the forward passes and the loss, not the backward (see StageModule)
        self.settings, self.stage_module.autocast = settings, settings.autocast
        if self.ctx.stage == 0:
            schedule.step(arg_mbs=[(x,) for x, _ in window])
            outputs = None
        elif self.is_last:
            outputs = schedule.step(target_mbs=[t for _, t in window], losses=losses)
        else:
            schedule.step()
            outputs = None
        self._all_reduce_stage_gradients()
        if not self.is_last:
            return []
        # the schedule scales gradients by 1/count itself; report the plain per-micro-batch losses
        logits = outputs.detach().split([x.shape[0] for x, _ in window])
        return [(loss.detach(), out, t) for loss, out, (_, t) in zip(losses, logits, window)]

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with self.settings.autocast():
            return self.settings.loss_fn(output, target)

    def _all_reduce_stage_gradients(self) -> None:
        if self.ctx.replicas == 1:
            return
        grads = [p.grad for p in self.stage_module.parameters() if p.grad is not None]
        for grad in grads:
            dist.all_reduce(grad, group=self.stage_group)
            grad.div_(self.ctx.replicas)

    # ---------------------------------------------------------------- merging the stages' slices

    def _merge(self, owned: dict) -> dict:
        """Union of every stage's owned entries (gathered within this replica's pipeline)."""
        parts: list[dict | None] = [None] * self.ctx.stages
        dist.all_gather_object(parts, {k: v.cpu() if torch.is_tensor(v) else v for k, v in owned.items()},
                               group=self.pipe_group)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return merged

    def full_state(self, module: nn.Module) -> dict:
        """State dict of the model (or of an AveragedModel of it) with every stage's part current."""
        state = module.state_dict()
        owned = {k: v for k, v in state.items() if k.removeprefix("module.") in self.owned_keys}
        merged = self._merge(owned)
        return {k: merged.get(k, v) for k, v in state.items()}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state for every parameter, each from the stage that owns it. A stage
        resumed from a checkpoint also holds the other stages' state as it was then: stale."""
        state = optimizer.state_dict()
        params = [param for group in optimizer.param_groups for param in group["params"]]  # the state's indices
        merged = self._merge({("state", k): v for k, v in state["state"].items() if id(params[k]) in self.owned_ids})
        return {"state": {k[1]: v for k, v in merged.items()}, "param_groups": state["param_groups"]}

    def sync_model(self) -> None:
        """Bring every stage's current weights into this rank's full model (before validation or export)."""
        self.model.load_state_dict(self.full_state(self.model))
