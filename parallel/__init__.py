"""How a model runs across devices: replicas (data parallel), pipeline stages, gradient
accumulation, on torch.distributed (gloo on CPU, nccl on CUDA) under torchrun.

This package replaces the original application's `ipu_pipeline/` (PopTorch on Graphcore IPUs).
"""

from __future__ import annotations

from torch import nn

from .context import Context, MainRankFailed, ParallelError, deterministic_kernels, setup
from .data_parallel import Runner, StepSettings
from .pipeline import PipelineRunner, split_indices


def check_layout(cfg, model: nn.Module) -> None:
    """Refuse layouts that cannot work, before any data is read."""
    split_indices(model, cfg.pipeline_splits)
    if cfg.pipeline_splits and cfg.precision == "fp16":
        raise ParallelError("--pipeline-splits with --precision fp16 is not supported (loss scaling across "
                            "stages); use --precision bf16 or fp32")
    if cfg.pipeline_splits and cfg.compile:
        raise ParallelError("--pipeline-splits with --compile is not supported; drop one of them")
    stages = len(cfg.pipeline_splits) + 1
    if stages > 1 and cfg.pipeline_schedule == "1f1b" and cfg.gradient_accumulation < stages:
        raise ParallelError(
            f"--pipeline-schedule 1f1b needs at least one micro-batch per stage: --gradient-accumulation "
            f"{cfg.gradient_accumulation} is below the {stages} stages; raise it or use --pipeline-schedule gpipe"
        )


def wrap(model: nn.Module, cfg, ctx: Context) -> Runner | PipelineRunner:
    if cfg.pipeline_splits:
        return PipelineRunner(model, ctx, cfg.pipeline_splits, cfg.pipeline_schedule, cfg.channels_last)
    return Runner(model, ctx, cfg.compile, cfg.compile_mode)


__all__ = ["Context", "MainRankFailed", "ParallelError", "PipelineRunner", "Runner", "StepSettings", "check_layout",
           "deterministic_kernels", "setup", "wrap"]
