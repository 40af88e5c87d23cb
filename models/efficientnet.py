"""EfficientNet B0-B7 with group convolutions and batch-independent norms (Masters et al. 2021).

The network exposes `stem`, `blocks` (a Sequential of stages, each a Sequential of MBConv blocks),
`head` and `classifier`, so pipeline splits and fine-tuning can name layers by module path
(`blocks.3.0`, `head`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from .config import EfficientNetConfig, NormConfig, spatial_conv_groups
from .norm_act import Role, make_norm_act
from .proxy_norm import (
    ProxyNormAct,
    ProxyTable,
    apply_affine,
    full_precision,
    is_channels_last,
    proxy_table,
    ready_to_add,
)

InputAffine = tuple[torch.Tensor, torch.Tensor]  # per-channel (scale, shift) owed by a tensor


def conv_with_input_affine(conv: nn.Conv2d, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """conv(x·scale + shift) for per-channel scale and shift, without forming x·scale + shift.

    The scale goes into the weights. The shift's response is a constant per output channel (a conv
    bias, free) except where the kernel overlaps the zero padding. There, a correction is added to
    the border rows and columns only (or, where they are a large share of the output, to all of it
    in one pass). The correction is one small matrix product: the per-tap sums of weight × shift
    (C_out × taps) times a cached matrix of which taps each output position loses to the padding.
    """
    groups = conv.groups
    out_channels, in_per_group = conv.weight.shape[:2]
    # the weights by group, G × C_out/G × C_in/G × kh × kw (a view in any memory format), so that a
    # per-input-channel value broadcasts over them as G × 1 × C_in/G × 1 × 1: no copy of it per output channel
    by_group = conv.weight.unflatten(0, (groups, out_channels // groups))
    per_input = (groups, 1, in_per_group, 1, 1)
    weight = (by_group * scale.to(conv.weight.dtype).view(per_input)).flatten(0, 1)
    _, no_autocast = full_precision(conv.weight)  # small products: autocast's bf16 would only slow them
    with no_autocast:  # each tap's response to the shift, C_out × taps
        taps = (by_group * shift.to(conv.weight.dtype).view(per_input)).sum(2).reshape(out_channels, -1)
    interior = taps.sum(1)
    bias = interior if conv.bias is None else conv.bias + interior
    out = F.conv2d(x, weight, bias.to(weight.dtype), conv.stride, conv.padding, conv.dilation, groups)
    geometry = tuple((x.shape[2 + i], out.shape[2 + i], conv.kernel_size[i], conv.stride[i], conv.padding[i],
                      conv.dilation[i]) for i in (0, 1))
    borders = [_padded_border(*g) for g in geometry]
    share = 1.0 if None in borders else _border_share(out.shape[2:], borders)
    if share == 0:  # no output position sees the padding (a 1×1 conv): the bias is the whole response
        return out
    compiling = torch.compiler.is_compiling()
    padding_loss = (_padding_loss.__wrapped__ if compiling else _padding_loss)(*geometry, taps.dtype, taps.device)
    with no_autocast:
        correction = (taps @ padding_loss).view(1, out_channels, *out.shape[2:]).to(out.dtype)
    if compiling:  # Inductor fuses a plain add
        return out + correction
    whole = None in borders or share > BORDER_SHARE_FOR_STRIPS or out.device.type != "cpu"
    return AddAtBorder.apply(out, correction, *((None, None) if whole else borders))


# Below this many elements in a layer's output, its Proxy Norm is applied where it sits instead of
# folded into the next conv. A fold costs a fixed set of small ops on the weights (about 0.3-1 ms a
# layer on a 2-core CPU), applying it elementwise passes that grow with the tensor: measured per
# MBConv block, training, forward and backward, the crossover is near 1M elements in fp32 and bf16
# (docs/benchmarks.md A.3). Small micro-batches (the paper's IPU configs used 4-20 images) gain most.
# On a GPU in eager mode nothing is folded: its training step waits on kernel launches (on an H100
# the GPU was idle a third of a B0 LN+PN fp32 step), and the fold's small weight ops are more
# launches than the elementwise passes they save: B0 LN+PN, 160 px, batch 128, fp32 trained 20 %
# faster unfolded (docs/benchmarks.md C.8). Compiled, where launches are fused or replayed as CUDA
# graphs, the folds stay, as they were measured there.
FOLD_MIN_ELEMENTS = 1_000_000

# Above this share of border positions, one in-place add over the whole output beats adding to the
# border strips, which are narrow and strided (measured on CPU: 3×3 kernels at 56-112 px gain from
# strips, 5×5 kernels and maps of 28 px or less lose). A GPU always adds to the whole output: the
# strips are 4 kernels forward and 9 backward against 1 and 1, and its launches are what is scarce
BORDER_SHARE_FOR_STRIPS = 0.1


def _border_share(size: tuple[int, int], borders: list[tuple[int, int]]) -> float:
    """The share of output positions that see the zero padding."""
    (top, bottom), (left, right) = borders
    return 1 - (size[0] - top - bottom) * (size[1] - left - right) / (size[0] * size[1])


def _padded_border(size_in: int, size_out: int, kernel: int, stride: int, padding: int | str,
                   dilation: int) -> tuple[int, int] | None:
    """(first, last): how many output rows (or columns) at each end see the zero padding; None
    when they cover the whole output."""
    if not isinstance(padding, int):
        return None
    first = -(-padding // stride)  # i·stride − padding < 0
    last_inside = (size_in - 1 + padding - (kernel - 1) * dilation) // stride
    last = size_out - 1 - last_inside
    return (first, last) if first + last < size_out else None


def _inside_taps(size_in: int, size_out: int, kernel: int, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """inside[r, k] = 1 where tap k of output row r falls inside the input, else 0."""
    position = torch.arange(size_out).unsqueeze(1) * stride - padding + torch.arange(kernel) * dilation
    return ((position >= 0) & (position < size_in)).double()


@functools.lru_cache(maxsize=128)
def _padding_loss(rows: tuple[int, ...], cols: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """taps × (output rows · output columns): M[(k, l), (i, j)] = inside(i, k)·inside(j, l) − 1, so
    that per-tap responses times M give what each output position loses to the zero padding."""
    with torch.inference_mode(False):  # cached: must be usable by autograd whatever mode made it
        inside_rows, inside_cols = _inside_taps(*rows), _inside_taps(*cols)
        kept = torch.einsum("ik,jl->klij", inside_rows, inside_cols)
        return (kept - 1).reshape(kept.shape[0] * kept.shape[1], -1).to(dtype=dtype, device=device)


def launch_bound(x: torch.Tensor) -> bool:
    """Whether ops on `x` run eager on a GPU, where a step waits on kernel launches: there a fold's
    small ops on the weights cost more than the elementwise passes they save (docs/benchmarks.md C.8)."""
    return x.device.type != "cpu" and not torch.compiler.is_compiling()


class AddAtBorder(torch.autograd.Function):
    """out[border] += correction[border], in place, for a correction that is 0 in the interior.

    The gradient of `out` passes through untouched, and the correction's gradient is the batch sum
    on the border strips: no full-size pass either way, unlike `out + correction`. With `rows` and
    `cols` None, the border is the whole output (one in-place add; one batch sum in backward).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, correction: torch.Tensor, rows: tuple[int, int] | None,
                cols: tuple[int, int] | None) -> torch.Tensor:
        if rows is None or cols is None:
            ctx.strips = [(slice(None), slice(None))]
        else:
            height, width = out.shape[2:]
            (top, bottom), (left, right) = rows, cols
            middle = slice(top, height - bottom)
            strips = [(slice(0, top), slice(None)), (slice(height - bottom, height), slice(None)),
                      (middle, slice(0, left)), (middle, slice(width - right, width))]
            ctx.strips = [(h, w) for h, w in strips if out[:, :, h, w].numel()]
        ctx.correction_dtype = correction.dtype
        if is_channels_last(out):  # a broadcast add in a layout unlike out's takes a slow path
            correction = correction.contiguous(memory_format=torch.channels_last)
        for h, w in ctx.strips:  # add_ on the view: `+=` on an index would also copy the strip onto itself
            out[:, :, h, w].add_(correction[:, :, h, w])
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_correction = None
        if ctx.needs_input_grad[1] and ctx.strips == [(slice(None), slice(None))]:
            grad_correction = batch_sum(grad).to(ctx.correction_dtype)
        elif ctx.needs_input_grad[1]:
            grad_correction = grad.new_zeros((1, *grad.shape[1:]), dtype=ctx.correction_dtype)
            for h, w in ctx.strips:
                grad_correction[:, :, h, w] = batch_sum(grad[:, :, h, w])
        return grad, grad_correction, None, None


