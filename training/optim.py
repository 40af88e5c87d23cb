"""Optimizers, weight-decay groups and LR schedules of the paper's recipe."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models import is_proxy_parameter


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as TensorFlow 1 implements it (the optimizer of the EfficientNet papers).

    Differs from torch.optim.RMSprop in three ways: eps is inside the square root, the mean
    square starts at 1 rather than 0, and the LR multiplies the gradient before it enters the
    momentum buffer (so an LR change does not rescale momentum already accumulated):
        g   ← g + wd·p                      (L2 weight decay)
        ms  ← decay·ms + (1 − decay)·g²
        mom ← momentum·mom + lr·g / sqrt(ms + eps)
        p   ← p − mom
    """

    def __init__(self, params, lr: float, decay: float = 0.9, momentum: float = 0.0, eps: float = 1e-10,
                 weight_decay: float = 0.0, foreach: bool | None = None) -> None:
        if lr < 0 or not 0 <= decay < 1 or momentum < 0 or eps <= 0:
            raise ValueError(f"bad RMSpropTF settings: lr={lr}, decay={decay}, momentum={momentum}, eps={eps}")
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, eps=eps, weight_decay=weight_decay))
        # multi-tensor ops (one kernel launch per op for all parameters) where None: on a GPU, as
        # torch.optim does; on the CPU they were no faster than the loop (docs/benchmarks.md A.3).
        # An execution choice, not state: it is not in the state dict.
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            for param in params:
                state = self.state[param]
                if not state:
                    state["square_avg"] = torch.ones_like(param)
                    state["momentum_buffer"] = torch.zeros_like(param)
            foreach = self.foreach
            if foreach is None:
                foreach = all(param.device.type == "cuda" for param in params)
            (_step_foreach if foreach else _step_loop)(group, params, self.state)
        return loss


def _step_loop(group: dict, params: list[torch.Tensor], states) -> None:
    for param in params:
        grad = param.grad
        if group["weight_decay"]:
            grad = grad.add(param, alpha=group["weight_decay"])
        square_avg, buffer = states[param]["square_avg"], states[param]["momentum_buffer"]
        square_avg.mul_(group["decay"]).addcmul_(grad, grad, value=1 - group["decay"])
        update = grad / (square_avg + group["eps"]).sqrt()
        buffer.mul_(group["momentum"]).add_(update, alpha=group["lr"])
        param.sub_(buffer)


def _step_foreach(group: dict, params: list[torch.Tensor], states) -> None:
    """The same ops as `_step_loop`, each over all parameters at once."""
    if not params:
        return
    grads = [param.grad for param in params]
    if group["weight_decay"]:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    square_avgs = [states[param]["square_avg"] for param in params]
    buffers = [states[param]["momentum_buffer"] for param in params]
    torch._foreach_mul_(square_avgs, group["decay"])
    torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - group["decay"])
    denominators = torch._foreach_add(square_avgs, group["eps"])
    torch._foreach_sqrt_(denominators)
    updates = torch._foreach_div(grads, denominators)
    torch._foreach_mul_(buffers, group["momentum"])
    torch._foreach_add_(buffers, updates, alpha=group["lr"])
    torch._foreach_sub_(params, buffers)


def parameter_groups(model: nn.Module, weight_decay: float, proxy_weight_decay: float) -> list[dict]:
    """Trainable parameters in three groups: conv/linear weights (decayed), norm parameters,
    biases and Proxy Norm's β, γ (not decayed), Proxy Norm's β̃, γ̃ (their own decay)."""
    groups: dict[str, dict] = {
        "decay": dict(params=[], names=[], weight_decay=weight_decay),
        "no_decay": dict(params=[], names=[], weight_decay=0.0),
        "proxy": dict(params=[], names=[], weight_decay=proxy_weight_decay),
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = "proxy" if is_proxy_parameter(name) else ("decay" if param.ndim > 1 else "no_decay")
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [dict(group, group=key) for key, group in groups.items() if group["params"]]


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9, nesterov: bool = False,
                    rmsprop_decay: float = 0.9, eps: float = 1e-3) -> torch.optim.Optimizer:
    # the per-group "names" and "group" entries stay in param_groups for inspection; optimizers ignore them
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)  # check_config refuses it without momentum
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=eps)
    if name == "rmsprop":
        return RMSpropTF(groups, lr=lr, decay=rmsprop_decay, momentum=momentum, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}")


def optimizer_from_config(cfg, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer a TrainConfig names, over `parameter_groups` with its weight decays."""
    groups = parameter_groups(model, cfg.weight_decay, cfg.proxy_weight_decay)
    return build_optimizer(cfg.optimizer, groups, lr, cfg.momentum, cfg.nesterov, cfg.rmsprop_decay, cfg.optimizer_eps)


@dataclass
class LRSchedule:
    """LR multiplier at optimizer step `step` (0-based), for torch's LambdaLR.

    Warm-up: linear, (step + 1) / warmup_steps for step < warmup_steps.
    exponential: decay ** floor(step / (decay_epochs · steps_per_epoch)), counted from step 0 as in
                 the TF EfficientNet code (warm-up overrides the first steps).
    cosine:      0.5 · (1 + cos(π · (step − warmup_steps) / (total_steps − warmup_steps))).
    """

    kind: str
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int = 0
    decay: float = 0.97
    decay_epochs: float = 2.4

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "exponential":
            return self.decay ** math.floor(step / max(self.decay_epochs * self.steps_per_epoch, 1e-12))
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = min((step - self.warmup_steps) / span, 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown LR schedule {self.kind!r}")
