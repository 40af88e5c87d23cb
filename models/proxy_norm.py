"""Proxy Norm (Labatie et al. 2021): batch-free correction of the channel-wise mean and scale.

After a GN/LN layer without its own affine, the activation z = φ(γ·y + β) is centred and scaled
by the mean and std that the same activation would have on a Gaussian "proxy" input
Y = (1 + γ̃)·U + β̃, U ~ N(0, 1). The expectation over U uses fixed midpoint quantiles, so it is
deterministic, needs no batch statistics, and is identical in training and inference.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

PROXY_PARAM_NAMES = ("proxy_beta", "proxy_gamma")
ACTIVATIONS = {"silu": F.silu, "relu": F.relu}


def proxy_quantiles(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n midpoint quantiles of N(0, 1): sqrt(2)·erfinv(2(i + 0.5)/n − 1), i = 0..n−1."""
    if n < 2:
        raise ValueError(f"proxy_quantiles needs n >= 2, got {n}")
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)).to(dtype)


def proxy_moments(
    gamma: torch.Tensor,
    beta: torch.Tensor,
    proxy_gamma: torch.Tensor,
    proxy_beta: torch.Tensor,
    quantiles: torch.Tensor,
    activation: str = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance of φ(γ·Y + β) with Y = (1 + γ̃)·U + β̃."""
    proxy = (1.0 + proxy_gamma).unsqueeze(1) * quantiles.unsqueeze(0) + proxy_beta.unsqueeze(1)
    activated = ACTIVATIONS[activation](gamma.unsqueeze(1) * proxy + beta.unsqueeze(1))
    return activated.mean(dim=1), activated.var(dim=1, unbiased=False)


class ProxyNormAct(nn.Module):
    """GroupNorm (1 group = LayerNorm) + activation φ (SiLU by default) + Proxy Norm, as one layer.

    `centre_only=False`: output (z − μ̃) / sqrt(σ̃² + ε), used after the stem and expansion convs.
    `centre_only=True`: output z − μ̃; the block folds `output_scale()` into the SE gate (spatial
    conv), or the scale is dropped because pooling and the classifier follow (head).
    """

    def __init__(
        self,
        channels: int,
        num_groups: int,
        eps: float = 1e-3,
        proxy_eps: float = 0.03,
        num_quantiles: int = 200,
        centre_only: bool = False,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if channels % num_groups:
            raise ValueError(f"{channels} channels cannot be split into {num_groups} norm groups")
        self.num_groups = num_groups
        self.eps = eps
        self.proxy_eps = proxy_eps
        self.centre_only = centre_only
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(channels))  # γ
        self.bias = nn.Parameter(torch.zeros(channels))  # β
        self.proxy_gamma = nn.Parameter(torch.zeros(channels))  # γ̃
        self.proxy_beta = nn.Parameter(torch.zeros(channels))  # β̃
        self.register_buffer("quantiles", proxy_quantiles(num_quantiles), persistent=False)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """μ̃ and σ̃² per channel, in at least fp32 whatever autocast does (C × N elements: cheap)."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        device_type = self.weight.device.type
        no_autocast = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else nullcontext()
        with no_autocast:
            return proxy_moments(
                self.weight.to(dtype),
                self.bias.to(dtype),
                self.proxy_gamma.to(dtype),
                self.proxy_beta.to(dtype),
                self.quantiles.to(dtype),
                self.activation,
            )

    def output_scale(self) -> torch.Tensor:
        """1 / sqrt(σ̃² + ε) per channel: what a centred-only output still owes its consumer."""
        return torch.rsqrt(self.moments()[1] + self.proxy_eps)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """γ·norm(x) + β: what the activation sees."""
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = ACTIVATIONS[self.activation](self.pre_activation(x))
        mean, var = self.moments()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.centre_only:
            return activated - mean.to(activated.dtype).view(shape)
        scale = torch.rsqrt(var + self.proxy_eps)
        # (z − μ̃)·s as one fused multiply-add: z·s + (−μ̃·s)
        return torch.addcmul((-mean * scale).to(activated.dtype).view(shape), activated, scale.to(activated.dtype).view(shape))

    def extra_repr(self) -> str:
        mode = "centre_only" if self.centre_only else "normalise"
        return (
            f"{self.weight.numel()}, groups={self.num_groups}, eps={self.eps}, proxy_eps={self.proxy_eps}, "
            f"{self.activation}, {mode}"
        )
