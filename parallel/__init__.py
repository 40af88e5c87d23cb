"""How a model runs across devices: replicas (data parallel), pipeline stages, gradient
accumulation, on torch.distributed (gloo on CPU, nccl on CUDA) under torchrun.

This package replaces the original application's `ipu_pipeline/` (PopTorch on Graphcore IPUs).
"""

from __future__ import annotations

from torch import nn

from .context import Context, ParallelError, setup
from .data_parallel import Runner


def check_layout(cfg, model: nn.Module, ctx: Context) -> None:
    """Refuse layouts that cannot work, before any data is read."""
    names = {name for name, _ in model.named_modules() if name}
    for split in cfg.pipeline_splits:
        if split not in names:
            from training.config import close_matches

            raise ParallelError(f"--pipeline-splits: {split!r} is not a module path of the model"
                                f"{close_matches(split, sorted(names))}")
    if cfg.pipeline_splits:
        raise ParallelError("--pipeline-splits: pipeline stages are not available yet in this version")


def wrap(model: nn.Module, cfg, ctx: Context) -> Runner:
    return Runner(model, ctx)


__all__ = ["Context", "ParallelError", "Runner", "check_layout", "setup", "wrap"]
