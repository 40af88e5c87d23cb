"""Norm + activation as one pluggable layer, so a normalisation variant is one argument.

`make_norm_act(cfg, channels, role)` returns the right layer for each place in an MBConv network:
  role "act"      stem and expansion convs: norm + SiLU (+ full Proxy Norm)
  role "spatial"  grouped/depthwise conv: norm + SiLU (+ Proxy Norm centring; scale goes to the SE)
  role "project"  projection conv: norm only (with Proxy Norm: scale but no shift)
  role "head"     final 1x1 conv: norm + SiLU (+ Proxy Norm centring only)
Every such layer takes an optional `table` of precomputed Proxy Norm moments (see
`proxy_norm.proxy_table`); layers without Proxy Norm ignore it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import NormConfig
from .proxy_norm import ProxyNormAct, ProxyTable, activate

Role = Literal["act", "spatial", "project", "head"]
_ACT_MODULES: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU}


class NormAct(nn.Module):
    """BatchNorm / GroupNorm / LayerNorm (GroupNorm with 1 group) with affine, then optional activation."""

    def __init__(self, cfg: NormConfig, channels: int, apply_act: bool = True, activation: str = "silu") -> None:
        super().__init__()
        if cfg.kind == "batch":
            self.norm: nn.Module = nn.BatchNorm2d(channels, eps=cfg.resolved_eps)
        else:
            self.norm = nn.GroupNorm(_checked_groups(cfg, channels), channels, eps=cfg.resolved_eps)
        if activation not in _ACT_MODULES:
            raise ValueError(f"activation must be one of {', '.join(_ACT_MODULES)}, got {activation!r}")
        self.activation = activation if apply_act else None  # applied by `activate`: in place only without autograd
        self.act: nn.Module = _ACT_MODULES[activation]() if apply_act else nn.Identity()  # shown in print(model)

    def forward_split(self, x: torch.Tensor, table: ProxyTable | None = None) -> tuple[torch.Tensor, None, None]:
        return self(x), None, None

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def forward(self, x: torch.Tensor, table: ProxyTable | None = None) -> torch.Tensor:
        y = self.norm(x)
        return y if self.activation is None else activate(y, self.activation)


class ScaleOnlyGroupNorm(nn.Module):
    """GroupNorm with a learned per-channel scale and no shift (projection conv under Proxy Norm)."""

    def __init__(self, channels: int, num_groups: int, eps: float) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor, table: ProxyTable | None = None) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, None, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, groups={self.num_groups}, eps={self.eps}"


def _checked_groups(cfg: NormConfig, channels: int) -> int:
    groups = cfg.num_groups
    if channels % groups:
        raise ValueError(f"norm_groups={groups} does not divide a layer of {channels} channels")
    return groups


def make_norm_act(cfg: NormConfig, channels: int, role: Role, activation: str = "silu") -> nn.Module:
    if role not in ("act", "spatial", "project", "head"):
        raise ValueError(f"unknown norm role {role!r}")
    if not cfg.proxy_norm:
        return NormAct(cfg, channels, apply_act=role != "project", activation=activation)
    groups = _checked_groups(cfg, channels)
    if role == "project":
        return ScaleOnlyGroupNorm(channels, groups, cfg.resolved_eps)
    return ProxyNormAct(
        channels,
        groups,
        eps=cfg.resolved_eps,
        proxy_eps=cfg.proxy_eps,
        num_quantiles=cfg.proxy_quantiles,
        centre_only=role != "act",
        activation=activation,
    )
