"""The property Proxy Norm fixes, as a number: channel-wise collapse with depth.

In a deep stack of random conv → norm → activation layers, LayerNorm lets each channel's mean
grow until the activations are almost constant per channel; BatchNorm and LN + Proxy Norm do not.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import NormConfig
from .norm_act import make_norm_act


def channelwise_constant_share(x: torch.Tensor) -> float:
    """Mean over channels of each channel's squared mean, over the total power (0 ≤ share ≤ 1)."""
    channel_means = x.transpose(0, 1).flatten(1).mean(dim=1)
    return float(channel_means.pow(2).mean() / x.pow(2).mean())


def _randomise_affine(layer: nn.Module, generator: torch.Generator, beta_std: float, gamma_std: float) -> None:
    """γ ~ N(1, gamma_std²), β ~ N(0, beta_std²) on whichever module holds them."""
    for module in layer.modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(weight, nn.Parameter) and isinstance(bias, nn.Parameter):
            with torch.no_grad():
                weight.copy_(1.0 + gamma_std * torch.randn(weight.shape, generator=generator))
                bias.copy_(beta_std * torch.randn(bias.shape, generator=generator))


@torch.no_grad()
def collapse_profile(
    norm: NormConfig,
    depth: int = 30,
    width: int = 128,
    batch: int = 16,
    size: int = 8,
    kernel: int = 1,
    activation: str = "relu",
    beta_std: float = 0.2,
    gamma_std: float = 0.2,
    seed: int = 0,
) -> list[float]:
    """Channel-wise constant share of each layer's pre-activation γ·norm(h) + β, layer by layer.

    Inputs are i.i.d. Gaussian; conv weights are He-initialised; norms run in training mode.
    ReLU by default, as in the Proxy Norm paper's analysis (SiLU collapses more slowly).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, width, size, size, generator=generator)
    shares = []
    for _ in range(depth):
        conv = nn.Conv2d(width, width, kernel, padding=kernel // 2, bias=False)
        nn.init.normal_(conv.weight, std=(2.0 / (width * kernel * kernel)) ** 0.5, generator=generator)
        layer = make_norm_act(norm, width, "act", activation=activation)
        _randomise_affine(layer, generator, beta_std, gamma_std)
        layer.train()
        h = conv(x)
        shares.append(channelwise_constant_share(layer.pre_activation(h)))
        x = layer(h)
    return shares
