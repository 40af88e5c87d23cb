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
    """Per-channel mean and population variance of φ(γ·Y + β) with Y = (1 + γ̃)·U + β̃.

    Written as φ(a·U + b) with a = γ·(1 + γ̃), b = γ·β̃ + β, in few ops: this runs every step.
    """
    slope = torch.addcmul(gamma, gamma, proxy_gamma)
    offset = torch.addcmul(beta, gamma, proxy_beta)
    if torch.compiler.is_compiling():  # Inductor fuses the plain formula itself
        return _moments_of_activation(slope, offset, quantiles, activation)
    return ActivationMoments.apply(slope, offset, quantiles, activation)


# On CPU, channels are evaluated in blocks of about this many C × N elements (1 MB in fp32), so that
# each block's passes stay in cache instead of streaming the whole C × N table through memory. On a
# GPU the table is one block: it is small for a GPU (B0: 2.6 million elements), and every block
# costs a dozen more kernel launches, which is what Proxy Norm is short of there (docs C.5)
MOMENT_BLOCK_ELEMENTS = 1 << 18


def _channel_blocks(channels: int, count: int, device: torch.device) -> list[slice]:
    step = max(1, MOMENT_BLOCK_ELEMENTS // count) if device.type == "cpu" else channels
    return [slice(start, start + step) for start in range(0, channels, step)]


def _centred_activation(slope: torch.Tensor, offset: torch.Tensor, quantiles: torch.Tensor, activation: str):
    """(pre-activation, activation minus its mean, mean) of φ(slope·U + offset) over the quantiles."""
    pre = torch.outer(slope, quantiles).add_(offset.unsqueeze(1))  # 4x faster than a broadcast addcmul
    activated = ACTIVATIONS[activation](pre)
    mean = activated.mean(dim=1, keepdim=True)
    return pre, activated.sub_(mean), mean.squeeze(1)  # two-pass variance: torch.var(_mean) is 4x slower here


def _moments_of_activation(slope: torch.Tensor, offset: torch.Tensor, quantiles: torch.Tensor, activation: str):
    """(mean, variance) of φ(slope·U + offset) over the quantiles: the plain formula."""
    _, centred, mean = _centred_activation(slope, offset, quantiles, activation)
    return mean, (centred * centred).mean(dim=1)


class ActivationMoments(torch.autograd.Function):
    """(mean, variance) of φ(slope·U + offset) per channel, with a hand-written backward.

    The moments are a C × N computation (B0: 13,248 channels × 200 quantiles, every step). Nothing
    of that size is kept for the backward, which recomputes it from the per-channel inputs: keeping
    the pre-activation and the centred activation (21 MB for B0, the first tensors of a step and
    the last freed) was half of Proxy Norm's memory cost over LN (B0 at 224 px, batch 4 and 32).
    Both ways run block by block over the channels, so each block's passes stay in cache.
    Backward, per block, four C × N passes where plain autograd runs about ten:
        ∂/∂φ = (ḡ_mean + 2·ḡ_var·(φ − mean)) / N,  ∂/∂pre = φ′(pre)·∂/∂φ,
        ∂/∂offset = Σ_N ∂/∂pre,  ∂/∂slope = (∂/∂pre) · U.
    """

    @staticmethod
    def forward(ctx, slope: torch.Tensor, offset: torch.Tensor, quantiles: torch.Tensor, activation: str):
        blocks = [_moments_of_activation(slope[block], offset[block], quantiles, activation)
                  for block in _channel_blocks(slope.shape[0], quantiles.shape[0], slope.device)]
        ctx.activation = activation
        ctx.save_for_backward(slope, offset, quantiles)
        if len(blocks) == 1:
            return blocks[0]
        return torch.cat([mean for mean, _ in blocks]), torch.cat([var for _, var in blocks])

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_var: torch.Tensor):  # unused outputs get zeros
        slope, offset, quantiles = ctx.saved_tensors
        count = quantiles.shape[0]
        grad_slope, grad_offset = [], []
        for block in _channel_blocks(slope.shape[0], count, slope.device):
            pre, centred, _ = _centred_activation(slope[block], offset[block], quantiles, ctx.activation)
            grad_activated = centred.mul_(((2 / count) * grad_var[block]).unsqueeze(1)).add_(
                (grad_mean[block] / count).unsqueeze(1))
            grad_pre = _ACTIVATION_BACKWARD[ctx.activation](grad_activated, pre)
            if ctx.needs_input_grad[0]:
                grad_slope.append(grad_pre @ quantiles)
            if ctx.needs_input_grad[1]:
                grad_offset.append(grad_pre.sum(1))
        return (torch.cat(grad_slope) if grad_slope else None, torch.cat(grad_offset) if grad_offset else None,
                None, None)


def activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    """φ(y) for a freshly computed y: in place where autograd records no graph (inference, no_grad),
    one tensor and one pass fewer. Where it records one, out of place: in place, autograd would copy
    y to keep it for the backward, which costs more than a new tensor (B0 training, norm layers'
    SiLU: +1.7 % fp32, +5 % bf16 out of place)."""
    return ACTIVATIONS[activation](y, inplace=not (torch.is_grad_enabled() and y.requires_grad))


ProxyTable = dict  # ProxyNormAct -> (μ̃, 1/sqrt(σ̃² + ε)), precomputed for one forward pass


def apply_affine(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
    """x·scale + shift, per channel (dimension 1); scale None means 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    shift = shift.to(x.dtype).view(shape)
    return x + shift if scale is None else torch.addcmul(shift, x, scale.to(x.dtype).view(shape))


def full_precision(tensor: torch.Tensor):
    """(dtype, context) to compute in at least fp32 whatever autocast does: the moments, and the
    small products of the conv folds."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    device_type = tensor.device.type
    context = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else nullcontext()
    return dtype, context


def proxy_table(layers: list[ProxyNormAct], cache: dict | None = None) -> ProxyTable:
    """μ̃ and 1/σ̃ of many Proxy Norm layers, from one evaluation over their concatenated channels.

    Each layer's moments are a C × N computation: per-op overhead, not arithmetic, is their cost,
    and B0 has 33 such layers. Batched, a training step spends a dozen small ops on them instead of
    several hundred (forward and backward). Layers that differ in activation, ε, quantile count,
    device or dtype are batched separately.

    `cache` (a dict the caller keeps): where autograd records no graph (inference, no_grad), the
    moments are reused while the parameters and quantiles they came from are equal, value for
    value, to the last ones: a comparison of a few thousand numbers instead of the C × N passes
    (B0 inference at batch 1 on a 2-core CPU: about 3 ms of a 19 ms forward). Values, not version
    counters, are compared, because writes through `.data` do not bump a parameter's version.
    """
    groups: dict[tuple, list[ProxyNormAct]] = {}
    for layer in layers:
        key = (layer.activation, layer.proxy_eps, layer.quantiles.numel(), layer.weight.device, layer.weight.dtype)
        groups.setdefault(key, []).append(layer)
    reuse = cache is not None and not torch.is_grad_enabled()
    kept = {}
    table: ProxyTable = {}
    for key, members in groups.items():
        activation, proxy_eps, *_ = key
        first = members[0]
        dtype, context = full_precision(first.weight)
        with context:
            params = [
                torch.cat([getattr(layer, name) for layer in members]).to(dtype)
                for name in ("weight", "bias", "proxy_gamma", "proxy_beta")
            ]
            inputs = (*params, first.quantiles.to(dtype))
            reusable = reuse and first.weight.device.type != "meta"  # meta tensors hold no values to compare
            cached = cache.get(key) if reusable else None
            if cached is not None and all(
                old.shape == new.shape and torch.equal(old, new) for old, new in zip(cached[0], inputs)
            ):
                mean, inv_std = cached[1]
            else:
                mean, var = proxy_moments(*inputs, activation)
                inv_std = torch.rsqrt(var + proxy_eps)
        if reusable:  # the quantiles may be the buffer itself (no cast): keep a copy to compare against
            kept[key] = ((*params, inputs[-1].clone()), (mean, inv_std))
        sizes = [layer.weight.numel() for layer in members]
        for layer, layer_mean, layer_inv_std in zip(members, mean.split(sizes), inv_std.split(sizes)):
            table[layer] = (layer_mean, layer_inv_std)
    if reuse:  # only the groups of this call: entries of another device or dtype are dropped
        cache.clear()
        cache.update(kept)
    return table


_ACTIVATION_BACKWARD = {
    "silu": lambda grad, y: torch.ops.aten.silu_backward(grad, y),
    "relu": lambda grad, y: torch.ops.aten.threshold_backward(grad, y, 0),
}


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor stored NHWC (and not also NCHW, as tensors with C = 1 or H = W = 1 are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def ready_to_add(x: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """`term` (1 × C × 1 × 1 or N × C × 1 × 1), in a form that adds to x fast.

    On CPU, PyTorch adds such a broadcast term to a bf16/fp16 channels_last tensor in a scalar
    loop unless C is a multiple of 32 (AVX-512, bf16, about 3.3M elements: 3.9 ms at C = 16, 1.4 at
    48, 0.28 at 32). There the term is written out over the positions first, one sample's worth
    for a per-channel term (3.5M elements, C = 48: 1.46 → 0.28 ms), x's whole shape for a
    per-sample one.
    """
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.shape[1] % 32
            and is_channels_last(x) and not torch.compiler.is_compiling()):
        return term.expand(term.shape[0], *x.shape[1:]).contiguous(memory_format=torch.channels_last)
    return term


def scale_shift_(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
    """x·scale + shift per channel (dimension 1), in place on x; scale None means 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if scale is not None:
        x.mul_(scale.to(x.dtype).view(shape))
    return x.add_(ready_to_add(x, shift.to(x.dtype).view(shape)))


class ScaledShiftedActivation(torch.autograd.Function):
    """out = φ(y)·scale + shift (per channel; scale None means 1), saving only y.

    φ(y) is recomputed in backward instead of kept, as in the authors' implementation: one
    full-size tensor less per layer. Forward works in place on φ(y); backward needs no `neg` pass.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor, activation: str):
        out = scale_shift_(ACTIVATIONS[activation](y), scale, shift)  # out of place: y is saved
        ctx.activation = activation
        ctx.has_scale = scale is not None
        ctx.save_for_backward(y, scale if scale is not None else shift.new_empty(0))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, scale = ctx.saved_tensors
        shape = (1, -1) + (1,) * (y.dim() - 2)
        dims = [0, *range(2, y.dim())]
        accumulate = torch.promote_types(grad.dtype, torch.float32)  # per-channel sums in >= fp32
        grad_shift = grad.sum(dims, dtype=accumulate) if ctx.needs_input_grad[2] else None
        grad_scale = None
        if ctx.has_scale:
            if ctx.needs_input_grad[1]:
                grad_scale = (grad * ACTIVATIONS[ctx.activation](y)).sum(dims, dtype=accumulate)
            grad = grad * scale.to(grad.dtype).view(shape)
        grad_y = _ACTIVATION_BACKWARD[ctx.activation](grad, y) if ctx.needs_input_grad[0] else None
        return grad_y, grad_scale, grad_shift, None


class ProxyNormAct(nn.Module):
    """GroupNorm (1 group = LayerNorm) + activation φ (SiLU by default) + Proxy Norm, as one layer.

    `centre_only=False`: output (z − μ̃) / sqrt(σ̃² + ε), used after the stem and expansion convs.
    `centre_only=True`: output z − μ̃; the scale is dropped because pooling and the classifier follow
    (head). The spatial conv's layer is used through `forward_split`: its SE gate does the rest.
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
        dtype, context = full_precision(self.weight)
        with context:
            return proxy_moments(
                self.weight.to(dtype),
                self.bias.to(dtype),
                self.proxy_gamma.to(dtype),
                self.proxy_beta.to(dtype),
                self.quantiles.to(dtype),
                self.activation,
            )

    def affine(self, table: ProxyTable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ̃, 1/sqrt(σ̃² + ε)): from `table` when the model precomputed it, else computed here."""
        if table is not None and self in table:
            return table[self]
        mean, var = self.moments()
        return mean, torch.rsqrt(var + self.proxy_eps)

    def forward_split(
        self, x: torch.Tensor, table: ProxyTable | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(φ(y), μ̃, 1/σ̃): the normalised output (φ(y) − μ̃)/σ̃ left for the consumer to finish in
        an op it runs anyway (a conv, the SE gate, the pooling), whatever `centre_only` says."""
        mean, inv_std = self.affine(table)
        return activate(self.pre_activation(x), self.activation), mean, inv_std

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """γ·norm(x) + β: what the activation sees."""
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def owed_affine(self, mean: torch.Tensor, inv_std: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(scale, shift) that turn φ(y) into this layer's output: (φ(y) − μ̃)·s = φ(y)·s + (−μ̃·s),
        or φ(y) − μ̃ (scale None) when `centre_only`."""
        if self.centre_only:
            return None, -mean
        return inv_std, -mean * inv_std

    def forward(self, x: torch.Tensor, table: ProxyTable | None = None) -> torch.Tensor:
        y = self.pre_activation(x)
        scale, shift = self.owed_affine(*self.affine(table))
        if torch.compiler.is_compiling():
            # under torch.compile the plain formula lets Inductor fuse these passes into one kernel
            # and pick what to recompute; the hand-written Function would hide them from it
            return apply_affine(ACTIVATIONS[self.activation](y), scale, shift)
        if not (torch.is_grad_enabled() and (y.requires_grad or shift.requires_grad)):  # no graph: all in place
            return scale_shift_(activate(y, self.activation), scale, shift)
        return ScaledShiftedActivation.apply(y, scale, shift, self.activation)

    def extra_repr(self) -> str:
        mode = "centre_only" if self.centre_only else "normalise"
        return (
            f"{self.weight.numel()}, groups={self.num_groups}, eps={self.eps}, proxy_eps={self.proxy_eps}, "
            f"{self.activation}, {mode}"
        )