def batch_sum(x: torch.Tensor) -> torch.Tensor:
    """x.sum(0, keepdim=True), reduced in memory order.

    On CPU, PyTorch's sum over the batch of a channels_last view is 20× slower than the same sum
    taken over its NHWC permutation (where the batch is outermost, as in NCHW). No `dtype=`: CPU
    and CUDA sums of bf16/fp16 accumulate in fp32 anyway, and asking for an fp32 result takes a
    path 15× slower.
    """
    if x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1:  # channels innermost: channels_last
        return x.permute(0, 2, 3, 1).sum(0, keepdim=True).permute(0, 3, 1, 2)
    return x.sum(0, keepdim=True)


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

    def forward(self, x: torch.Tensor, table: ProxyTable | None = None,
                input_affine: InputAffine | None = None) -> torch.Tensor:
        return self.norm_act(self.apply_conv(x, input_affine), table)

    def forward_split(
        self, x: torch.Tensor, table: ProxyTable | None = None, input_affine: InputAffine | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(activation, mean, inv_std): the output is (activation − mean)·inv_std, left to the caller."""
        return self.norm_act.forward_split(self.apply_conv(x, input_affine), table)

    def apply_conv(self, x: torch.Tensor, input_affine: InputAffine | None = None) -> torch.Tensor:
        """conv(x), or conv(x·scale + shift) for `input_affine` = (scale, shift), without forming it."""
        return self.conv(x) if input_affine is None else conv_with_input_affine(self.conv, x, *input_affine)

    def forward_for_conv(
        self, x: torch.Tensor, table: ProxyTable | None, input_affine: InputAffine | None, fold: bool
    ) -> tuple[torch.Tensor, InputAffine | None]:
        """(a, affine) such that this layer's output is a·scale + shift, affine = (scale, shift).

        With `fold` and a full Proxy Norm, on an output of at least FOLD_MIN_ELEMENTS (not on an
        eager GPU), its (φ(y) − μ̃)/σ̃ is left as an affine for the next conv to fold into its
        weights (two elementwise passes fewer each way); otherwise it is applied here and affine
        is None.
        """
        norm_act = self.norm_act
        if not (fold and isinstance(norm_act, ProxyNormAct) and not norm_act.centre_only):
            return self(x, table, input_affine), None
        z = self.apply_conv(x, input_affine)
        if z.numel() < FOLD_MIN_ELEMENTS or launch_bound(z):
            return norm_act(z, table), None
        activated, mean, inv_std = norm_act.forward_split(z, table)
        return activated, norm_act.owed_affine(mean, inv_std)


class SpatialMean(torch.autograd.Function):
    """x.mean((2, 3), keepdim=True) whose backward returns a dense gradient in x's memory format.

    The built-in backward returns a broadcast view, which autograd then adds to the gradient of the
    SE multiply; for bf16 channels_last tensors that broadcast add takes a slow path on CPU (14 ms
    against 1 ms on B0's first block). Writing it dense first costs one fast pass. The forward is a
    sum divided by the count: on CPU, `mean` of bf16 is 2-6× slower than `sum` (same fp32
    accumulation inside).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        ctx.memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return x.sum((2, 3), keepdim=True).div_(x.shape[2] * x.shape[3])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        count = ctx.shape[2] * ctx.shape[3]
        return (grad / count).expand(ctx.shape).contiguous(memory_format=ctx.memory_format)


def subtract_per_sample(x: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """x − term for a term of shape N × C × 1 × 1, computed as x + (−term).

    The backward of x − term writes −grad in full before summing it over positions for the term;
    the backward of x + (−term) sums grad itself and negates N × C values. For bf16 channels_last
    on CPU the term may need writing out first (`ready_to_add`): B0's projections have 16, 24,
    40, 80 and 112 channels.
    """
    return x + ready_to_add(x, -term)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over height and width, keeping them as size-1 dimensions."""
    if torch.compiler.is_compiling():
        return x.mean((2, 3), keepdim=True)
    return SpatialMean.apply(x)


class SqueezeExcite(nn.Module):
    """Channel gate from pooled features.

    With Proxy Norm before it, the input arrives uncentred with its per-channel `mean` (μ̃) and
    `inv_std` (1/σ̃) owed: the gate is computed from the centred input, and the scale goes into the
    gate, (x − μ̃)·gate/σ̃ = x·G − μ̃·G. `forward_split` returns the two terms apart: μ̃·G is
    constant over positions, so the block subtracts it after the 1×1 projection, from a smaller tensor.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        # out of place: in place, autograd would copy the small tensor to keep it for the backward
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward_split(self, x: torch.Tensor, mean: torch.Tensor | None = None,
                      inv_std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x·G, μ̃·G): the gated output is x·G − μ̃·G, μ̃·G (N × C × 1 × 1) None without μ̃."""
        pooled = spatial_mean(x)
        if mean is not None:
            mean = mean.to(x.dtype).view(1, -1, 1, 1)
            pooled = pooled - mean
        gate = torch.sigmoid(self.expand(self.act(self.reduce(pooled))))
        if inv_std is not None:
            gate = gate * inv_std.to(gate.dtype).view(1, -1, 1, 1)
        return x * gate, None if mean is None else mean * gate

    def forward(self, x: torch.Tensor, mean: torch.Tensor | None = None,
                inv_std: torch.Tensor | None = None) -> torch.Tensor:
        gated, mean_term = self.forward_split(x, mean, inv_std)
        return gated if mean_term is None else gated - mean_term


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
        self.grad_checkpointing = False  # set by EfficientNet.set_grad_checkpointing

    def forward(self, x: torch.Tensor, table: ProxyTable | None = None,
                input_affine: InputAffine | None = None) -> torch.Tensor:
        """`input_affine` = (scale, shift): the block's input is really x·scale + shift per channel,
        a Proxy Norm the layer before left for this block's first conv to apply."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # only the inputs are kept; backward runs the block again (same RNG state for drop-path)
            return checkpoint(self.forward_block, x, table, input_affine, use_reentrant=False)
        return self.forward_block(x, table, input_affine)

    def forward_block(self, x: torch.Tensor, table: ProxyTable | None = None,
                      input_affine: InputAffine | None = None) -> torch.Tensor:
        if input_affine is not None and self.has_residual:  # the residual needs the real input
            x, input_affine = apply_affine(x, *input_affine), None
        hidden, pending = x, input_affine
        if isinstance(self.expand, ConvNormAct):
            # in training (not on an eager GPU), the expansion's Proxy Norm goes into the spatial
            # conv where its output is large (FOLD_MIN_ELEMENTS). Training only: the fold rescales
            # the conv's weights on every call, which pays at training batch sizes; inference keeps
            # the plain path
            hidden, pending = self.expand.forward_for_conv(hidden, table, pending, fold=self.training)
        gated, mean_term = self.se.forward_split(*self.spatial.forward_split(hidden, table, pending))
        projected = self.project.conv(gated)
        if mean_term is not None:  # a 1×1 conv of a per-sample constant is one: subtract it after the conv
            weight = self.project.conv.weight.flatten(1)  # as a matmul: N × C, not a conv launch
            projected = subtract_per_sample(
                projected, F.linear(mean_term.flatten(1), weight).view(*mean_term.shape[:1], -1, 1, 1))
        out = self.project.norm_act(projected, table)
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
        self._proxy_table_cache: dict = {}  # Proxy Norm moments reused in inference (see `proxy_table`)
        self._init_weights()
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every MBConv block's activations in backward instead of keeping them (timm's
        name for it). Refused with BatchNorm, whose running statistics would be updated twice."""
        if enable and self.config.norm.kind == "batch":
            raise ValueError("grad_checkpointing with BatchNorm would update its running statistics twice "
                             "per step (forward and recompute): use norm='group' or 'layer'")
        for module in self.modules():
            if isinstance(module, MBConv):
                module.grad_checkpointing = enable

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

    def units(self) -> list[tuple[str, nn.Module]]:
        """The model as the sequence it runs: `stem`, each block (`blocks.I.J`), `head` and
        `classifier` (the average pool before it has no parameters). A pipeline stage is a run of
        consecutive units, computed by `forward_units`."""
        units: list[tuple[str, nn.Module]] = [("stem", self.stem)]
        for i, stage in enumerate(self.blocks):
            units += [(f"blocks.{i}.{j}", block) for j, block in enumerate(stage)]
        return units + [("head", self.head), ("classifier", self.classifier)]

    def proxy_table(self, modules: list[nn.Module] | None = None, cache: dict | None = None) -> ProxyTable | None:
        """The Proxy Norm moments of all layers in `modules` (default: the whole model), computed
        together (see `proxy_table`). None without Proxy Norm, and under torch.compile, where each
        layer computes its own: with the table, Inductor (PyTorch 2.14.1) got some layers'
        gradients wrong (docs/benchmarks.md C.7; `test_compiled_model_matches_eager` checks it)."""
        if torch.compiler.is_compiling():
            return None
        layers = [layer for module in (modules if modules is not None else [self]) for layer in module.modules()
                  if isinstance(layer, ProxyNormAct)]
        return proxy_table(layers, cache) if layers else None

    def forward_units(self, x: torch.Tensor, start: int = 0, stop: int | None = None,
                      cache: dict | None = None) -> torch.Tensor:
        """Units `start` to `stop` (exclusive) of `units()`, computed as the whole model computes
        them: their Proxy Norm moments batched in one table; in training, the stem's Proxy Norm
        folded into the first block's conv (large outputs, not on an eager GPU, as in
        `forward_for_conv`) when that block follows in the run; and, when the classifier follows
        the head, the head's Proxy Norm applied after the average pool (it is per channel, so it
        commutes with the pool: N × C values instead of the N × C × H × W feature map). A run that
        ends after the stem or the head ends with the unit's whole output. `cache`: see
        `proxy_table`, for runs whose parameters it alone changes."""
        units = self.units()[start:stop]
        table = self.proxy_table([unit for _, unit in units], cache)
        pending = head_affine = None  # a Proxy Norm owed by x: the stem's, the head's
        for index, (_, unit) in enumerate(units):
            followed = index + 1 < len(units)
            if unit is self.stem:
                x, pending = self.stem.forward_for_conv(x, table, None, fold=self.training and followed)
            elif unit is self.head and followed:
                x, mean, inv_std = self.head.forward_split(x, table)
                head_affine = None if mean is None else self.head.norm_act.owed_affine(mean, inv_std)
            elif unit is self.head:
                x = self.head(x, table)
            elif unit is self.classifier:
                x = torch.flatten(self.pool(x), 1)
                x = self.classifier(x if head_affine is None else apply_affine(x, *head_affine))
            else:
                x, pending = unit(x, table, pending), None
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's output, before pooling."""
        return self.forward_units(x, stop=-1, cache=self._proxy_table_cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_units(x, cache=self._proxy_table_cache)
