"""EfficientNet B0-B7 with group convolutions and batch-independent norms (Masters et al. 2021).

The network exposes `stem`, `blocks` (a Sequential of stages, each a Sequential of MBConv blocks),
`head` and `classifier`, so pipeline splits and fine-tuning can name layers by module path
(`blocks.3.0`, `head`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from .config import EfficientNetConfig, NormConfig, spatial_conv_groups
from .norm_act import Role, make_norm_act


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


class SqueezeExcite(nn.Module):
    """Channel gate from pooled features. `scale` (Proxy Norm's 1/σ̃) is folded into the gate."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))
        if scale is not None:
            gate = gate * scale.to(gate.dtype).view(1, -1, 1, 1)
        return x * gate


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
        out = self.spatial(self.expand(x))
        out = self.se(out, self.spatial.norm_act.output_scale())
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
