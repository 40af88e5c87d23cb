"""Weight averages: a per-step EMA and the paper's exponential average of epoch checkpoints,
both `torch.optim.swa_utils.AveragedModel` with an EMA update (buffers averaged too)."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def make_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """None when decay is 0 (averaging off)."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
