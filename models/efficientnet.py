"""EfficientNet B0-B7 with group convolutions and batch-independent norms (Masters et al. 2021).

The network exposes `stem`, `blocks` (a Sequential of stages, each a Sequential of MBConv blocks),
`head` and `classifier`, so pipeline splits and fine-tuning can name layers by module path
(`blocks.3.0`, `head`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from .config import EfficientNetConfig, NormConfig, spatial_conv_groups
from .norm_act import Role, make_norm_act
from .proxy_norm import ProxyNormAct


class ConvNormAct(nn.Module):
    """Conv (no bias) followed by the configured norm + activation layer."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        norm: NormConfig,
        role: Role,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.norm_act = make_norm_act(norm, out_channels, role)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_act(self.conv(x))

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(activation, mean, inv_std): the output is (activation − mean)·inv_std, left to the caller."""
        return self.norm_act.forward_split(self.conv(x))


def conv_with_input_affine(conv: nn.Conv2d, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """conv(x·scale + shift) for per-channel scale and shift, without touching x: the scale goes
    into the weights, and the shift's response (a per-position bias map, the same for every sample,
    border effects of the zero padding included) is one conv of a 1-sample constant input."""
    groups = conv.groups
    out_channels, in_per_group = conv.weight.shape[:2]
    weight_scale = scale.view(groups, 1, in_per_group).expand(groups, out_channels // groups, in_per_group)
    weight = conv.weight * weight_scale.reshape(out_channels, in_per_group, 1, 1).to(conv.weight.dtype)
    out = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, groups)
    constant = shift.view(1, -1, 1, 1).expand(1, -1, *x.shape[2:]).to(x.dtype).contiguous()
    return out + F.conv2d(constant, conv.weight, None, conv.stride, conv.padding, conv.dilation, groups)


class SqueezeExcite(nn.Module):
    """Channel gate from pooled features.

    With Proxy Norm before it, the input arrives uncentred with its per-channel `mean` (μ̃) and
    `inv_std` (1/σ̃) owed: the gate is computed from the centred input, and centring and scale are
    applied in the same multiply as the gate, (x − μ̃)·gate/σ̃ = x·G − μ̃·G, one pass over the
    largest tensors of the block instead of three.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor, mean: torch.Tensor | None = None,
                inv_std: torch.Tensor | None = None) -> torch.Tensor:
        pooled = x.mean((2, 3), keepdim=True)
        if mean is not None:
            mean = mean.to(x.dtype).view(1, -1, 1, 1)
            pooled = pooled - mean
        gate = torch.sigmoid(self.expand(self.act(self.reduce(pooled))))
        if inv_std is not None:
            gate = gate * inv_std.to(gate.dtype).view(1, -1, 1, 1)
        if mean is None:
            return x * gate
        return torch.addcmul(-mean * gate, x, gate)


class MBConv(nn.Module):
    """Inverted residual block: [expand 1x1] → grouped kxk → SE → project 1x1 (+ residual)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        se_ratio: float,
        group_size: int,
        norm: NormConfig,
        drop_path: float,
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand = ConvNormAct(in_channels, mid, 1, norm, "act") if expand_ratio != 1 else nn.Identity()
        self.spatial = ConvNormAct(mid, mid, kernel, norm, "spatial", stride, spatial_conv_groups(mid, group_size))
        self.se = SqueezeExcite(mid, max(1, int(in_channels * se_ratio)))
        self.project = ConvNormAct(mid, out_channels, 1, norm, "project")
        self.has_residual = stride == 1 and in_channels == out_channels
        self.drop_path = StochasticDepth(drop_path, "row") if self.has_residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.expand, ConvNormAct) and isinstance(self.expand.norm_act, ProxyNormAct):
            # the expansion's Proxy Norm (φ(y) − μ̃)/σ̃ is folded into the spatial conv (linear): two
            # elementwise passes fewer each way. Training only: its shift conv costs one sample's worth
            # of conv per batch, which pays for itself at training batch sizes, not at batch 1
            activated, mean, inv_std = self.expand.forward_split(x)
            spatial_in = conv_with_input_affine(self.spatial.conv, activated, inv_std, -mean * inv_std)
            out = self.se(*self.spatial.norm_act.forward_split(spatial_in))
        else:
            out = self.se(*self.spatial.forward_split(self.expand(x)))
        out = self.project(out)
        if self.has_residual:
            out = self.drop_path(out) + x
        return out


class EfficientNet(nn.Module):
    def __init__(self, cfg: EfficientNetConfig) -> None:
        super().__init__()
        self.config = cfg
        norm = cfg.norm
        self.stem = ConvNormAct(cfg.in_channels, cfg.stem_channels, 3, norm, "act", stride=2)

        stages = cfg.stages()
        total_blocks = sum(spec.repeats for spec, _ in stages)
        block_index = 0
        stage_modules = []
        for spec, in_channels in stages:
            blocks = []
            for repeat in range(spec.repeats):
                blocks.append(
                    MBConv(
                        in_channels if repeat == 0 else spec.out_channels,
                        spec.out_channels,
                        spec.kernel,
                        spec.stride if repeat == 0 else 1,
                        spec.expand_ratio,
                        cfg.se_ratio,
                        cfg.group_size,
                        norm,
                        cfg.stochastic_depth * block_index / total_blocks,
                    )
                )
                block_index += 1
            stage_modules.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stage_modules)

        last_channels = stages[-1][0].out_channels
        self.head = ConvNormAct(last_channels, cfg.head_channels, 1, norm, "head")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.head_channels, cfg.num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.forward_features(x)), 1))
