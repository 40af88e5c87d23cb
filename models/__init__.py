"""EfficientNet B0-B7 with group size, expansion ratio and normalisation (+ Proxy Norm) as options."""

from __future__ import annotations

from torch import nn

from .config import FAMILY, EfficientNetConfig, NormConfig, spatial_conv_groups
from .efficientnet import EfficientNet, MBConv
from .proxy_norm import PROXY_PARAM_NAMES, ProxyNormAct

# The paper's variants, as model overrides.
VARIANTS: dict[str, dict[str, object]] = {
    "g1-bn": dict(group_size=1, expand_ratio=6, norm="batch"),
    "g1-gn": dict(group_size=1, expand_ratio=6, norm="group"),
    "g16-gn": dict(group_size=16, expand_ratio=4, norm="group"),
    "g16-lnpn": dict(group_size=16, expand_ratio=4, norm="layer", proxy_norm=True),
}


def list_models() -> list[str]:
    return list(FAMILY)


def create_model(name: str, **overrides: object) -> EfficientNet:
    """Build `efficientnet-b0` ... `efficientnet-b7`; overrides are EfficientNetConfig/NormConfig fields.

    Norm options may be passed flat: norm="layer", norm_groups=4, norm_eps=1e-3, proxy_norm=True.
    """
    return EfficientNet(EfficientNetConfig.from_name(name, **overrides))


def is_proxy_parameter(name: str) -> bool:
    """True for Proxy Norm's β̃ and γ̃, which take their own weight decay."""
    return name.rsplit(".", 1)[-1] in PROXY_PARAM_NAMES


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "FAMILY",
    "VARIANTS",
    "EfficientNet",
    "EfficientNetConfig",
    "MBConv",
    "NormConfig",
    "ProxyNormAct",
    "count_parameters",
    "create_model",
    "is_proxy_parameter",
    "list_models",
    "spatial_conv_groups",
]
