"""Multiply-accumulates per image, counted by `torch.utils.flop_counter` (conv + matmul only).

"FLOPs" in the EfficientNet papers are multiply-accumulates, so MACs = counted FLOPs / 2.
Counting runs on the meta device: shapes only, no memory or compute, so B7 at 600 px is instant.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, resolution: int, in_channels: int = 3) -> int:
    """MACs for one image at `resolution` x `resolution` (the model is not changed)."""
    meta_model = copy.deepcopy(model).to("meta") if _has_real_params(model) else model
    meta_model.eval()
    x = torch.empty(1, in_channels, resolution, resolution, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_model(x)
    return counter.get_total_flops() // 2


def _has_real_params(model: nn.Module) -> bool:
    return any(p.device.type != "meta" for p in model.parameters())
