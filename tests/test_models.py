"""Model family: shapes and sizes against torchvision and REFERENCE.md, Proxy Norm against exact
integrals, batch independence, and the depth behaviour Proxy Norm exists to fix."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
import torchvision
from scipy import integrate, special, stats
from torch import nn

from models import FAMILY, VARIANTS, EfficientNet, count_parameters, create_model, is_proxy_parameter, list_models
from models.analysis import collapse_profile
from models.config import NormConfig, round_channels, spatial_conv_groups
from models.efficientnet import ConvNormAct
from models.external_weights import ExternalWeightsError, external_layout, external_to_ours
from models.flops import count_macs
from models.proxy_norm import ProxyNormAct, proxy_moments, proxy_quantiles, proxy_table

TINY = dict(width=0.25, depth=0.34, num_classes=10, dropout=0.0, stochastic_depth=0.0)


@pytest.mark.parametrize("size", range(8))
def test_g1_bn_parameter_count_equals_torchvision(size: int) -> None:
    with torch.device("meta"):
        ours = create_model(f"efficientnet-b{size}", **VARIANTS["g1-bn"])
        theirs = getattr(torchvision.models, f"efficientnet_b{size}")()
    assert count_parameters(ours) == count_parameters(theirs)
    if size == 0:
        assert count_parameters(ours) == 5_288_548


def test_g1_bn_matches_torchvision_macs() -> None:
    with torch.device("meta"):
        ours = create_model("efficientnet-b0", **VARIANTS["g1-bn"])
        theirs = torchvision.models.efficientnet_b0()
    assert count_macs(ours, 224) == count_macs(theirs, 224)
    assert count_macs(ours, 224) / 1e9 == pytest.approx(0.386, rel=0.01)


def randomise_running_statistics(state: dict[str, torch.Tensor]) -> None:
    """BatchNorm running statistics that matter (in place): means off 0, variances off 1."""
    for name, tensor in state.items():
        if name.endswith("running_mean"):
            tensor.normal_(0, 0.2)
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 2.0)


def assert_same_function(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Two models holding the same weights give the same outputs in eval mode, and in training mode
    (dropout and stochastic depth drawn from the same seed) the same outputs and gradients, within
    float64 rounding; returns the eval outputs."""
    with torch.no_grad():
        expected = theirs.eval()(x)
        torch.testing.assert_close(ours.eval()(x), expected, rtol=1e-12, atol=1e-12)
    assert expected.std() > 0.05  # (not a degenerate output)
    outputs, grads = [], []
    for model in (ours.train(), theirs.train()):
        torch.manual_seed(1)
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out)
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)
    for ours_grad, their_grad in zip(*grads, strict=True):
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-9, atol=1e-12)
    return expected


@pytest.mark.parametrize("size", [0, 2])
def test_g1_bn_with_torchvision_weights_computes_torchvision_function(size: int) -> None:
    """The strongest check of the architecture: with torchvision's weights (and running statistics
    that matter), our G1-BN model gives torchvision's outputs in eval mode, and in training mode
    (dropout and stochastic depth drawn from the same seed) its outputs and every gradient."""
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, f"efficientnet_b{size}")().double()
    state = theirs.state_dict()
    randomise_running_statistics(state)
    ours = create_model(f"efficientnet-b{size}", **VARIANTS["g1-bn"]).double()
    ours.load_state_dict(external_to_ours(ours, state, "torchvision"))
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    assert_same_function(ours, theirs, x)
    torch.testing.assert_close(ours.stem.norm_act.norm.running_mean, theirs.features[0][1].running_mean)


def test_torchvision_state_dict_maps_onto_g1_bn_and_misfits_are_named() -> None:
    """(Reading torchvision's files: `--initial-weights`, tests/test_training.py.)"""
    theirs = torchvision.models.efficientnet_b0(num_classes=10)
    state = theirs.state_dict()
    assert external_layout(state) == "torchvision"
    ours = create_model("efficientnet-b0", **VARIANTS["g1-bn"], num_classes=10)
    ours.load_state_dict(external_to_ours(ours, state, "torchvision"))
    torch.testing.assert_close(ours.classifier[1].weight, theirs.classifier[1].weight)
    thousand = create_model("efficientnet-b0", **VARIANTS["g1-bn"])
    with pytest.raises(ExternalWeightsError, match=r"classifier\.1\.weight.*\(10, 1280\).*classifier=False"):
        external_to_ours(thousand, state, "torchvision")
    kept = thousand.classifier[1].weight.clone()
    thousand.load_state_dict(external_to_ours(thousand, state, "torchvision", classifier=False))  # its own stays
    assert torch.equal(thousand.classifier[1].weight, kept)
    torch.testing.assert_close(thousand.stem.conv.weight, theirs.features[0][0].weight)
    with pytest.raises(ExternalWeightsError, match="only a G1-BN model"):
        external_to_ours(create_model("efficientnet-b0", **VARIANTS["g16-gn"]), state, "torchvision")
    with pytest.raises(ExternalWeightsError, match=r"is it the same model size"):
        external_to_ours(create_model("efficientnet-b1", **VARIANTS["g1-bn"], num_classes=10),
                         torchvision.models.efficientnet_b2(num_classes=10).state_dict(), "torchvision")
    renamed = dict(state)
    renamed["features.1.0.block.9.0.weight"] = renamed.pop("features.1.0.block.2.0.weight")
    with pytest.raises(ExternalWeightsError, match=r"torchvision's features\.1\.0\.block\.9\.0\.weight has no place"):
        external_to_ours(ours, renamed, "torchvision")
    assert external_layout(ours.state_dict()) is None


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_every_size_maps_by_name_whatever_the_files_order(library: str) -> None:
    """B0–B7 of both libraries map onto the G1-BN models by name, so a file that keeps its tensors
    in another order (safetensors: alphabetical) gives the same state dict; the translated names
    are not a positional accident."""
    import timm

    for size in range(8):
        with torch.device("meta"):
            ours = create_model(f"efficientnet-b{size}", **VARIANTS["g1-bn"])
            theirs = (getattr(torchvision.models, f"efficientnet_b{size}")() if library == "torchvision"
                      else timm.create_model(f"efficientnet_b{size}"))
        state = theirs.state_dict()
        in_order = external_to_ours(ours, state, library)
        shuffled = external_to_ours(ours, dict(sorted(state.items())), library)
        assert list(in_order) == list(ours.state_dict())
        assert all(shuffled[name] is in_order[name] for name in in_order)
        assert all(mine is their for mine, their in zip(in_order.values(), state.values()))  # same order too


@pytest.mark.parametrize("size", [0, 3])
def test_g1_bn_with_timms_weights_computes_timms_function(size: int) -> None:
    """timm's `efficientnet_b*` (its own build, not torchvision's) holds the same tensors in the same
    order: with its weights and running statistics, our G1-BN model gives its outputs in eval mode,
    and in training mode its outputs and every gradient. B3 has timm's 12,233,232 parameters."""
    import timm

    torch.manual_seed(0)
    theirs = timm.create_model(f"efficientnet_b{size}", drop_rate=FAMILY[f"efficientnet-b{size}"].dropout,
                               drop_path_rate=0.2).double()
    state = theirs.state_dict()
    assert external_layout(state) == "timm"
    randomise_running_statistics(state)
    ours = create_model(f"efficientnet-b{size}", **VARIANTS["g1-bn"]).double()
    ours.load_state_dict(external_to_ours(ours, state, "timm"))
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    assert_same_function(ours, theirs, x)
    with pytest.raises(ExternalWeightsError, match=r"timm's classifier\.weight \(1000, \d+\) does not fit"):
        external_to_ours(create_model(f"efficientnet-b{size}", **VARIANTS["g1-bn"], num_classes=10), state, "timm")


def _timm_grouped_efficientnet(size: str, norm_groups: int, group_size: int = 16) -> nn.Module:
    """timm's own EfficientNet builder, told the paper's changes: for G16, expansion 4 in every
    MBConv6 stage and 16 channels per group in every spatial conv (G1: depthwise, expansion 6);
    GroupNorm (eps 1e-3) with SiLU."""
    from timm.layers import GroupNormAct
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.efficientnet import EfficientNet as TimmEfficientNet

    member = FAMILY[size]
    stages = [["ds_r1_k3_s1_e1_c16_se0.25"]] + [
        [f"ir_r{repeats}_k{kernel}_s{stride}_e{4 if group_size > 1 else 6}_c{channels}_se0.25"]
        for repeats, kernel, stride, channels in [(2, 3, 2, 24), (2, 5, 2, 40), (3, 3, 2, 80), (3, 5, 1, 112),
                                                  (4, 5, 2, 192), (1, 3, 1, 320)]]
    rounding = functools.partial(round_channels, multiplier=member.width, divisor=8)
    return TimmEfficientNet(
        block_args=decode_arch_def(stages, member.depth, group_size=group_size), num_features=rounding(1280),
        stem_size=32, round_chs_fn=rounding, act_layer=nn.SiLU, drop_rate=member.dropout, drop_path_rate=0.2,
        norm_layer=functools.partial(GroupNormAct, num_groups=norm_groups, eps=1e-3))


@pytest.mark.parametrize("size, norm, group_size", [("efficientnet-b0", "group", 16), ("efficientnet-b0", "layer", 16),
                                                    ("efficientnet-b2", "group", 16), ("efficientnet-b0", "group", 1)])
def test_gn_and_ln_models_compute_timms_build(size: str, norm: str, group_size: int) -> None:
    """The G16 models and G1-GN (without Proxy Norm) against an independent build of the same
    network: timm's EfficientNet builder with group size 16 and expansion 4 (or depthwise and
    expansion 6), and GroupNorm of 4 groups or 1. Same tensors in the same order, and
    with timm's weights (norm affines made non-trivial) the same outputs in eval mode, and in
    training mode (dropout and stochastic depth from the same seed) the same outputs and gradients."""
    torch.manual_seed(0)
    theirs = _timm_grouped_efficientnet(size, 4 if norm == "group" else 1, group_size).double()
    ours = create_model(size, **{**VARIANTS["g16-gn" if group_size > 1 else "g1-gn"], "norm": norm}).double()
    state = theirs.state_dict()
    with torch.no_grad():
        for tensor in state.values():
            if tensor.dim() == 1:  # norm scales and shifts, conv biases
                tensor.add_(torch.randn_like(tensor), alpha=0.3)
    mine = ours.state_dict()
    assert len(mine) == len(state) and count_parameters(ours) == count_parameters(theirs)
    for (name, tensor), (their_name, their_tensor) in zip(mine.items(), state.items()):
        assert name.rsplit(".", 1)[-1] == their_name.rsplit(".", 1)[-1], (name, their_name)
        assert tensor.shape == their_tensor.shape, (name, their_name)
    ours.load_state_dict(dict(zip(mine, state.values())))
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    expected = assert_same_function(ours, theirs, x)
    if norm == "layer":  # the comparison tells the norms apart: GN's 4 groups are another function
        gn = create_model(size, **VARIANTS["g16-gn"]).double()
        gn.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert not torch.allclose(gn.eval()(x), expected, atol=1e-3)


def test_g16_b0_size_and_macs_match_reference() -> None:
    with torch.device("meta"):
        model = create_model("efficientnet-b0", **VARIANTS["g16-gn"])
    assert count_parameters(model) == 5_913_796
    assert count_macs(model, 224) / 1e9 == pytest.approx(0.635, rel=0.01)
    assert count_macs(model, 160) / 1e9 == pytest.approx(0.325, rel=0.01)


@pytest.mark.parametrize("variant", ["g1-bn", "g16-gn", "g16-lnpn"])
@pytest.mark.parametrize("resolution", [32, 65, 97, 224])
def test_forward_shape_at_many_resolutions(variant: str, resolution: int) -> None:
    model = create_model("efficientnet-b0", **{**VARIANTS[variant], **TINY}).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, resolution, resolution))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inference_without_autograd_matches_the_recorded_forward(variant: str) -> None:
    """Without an autograd graph (inference_mode, no_grad) the activations run in place: same
    outputs as the forward autograd records, in eval and train mode, and the input is untouched."""
    torch.manual_seed(0)
    model = create_model("efficientnet-b0", **{**VARIANTS[variant], **TINY}).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 3, 40, 40, dtype=torch.float64)
    kept = x.clone()
    for training in (False, True):
        model.train(training)
        recorded = model(x)
        assert recorded.requires_grad
        for context in (torch.inference_mode, torch.no_grad):
            with context():
                torch.testing.assert_close(model(x), recorded.detach())
    assert torch.equal(x, kept)


@pytest.mark.parametrize("name", list_models())
def test_every_size_builds_with_group_16(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name, **VARIANTS["g16-lnpn"])
    for block in model.modules():
        if hasattr(block, "spatial"):
            conv = block.spatial.conv
            per_group = conv.in_channels // conv.groups
            assert conv.in_channels % conv.groups == 0
            assert per_group >= 16
            assert conv.groups == spatial_conv_groups(conv.in_channels, 16)


def test_spatial_groups_rule() -> None:
    assert spatial_conv_groups(32, 1) == 32  # depthwise
    assert spatial_conv_groups(96, 16) == 6
    assert spatial_conv_groups(8, 16) == 1
    # 40 // 16 = 2 divides 40; 24 // 16 = 1; 56 // 16 = 3 does not divide 56, so 2
    assert spatial_conv_groups(40, 16) == 2
    assert spatial_conv_groups(56, 16) == 2
    for channels in range(8, 700, 8):
        groups = spatial_conv_groups(channels, 16)
        assert channels % groups == 0 and groups <= max(channels // 16, 1)
        assert not any(channels % g == 0 for g in range(groups + 1, channels // 16 + 1))


def test_width_rounding_rule() -> None:
    assert round_channels(32 * 1.1) == 32 and round_channels(1280 * 1.1) == 1408
    assert round_channels(24 * 1.4) == 32 and round_channels(16 * 0.25) == 8
    # never more than 10 % below the target
    for c in range(8, 2000):
        assert round_channels(c * 1.0) >= 0.9 * c


def test_structure_exposes_named_layers() -> None:
    model = create_model("efficientnet-b0", **VARIANTS["g16-gn"])
    names = dict(model.named_modules())
    for path in ("stem", "blocks", "blocks.3.0", "blocks.3.0.expand", "head", "classifier"):
        assert path in names
    assert len(model.blocks) == 7
    assert [len(stage) for stage in model.blocks] == [1, 2, 2, 3, 3, 4, 1]
    assert model.classifier[0].p == FAMILY["efficientnet-b0"].dropout


def test_stochastic_depth_schedule() -> None:
    model = create_model("efficientnet-b0", **VARIANTS["g16-gn"])
    blocks = [b for stage in model.blocks for b in stage]
    rates = [b.drop_path.p if b.has_residual else None for b in blocks]
    for index, rate in enumerate(rates):
        if rate is not None:
            assert rate == pytest.approx(0.2 * index / len(blocks))


def test_unknown_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        create_model("efficientnet-b9")
    with pytest.raises(ValueError, match="unknown model 'efficientnet_b2' \\(did you mean 'efficientnet-b2'\\?\\)"):
        create_model("efficientnet_b2")  # torchvision's and timm's spelling
    with pytest.raises(ValueError, match="unknown model option") as refused:
        create_model("efficientnet-b0", colour="red")
    assert "known: depth, dropout, expand_ratio," in str(refused.value) and "proxy_norm" in str(refused.value)
    # timm's names are told the name here; pretrained=True where weights come from instead
    for option, hint in [("drop_rate", "this is dropout"), ("drop_path_rate", "this is stochastic_depth"),
                         ("in_chans", "this is in_channels"), ("pretrained", "nothing is downloaded here")]:
        with pytest.raises(ValueError, match=f"unknown model option\\(s\\): {option} \\({option}: {hint}"):
            create_model("efficientnet-b0", **{option: 1})
    for option, value in [("norm_eps", 0.0), ("norm_eps", -1e-3), ("proxy_eps", 0.0)]:  # (were built)
        with pytest.raises(ValueError, match=f"^{option} must be > 0, got {value}"):
            create_model("efficientnet-b0", norm="layer", proxy_norm=True, **{option: value})
    with pytest.raises(ValueError, match="^proxy_quantiles must be >= 1"):
        create_model("efficientnet-b0", norm="layer", proxy_norm=True, proxy_quantiles=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        create_model("efficientnet-b0", norm="instance")
    with pytest.raises(ValueError, match="proxy_norm needs"):
        create_model("efficientnet-b0", norm="batch", proxy_norm=True)
    with pytest.raises(ValueError, match="does not divide"):
        create_model("efficientnet-b0", norm="group", norm_groups=7)
    # sizes that built a broken network (zero-width layers, a division by zero at initialisation,
    # drop rates that are not probabilities) are refused by name, as the CLI's checks refuse them
    for option, value, wanted in [("width", 0.0, "> 0"), ("depth", -1.0, "> 0"), ("expand_ratio", 0, ">= 1"),
                                  ("num_classes", 0, ">= 1"), ("se_ratio", 0.0, "in \\(0, 1\\]"),
                                  ("stochastic_depth", -0.1, "in \\[0, 1\\)"), ("dropout", float("nan"), "in")]:
        with pytest.raises(ValueError, match=f"^{option} must be {wanted}"):
            create_model("efficientnet-b0", **{option: value})


def test_norm_eps_defaults() -> None:
    assert NormConfig("batch").resolved_eps == 1e-5
    assert NormConfig("group").resolved_eps == 1e-3
    assert NormConfig("layer", eps=1e-4).resolved_eps == 1e-4


# ---------------------------------------------------------------------------- Proxy Norm maths


def test_quantiles_are_normal_midpoints() -> None:
    u = proxy_quantiles(200, torch.float64).numpy()
    expected = stats.norm.ppf((np.arange(200) + 0.5) / 200)
    np.testing.assert_allclose(u, expected, rtol=1e-10, atol=1e-12)
    assert np.allclose(u, -u[::-1])


def _exact_moments(gamma: float, beta: float, pgamma: float, pbeta: float) -> tuple[float, float]:
    def act(t: float) -> float:
        z = gamma * ((1 + pgamma) * t + pbeta) + beta
        return z * special.expit(z)

    pdf = stats.norm.pdf
    mean = integrate.quad(lambda t: act(t) * pdf(t), -40, 40, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
    second = integrate.quad(lambda t: act(t) ** 2 * pdf(t), -40, 40, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
    return mean, second - mean**2


@pytest.mark.parametrize("num_quantiles, tolerance", [(20_000, 1e-3), (200, 2.5e-2)])
def test_proxy_moments_match_numerical_integral(num_quantiles: int, tolerance: float) -> None:
    """The formula is exact to 1e-3 on a fine grid; the authors' 200 midpoints are off by ~1 %
    (their quantiles have variance 0.994, not 1): that is the published method's own error."""
    g = torch.Generator().manual_seed(0)
    n = 8
    gamma = 1 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    beta = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    pgamma = 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    pbeta = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    mean, var = proxy_moments(gamma, beta, pgamma, pbeta, proxy_quantiles(num_quantiles, torch.float64))
    for c in range(n):
        exact_mean, exact_var = _exact_moments(gamma[c].item(), beta[c].item(), pgamma[c].item(), pbeta[c].item())
        # the mean is compared on the scale of the std (a mean near 0 has no meaningful relative error)
        assert abs(mean[c].item() - exact_mean) / math.sqrt(exact_var) < tolerance
        assert abs(var[c].item() - exact_var) / exact_var < tolerance


def test_proxy_norm_output_and_gradients() -> None:
    torch.manual_seed(0)
    layer = ProxyNormAct(8, num_groups=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(4, 8, 5, 5)
    out = layer(x)
    y = torch.nn.functional.group_norm(x, 1, layer.weight, layer.bias, 1e-3)
    z = torch.nn.functional.silu(y)
    mean, var = layer.moments()
    expected = (z - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 0.03)
    torch.testing.assert_close(out, expected)
    out.pow(2).sum().backward()
    for name in ("weight", "bias", "proxy_gamma", "proxy_beta"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_proxy_norm_gradient_through_moments_is_correct() -> None:
    layer = ProxyNormAct(3, num_groups=1, num_quantiles=50).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))
    params = tuple(p.detach().clone().requires_grad_()
                   for p in (layer.weight, layer.bias, layer.proxy_gamma, layer.proxy_beta))
    for activation in ("silu", "relu"):  # the moments' hand-written backward, through both outputs
        assert torch.autograd.gradcheck(
            lambda g, b, pg, pb, a=activation: proxy_moments(g, b, pg, pb, layer.quantiles.double(), a), params)
        # and through one of them only
        assert torch.autograd.gradcheck(
            lambda g, b, pg, pb, a=activation: proxy_moments(g, b, pg, pb, layer.quantiles.double(), a)[0], params)


@pytest.mark.parametrize("block_elements", [150, 1 << 18])  # blocks of 3 channels (the last of 1), or one
def test_moments_in_channel_blocks_keep_nothing_of_size_c_by_n(monkeypatch, block_elements: int) -> None:
    """The moments are computed block by block over the channels and recomputed in backward: values
    and gradients equal the plain formula, and the backward keeps only per-channel tensors (the
    C × N table is not saved)."""
    import models.proxy_norm as proxy_norm_module

    monkeypatch.setattr(proxy_norm_module, "MOMENT_BLOCK_ELEMENTS", block_elements)
    channels, quantiles = 10, proxy_quantiles(50, torch.float64)
    torch.manual_seed(0)
    params = [(torch.ones(channels, dtype=torch.float64) + 0.3 * torch.randn(channels, dtype=torch.float64))
              .requires_grad_() for _ in range(4)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        mean, var = proxy_moments(*params, quantiles)
    assert max(saved) <= max(channels, quantiles.numel())  # per-channel inputs and the quantiles only
    slope = torch.addcmul(params[0], params[0], params[2])
    offset = torch.addcmul(params[1], params[0], params[3])
    activated = torch.nn.functional.silu(torch.outer(slope, quantiles) + offset.unsqueeze(1))
    torch.testing.assert_close(mean, activated.mean(1))
    torch.testing.assert_close(var, activated.var(1, unbiased=False))
    weights = torch.randn(2, channels, dtype=torch.float64)
    got = torch.autograd.grad((mean * weights[0] + var * weights[1]).sum(), params)
    expected = torch.autograd.grad((activated.mean(1) * weights[0] + activated.var(1, unbiased=False) * weights[1]).sum(),
                                   params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_proxy_parameters_are_selectable() -> None:
    model = create_model("efficientnet-b0", **VARIANTS["g16-lnpn"], **TINY)
    proxy = [n for n, _ in model.named_parameters() if is_proxy_parameter(n)]
    assert proxy and all(n.endswith(("proxy_beta", "proxy_gamma")) for n in proxy)
    # every proxy-normalised activation has both; projections (scale-only norm) have neither
    layers = [m for m in model.modules() if isinstance(m, ProxyNormAct)]
    assert len(proxy) == 2 * len(layers)
    assert all(not n.startswith("blocks.0.0.project") for n in proxy)


def test_proxy_norm_placement() -> None:
    model = create_model("efficientnet-b0", **VARIANTS["g16-lnpn"], **TINY)
    block = model.blocks[1][0]
    assert isinstance(model.stem.norm_act, ProxyNormAct) and not model.stem.norm_act.centre_only
    assert isinstance(block.expand.norm_act, ProxyNormAct) and not block.expand.norm_act.centre_only
    assert isinstance(block.spatial.norm_act, ProxyNormAct) and block.spatial.norm_act.centre_only
    assert isinstance(model.head.norm_act, ProxyNormAct) and model.head.norm_act.centre_only
    project = block.project.norm_act
    assert not hasattr(project, "bias") and project.weight.shape == (block.project.conv.out_channels,)
    # the SE gate carries the spatial layer's 1/σ̃: scaling it changes the block's output
    x = torch.randn(2, block.expand.conv.in_channels, 8, 8)
    block.eval()
    with torch.no_grad():
        before = block(x)
        block.spatial.norm_act.proxy_gamma.fill_(0.5)
        after = block(x)
    assert not torch.allclose(before, after)


# ---------------------------------------------------------------------------- batch independence


def _per_sample_outputs_and_grads(model: torch.nn.Module, x: torch.Tensor, index: int, alone: bool):
    model.zero_grad()
    inp = x[index : index + 1] if alone else x
    out = model(inp)
    row = out[0] if alone else out[index]
    weights = torch.linspace(-1, 1, row.numel(), dtype=row.dtype)
    (row * weights).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return row.detach(), grads


@pytest.mark.parametrize("variant, independent", [("g16-gn", True), ("g16-lnpn", True), ("g1-bn", False)])
def test_batch_independence(variant: str, independent: bool) -> None:
    torch.manual_seed(0)
    overrides = {**VARIANTS[variant], **TINY}
    if variant == "g16-gn":
        overrides["norm"] = "layer"  # LN too
    models = [create_model("efficientnet-b0", **overrides)]
    if variant == "g16-gn":
        models.append(create_model("efficientnet-b0", **VARIANTS["g16-gn"], **TINY))
    x = torch.randn(4, 3, 40, 40, dtype=torch.float64)
    for model in models:
        model.double().train()
        out_batch, grad_batch = _per_sample_outputs_and_grads(model, x, 2, alone=False)
        out_alone, grad_alone = _per_sample_outputs_and_grads(model, x, 2, alone=True)
        same = torch.allclose(out_batch, out_alone, atol=1e-10, rtol=1e-9) and torch.allclose(
            grad_batch, grad_alone, atol=1e-10, rtol=1e-9
        )
        assert same == independent


# ---------------------------------------------------------------------------- depth behaviour


def test_channelwise_collapse_with_depth() -> None:
    ln = collapse_profile(NormConfig("layer"), depth=30)
    lnpn = collapse_profile(NormConfig("layer", proxy_norm=True), depth=30)
    bn = collapse_profile(NormConfig("batch"), depth=30)
    # LayerNorm: the channel-wise constant share grows towards 1 with depth
    assert ln[4] > 0.5 and ln[9] > 0.75 and ln[-1] > 0.9
    assert ln[-1] > ln[9] > ln[4] > ln[0]
    # BatchNorm and LN + Proxy Norm keep it near 0 all the way down
    assert max(bn) < 0.1
    assert max(lnpn) < 0.2 and np.mean(lnpn) < 0.1


def test_summary_cli_reports_reference_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    from models import summary

    code = summary.main(["--models", "efficientnet-b0", "--variants", "g1-bn,g16-gn,g16-lnpn", "--format", "csv"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "model,variant,resolution,params,gmacs"
    rows = {tuple(line.split(",")[1:3]): line.split(",") for line in lines[1:]}
    assert rows[("g1-bn", "224")][3] == "5288548"
    assert rows[("g16-gn", "224")][3] == "5913796"
    assert float(rows[("g16-gn", "224")][4]) == pytest.approx(0.635, rel=0.01)
    assert float(rows[("g16-gn", "160")][4]) == pytest.approx(0.325, rel=0.01)
    assert set(rows) == {(v, r) for v in ("g1-bn", "g16-gn", "g16-lnpn") for r in ("224", "160")}


def test_summary_cli_rejects_bad_names(capsys: pytest.CaptureFixture[str]) -> None:
    from models import summary

    assert summary.main(["--models", "efficientnet-b9"]) == 2
    assert "unknown model 'efficientnet-b9'" in capsys.readouterr().err


@pytest.mark.parametrize("activation", ["silu", "relu"])
@pytest.mark.parametrize("centre_only", [False, True])
def test_fused_proxy_activation_matches_plain_autograd(activation: str, centre_only: bool) -> None:
    """The recomputing autograd Function gives the same values and gradients as the formula
    written with ordinary tensor ops, and passes gradcheck."""
    torch.manual_seed(0)
    layer = ProxyNormAct(6, num_groups=2, centre_only=centre_only, activation=activation).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()])

    act = torch.nn.functional.silu if activation == "silu" else torch.nn.functional.relu
    mean, var = layer.moments()
    z = act(torch.nn.functional.group_norm(x, 2, layer.weight, layer.bias, 1e-3))
    plain = z - mean.view(1, -1, 1, 1)
    if not centre_only:
        plain = plain / torch.sqrt(var.view(1, -1, 1, 1) + 0.03)
    plain_grads = torch.autograd.grad((plain * weights).sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, plain)
    for fused, reference in zip(grads, plain_grads):
        torch.testing.assert_close(fused, reference)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


def test_compiled_model_matches_eager() -> None:
    """Under torch.compile Proxy Norm takes its plain-formula path; values and gradients agree
    with the eager (hand-fused) path."""
    assert_compiled_model_matches_eager("cpu", batch_size=8)  # 2 and 4 did not show the miscompilation


@pytest.mark.parametrize("variant, grad_mode", [("g16-lnpn", "enabled"), ("g16-lnpn", "no_grad"),  # (no_grad: the
                                                ("g16-gn", "no_grad"), ("g1-bn", "no_grad")])  # moment cache)
def test_exported_program_computes_the_model_for_any_batch(variant: str, grad_mode: str) -> None:
    """`torch.export` (the way to serve a trained model: TorchScript is deprecated) captures the
    eval-mode model with a dynamic batch: it gives the eager outputs at another batch size, and
    Proxy Norm's moments are computed in the program from its parameters, not baked in at export
    (new weights loaded into the exported module give the new model's outputs)."""
    torch.manual_seed(0)
    model = create_model("efficientnet-b0", **VARIANTS[variant], **TINY).double().eval()
    perturb_norm_parameters(model)  # (off their initial values, so that the output depends on the input)
    set_running_statistics(model)
    context = torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext()
    with context:
        model(torch.randn(2, 3, 32, 32, dtype=torch.float64))  # (fills the inference moment cache, if any)
        exported = torch.export.export(model, (torch.randn(2, 3, 32, 32, dtype=torch.float64),),
                                       dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=256)}})
    program = exported.module()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        assert before.std(0).min() > 1e-3  # each sample gets its own output
        torch.testing.assert_close(program(x), before, rtol=1e-10, atol=1e-10)
        other = create_model("efficientnet-b0", **VARIANTS[variant], **TINY).double().eval()
        perturb_norm_parameters(other)
        set_running_statistics(other)
        after = other(x)
        assert not torch.allclose(after, before, atol=1e-3)
        program.load_state_dict(other.state_dict())
        torch.testing.assert_close(program(x), after, rtol=1e-10, atol=1e-10)


def set_running_statistics(model: nn.Module) -> None:
    """BatchNorm's running statistics from one batch (as if trained), so that an eval-mode model
    normalises: with their initial values (0, 1) a G1-BN model's activations grow through the
    depth until every input gives the same output."""
    batch_norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    for norm in batch_norms:
        norm.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32, dtype=next(model.parameters()).dtype))
    for norm in batch_norms:
        norm.momentum = 0.1
    model.eval()


def perturb_norm_parameters(model: nn.Module, size: float = 0.3) -> None:
    """Moves the norm layers' (and Proxy Norm's) parameters off their initial values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(size * torch.randn_like(param))


def assert_compiled_model_matches_eager(device: str, batch_size: int) -> None:
    """G16-LN+PN B0 (tiny) in float64 on `device`: compiled and eager values and gradients agree.
    The norm parameters are moved off their initial values and the loss weights each output, so
    that every Proxy Norm path carries a gradient. This caught Inductor (PyTorch 2.14.1, CPU)
    giving the spatial layers' Proxy Norm parameters gradients 10^7 times too large when all
    layers' moments came from one table under compile (docs/benchmarks.md C.7), at batch 8."""
    torch.manual_seed(0)
    # depth 0.25: one block a stage (7 blocks), still enough to show that miscompilation, with fewer kernels to build
    model = create_model("efficientnet-b0", **VARIANTS["g16-lnpn"], **{**TINY, "depth": 0.25}).double().to(device)
    perturb_norm_parameters(model)
    x = torch.randn(batch_size, 3, 32, 32, dtype=torch.float64, device=device)
    weights = torch.randn(batch_size, 10, dtype=torch.float64, device=device)
    eager_out = model(x)
    (eager_out * weights).sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # dynamic=False, as run_train compiles: after other compiles of the model in this process (other
    # tests), Dynamo would otherwise trace shape-generic graphs, another program, and twice the compile time here
    compiled_out = torch.compile(model, dynamic=False)(x)
    (compiled_out * weights).sum().backward()
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-10, atol=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_spatial_proxy_norm_folded_into_se_matches_reference_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """MBConv with LN+PN: (φ(y) − μ̃) feeds the SE, and the SE output is scaled by 1/σ̃; the block
    computes this with centring and scale folded into the gate multiply, and (in training) the
    expansion's Proxy Norm folded into the spatial conv's weights and a bias map."""
    monkeypatch.setattr("models.efficientnet.FOLD_MIN_ELEMENTS", 0)  # fold whatever the size
    torch.manual_seed(0)
    model = create_model("efficientnet-b0", **VARIANTS["g16-lnpn"], **TINY).double().eval()
    block = next(b for stage in model.blocks for b in stage
                 if b.has_residual and not isinstance(b.expand, torch.nn.Identity))
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, block.expand.conv.in_channels, 6, 6, dtype=torch.float64)
    block.train()  # the expansion's Proxy Norm is folded into the spatial conv in training mode only
    trained_path = block(x)
    block.eval()
    pn = block.spatial.norm_act
    mean, var = pn.moments()
    y = torch.nn.functional.group_norm(block.spatial.conv(block.expand(x)), 1, pn.weight, pn.bias, 1e-3)
    centred = torch.nn.functional.silu(y) - mean.view(1, -1, 1, 1)
    se = block.se
    gate = torch.sigmoid(se.expand(torch.nn.functional.silu(se.reduce(centred.mean((2, 3), keepdim=True)))))
    reference = block.project(centred * gate / torch.sqrt(var.view(1, -1, 1, 1) + 0.03)) + x
    torch.testing.assert_close(block(x), reference)
    torch.testing.assert_close(trained_path, reference)


def test_inference_reuses_proxy_moments_only_while_parameters_are_unchanged(monkeypatch) -> None:
    """Without autograd the model reuses its last moments while the Proxy Norm parameters are equal
    by value; any change (an in-place update, a `.data` write that bumps no version counter, a
    loaded state dict) recomputes them, and with autograd they are always computed (and carry
    gradients). Outputs always equal a model built fresh from the same state."""
    from models import proxy_norm

    calls = []
    original = proxy_norm.proxy_moments
    monkeypatch.setattr(proxy_norm, "proxy_moments", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = create_model("efficientnet-b0", **VARIANTS["g16-lnpn"], **TINY).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def fresh_output():
        twin = create_model("efficientnet-b0", **VARIANTS["g16-lnpn"], **TINY).double().eval()
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            return twin(x)

    layer = model.stem.norm_act
    with torch.inference_mode():
        first = model(x)
        assert len(calls) == 1
        torch.testing.assert_close(model(x), first)
        assert len(calls) == 1  # reused
    with torch.no_grad():
        torch.testing.assert_close(model(x), first)
        assert len(calls) == 1
        layer.proxy_gamma.add_(0.5)  # in place: version bumped
        changed = model(x)
        assert len(calls) == 2 and not torch.allclose(changed, first)
    layer.proxy_beta.data.copy_(torch.full_like(layer.proxy_beta, 0.7))  # no version bump
    with torch.inference_mode():
        torch.testing.assert_close(model(x), fresh_output())
        assert len(calls) == 4  # recomputed here, and in the fresh twin
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["stem.norm_act.bias"] += 0.25
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh_output())
    count = len(calls)
    recorded = model(x)  # with autograd: computed, with gradients into the Proxy Norm parameters
    assert len(calls) == count + 1
    recorded.sum().backward()
    assert layer.proxy_beta.grad is not None and layer.proxy_beta.grad.abs().sum() > 0
    torch.testing.assert_close(recorded.detach(), fresh_output())


def test_batched_proxy_table_equals_each_layers_own_moments() -> None:
    """One evaluation over all layers' channels gives each layer's (μ̃, 1/σ̃) and their gradients,
    also when layers differ in activation and ε (batched separately)."""
    torch.manual_seed(0)
    layers = [ProxyNormAct(c, num_groups=1, activation=a, proxy_eps=e).double()
              for c, a, e in [(4, "silu", 0.03), (6, "relu", 0.03), (3, "silu", 0.03), (5, "silu", 0.1)]]
    for layer in layers:
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.3 * torch.randn_like(p))
    params = [p for layer in layers for p in layer.parameters()]
    weights = [torch.randn(2, layer.weight.numel(), dtype=torch.float64) for layer in layers]

    def loss(pairs):
        return sum((w[0] * m).sum() + (w[1] * s).sum() for w, (m, s) in zip(weights, pairs))

    table = proxy_table(layers)
    batched = torch.autograd.grad(loss([table[layer] for layer in layers]), params)
    own_pairs = []
    for layer in layers:
        mean, var = layer.moments()
        own_pairs.append((mean, 1 / torch.sqrt(var + layer.proxy_eps)))
        torch.testing.assert_close(table[layer][0], own_pairs[-1][0])
        torch.testing.assert_close(table[layer][1], own_pairs[-1][1])
    own = torch.autograd.grad(loss(own_pairs), params)
    for a, b in zip(batched, own):
        torch.testing.assert_close(a, b)


def _reference_model_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet with LN + Proxy Norm written out layer by layer with the plain formula:
    every Proxy Norm computes its own moments and is applied where it sits, nothing folded."""
    silu = torch.nn.functional.silu

    def proxy_norm(layer: ProxyNormAct, h: torch.Tensor, centre_only: bool) -> torch.Tensor:
        mean, var = layer.moments()
        z = silu(torch.nn.functional.group_norm(h, layer.num_groups, layer.weight, layer.bias, layer.eps))
        z = z - mean.view(1, -1, 1, 1)
        return z if centre_only else z / torch.sqrt(var.view(1, -1, 1, 1) + layer.proxy_eps)

    h = proxy_norm(model.stem.norm_act, model.stem.conv(x), centre_only=False)
    for stage in model.blocks:
        for block in stage:
            inp = h
            if isinstance(block.expand, torch.nn.Identity):
                expanded = inp
            else:
                expanded = proxy_norm(block.expand.norm_act, block.expand.conv(inp), centre_only=False)
            spatial = block.spatial.norm_act
            centred = proxy_norm(spatial, block.spatial.conv(expanded), centre_only=True)
            se = block.se
            gate = torch.sigmoid(se.expand(silu(se.reduce(centred.mean((2, 3), keepdim=True)))))
            gated = centred * gate / torch.sqrt(spatial.moments()[1].view(1, -1, 1, 1) + spatial.proxy_eps)
            h = block.project(gated)
            if block.has_residual:
                h = h + inp
    features = proxy_norm(model.head.norm_act, model.head.conv(h), centre_only=True)
    return model.classifier(features.mean((2, 3)))


def _lnpn_model_away_from_init(name: str, training: bool) -> torch.nn.Module:
    """A tiny float64 G16-LN+PN model whose norm and Proxy Norm parameters are moved off their
    initial values (1 and 0), where some terms would vanish and hide mistakes."""
    torch.manual_seed(0)
    model = create_model(name, **VARIANTS["g16-lnpn"], **TINY).double().train(training)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm_act" in param_name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fold_min_elements", [0, None, 3_000])
def test_model_with_folded_proxy_norm_matches_layer_by_layer_formula(training: bool, fold_min_elements,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's forward (moments batched over all layers; in training, the stem's and the
    expansions' Proxy Norms folded into the next conv; the head's centring applied after pooling)
    gives the values and gradients of the plain layer-by-layer formula: with every layer folded
    (0), with the default threshold (None: at this size none is), and with some folded and some not."""
    if fold_min_elements is not None:
        monkeypatch.setattr("models.efficientnet.FOLD_MIN_ELEMENTS", fold_min_elements)
    model = _lnpn_model_away_from_init("efficientnet-b1", training)
    x = torch.randn(2, 3, 36, 36, dtype=torch.float64)
    out = model(x)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), list(model.parameters()))
    reference = _reference_model_forward(model, x)
    reference_grads = torch.autograd.grad((reference * weights).sum(), list(model.parameters()))
    torch.testing.assert_close(out, reference)
    for (name, _), got, expected in zip(model.named_parameters(), grads, reference_grads):
        torch.testing.assert_close(got, expected, msg=name)
    features = model.forward_features(x)
    torch.testing.assert_close(model.classifier(features.mean((2, 3))), reference)


@pytest.mark.parametrize("training", [True, False])
def test_runs_of_units_compose_to_the_whole_model(training: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline stage is a run of consecutive units (`forward_units`). Cut after the stem (whose
    Proxy Norm the whole model folds into the next conv), mid-blocks, after the head (whose
    centring the whole model applies after the pool) or before the classifier, the runs chained
    give the whole model's output and gradients, and each run's Proxy Norm moments reach only its
    own units' parameters (a stage owns only those)."""
    monkeypatch.setattr("models.efficientnet.FOLD_MIN_ELEMENTS", 0)  # fold whatever the size
    model = _lnpn_model_away_from_init("efficientnet-b0", training)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model(x)
    weights = torch.randn_like(out)
    params = list(model.parameters())
    grads = torch.autograd.grad((out * weights).sum(), params)
    names = [name for name, _ in model.units()]
    for cut in (1, names.index("blocks.2.0"), names.index("head"), names.index("classifier")):
        first = model.forward_units(x, stop=cut)
        features = first.detach().requires_grad_()
        chained = model.forward_units(features, start=cut)
        torch.testing.assert_close(chained, out, msg=f"cut before {names[cut]}")
        second_grads = torch.autograd.grad((chained * weights).sum(), [features, *params], allow_unused=True)
        owned_by_first = {id(p) for _, unit in model.units()[:cut] for p in unit.parameters()}
        first_grads = torch.autograd.grad(first, params, second_grads[0], allow_unused=True)
        for (name, p), whole, a, b in zip(model.named_parameters(), grads, first_grads, second_grads[1:]):
            assert (a is None) == (id(p) not in owned_by_first), name
            assert (b is None) == (id(p) in owned_by_first), name
            torch.testing.assert_close(a if b is None else b, whole, msg=f"{name}, cut before {names[cut]}")


def test_proxy_norm_is_folded_exactly_where_the_output_reaches_the_threshold(monkeypatch) -> None:
    """In training on a CPU, a layer's Proxy Norm goes into the next conv only where its output has
    at least FOLD_MIN_ELEMENTS elements (the fold's fixed cost pays off only on large tensors);
    elsewhere the layer applies it itself and hands on no affine. Off the CPU in eager mode (the meta
    device stands in for a GPU, where the fold's extra launches cost more than they save) nothing
    is folded."""
    model = create_model("efficientnet-b0", **VARIANTS["g16-lnpn"], **TINY).train()
    layers = [model.stem] + [b.expand for stage in model.blocks for b in stage if isinstance(b.expand, ConvNormAct)]
    x = torch.randn(2, 3, 64, 64)
    sizes, affines = {}, {}
    for layer in layers:
        layer.conv.register_forward_hook(lambda conv, args, out, layer=layer: sizes.__setitem__(layer, out.numel()))
    original = ConvNormAct.forward_for_conv

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        affines[self] = result[1]
        return result

    monkeypatch.setattr(ConvNormAct, "forward_for_conv", recording)

    def folded(threshold: int, device: str = "cpu") -> list[bool]:
        monkeypatch.setattr("models.efficientnet.FOLD_MIN_ELEMENTS", threshold)
        affines.clear()
        model.to(device)(x.to(device))
        return [affines[layer] is not None for layer in layers]

    assert all(folded(0)) and not any(folded(10**9))
    distinct = sorted({sizes[layer] for layer in layers})
    assert len(distinct) > 2
    threshold = distinct[len(distinct) // 2]
    assert folded(threshold) == [sizes[layer] >= threshold for layer in layers]
    assert not any(folded(0, device="meta"))


def _has_interior(size: int, kernel: int, stride: int) -> bool:
    """Whether some output row of a 'same'-padded conv sees no padding."""
    pad = kernel // 2
    rows = (size + 2 * pad - kernel) // stride + 1
    return any(row * stride - pad >= 0 and row * stride - pad + kernel <= size for row in range(rows))


@pytest.mark.parametrize("strips", [True, False])
@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 1), (3, 2), (5, 1), (5, 2)])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 8, 11])
def test_conv_with_input_affine_equals_conv_of_affine_input(kernel: int, stride: int, size: int, strips: bool,
                                                            monkeypatch) -> None:
    """conv(x·s + b), with the shift's response as a bias plus border corrections (added to the
    border strips, or to the whole output), equals the conv of the formed input, values and
    gradients, for every border geometry and both layouts."""
    from models import efficientnet
    from models.efficientnet import conv_with_input_affine

    monkeypatch.setattr(efficientnet, "BORDER_SHARE_FOR_STRIPS", 1.0 if strips else 0.0)

    torch.manual_seed(size * 31 + kernel * 7 + stride)
    conv = torch.nn.Conv2d(8, 8, kernel, stride, kernel // 2, groups=2, bias=False).double()
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 8, size, size + 1, dtype=torch.float64).contiguous(memory_format=memory_format)
        scale = torch.rand(8, dtype=torch.float64) + 0.5
        shift = torch.randn(8, dtype=torch.float64)
        inputs = [t.clone().requires_grad_() for t in (x, scale, shift)]
        folded = conv_with_input_affine(conv, *inputs)
        if kernel == 1:
            assert type(folded.grad_fn).__name__ == "ConvolutionBackward0"  # no padding: no correction
        else:
            whole_output = folded.grad_fn.strips == [(slice(None), slice(None))]
            assert whole_output != (strips and _has_interior(size, kernel, stride)
                                    and _has_interior(size + 1, kernel, stride))
        weights = torch.randn_like(folded)
        folded_grads = torch.autograd.grad((folded * weights).sum(), [*inputs, conv.weight])
        plain = [t.clone().requires_grad_() for t in (x, scale, shift)]
        direct = conv(plain[0] * plain[1].view(1, -1, 1, 1) + plain[2].view(1, -1, 1, 1))
        direct_grads = torch.autograd.grad((direct * weights).sum(), [*plain, conv.weight])
        torch.testing.assert_close(folded, direct)
        for got, expected in zip(folded_grads, direct_grads):
            torch.testing.assert_close(got, expected)


def test_a_gpu_takes_the_paths_with_fewer_operators() -> None:
    """The CPU's cache-sized moment blocks and border strips are many small ops; off the CPU (a
    GPU, where each op is a kernel launch) the moments are one block and the border correction one
    add. Both paths are checked for values above; here, which one each device takes (meta tensors
    stand in for a GPU's: the choice is by device type)."""
    from models.efficientnet import conv_with_input_affine
    from models.proxy_norm import _channel_blocks

    assert len(_channel_blocks(13248, 200, torch.device("cpu"))) > 1
    assert _channel_blocks(13248, 200, torch.device("cuda")) == [slice(0, 13248)]
    conv = torch.nn.Conv2d(8, 8, 3, 1, 1, groups=2, bias=False)
    strips = {}
    for device in ("cpu", "meta"):
        conv = conv.to(device)
        x, scale, shift = (torch.randn(*shape, device=device, requires_grad=True)
                           for shape in ((2, 8, 64, 64), (8,), (8,)))
        strips[device] = conv_with_input_affine(conv, x, scale, shift).grad_fn.strips
    assert len(strips["cpu"]) == 4 and strips["meta"] == [(slice(None), slice(None))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch_sum_matches_sum_over_the_batch(memory_format, dtype) -> None:
    """Whole tensors and border strips (strided views), both layouts, against an fp64 reference."""
    from models.efficientnet import batch_sum

    x = torch.randn(5, 6, 7, 8, dtype=torch.float64).to(dtype).contiguous(memory_format=memory_format)
    for view in (x, x[:, :, :2], x[:, :, 2:-2, -2:], x[:, :, :, :1]):
        got = batch_sum(view)
        assert got.shape == (1, *view.shape[1:]) and got.dtype == dtype
        expected = view.double().sum(0, keepdim=True)
        tolerance = dict(rtol=1e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(got.double(), expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_subtract_per_sample_matches_the_broadcast_subtraction(memory_format, dtype) -> None:
    """x − term for an N × C × 1 × 1 term (written out first for bf16 channels_last): values, the
    gradients (term: minus the sum over positions), and the layout of the result, against fp64."""
    from models.efficientnet import subtract_per_sample

    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    term = torch.randn(3, 5, 1, 1, dtype=torch.float64)
    inputs = [x.to(dtype).contiguous(memory_format=memory_format).requires_grad_(), term.to(dtype).requires_grad_()]
    out = subtract_per_sample(*inputs)
    tolerance = dict(rtol=1e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), x - term, **tolerance)
    assert out.is_contiguous(memory_format=memory_format)
    weights = torch.randn_like(x)
    grad_x, grad_term = torch.autograd.grad((out.double() * weights).sum(), inputs)
    torch.testing.assert_close(grad_x.double(), weights, **tolerance)
    torch.testing.assert_close(grad_term.double(), -weights.sum((2, 3), keepdim=True), **tolerance)


@pytest.mark.parametrize("channels", [24, 32, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_per_channel_scale_shift_in_place_matches_the_broadcast_ops(memory_format, dtype, channels) -> None:
    """Proxy Norm's in-place affine: bit for bit the plain broadcast ops, in x's memory and layout,
    with the shift written out over positions only where the CPU's broadcast add is slow (bf16
    channels_last, C not a multiple of 32), one sample's worth."""
    from models.proxy_norm import ready_to_add, scale_shift_

    torch.manual_seed(0)
    x = torch.randn(3, channels, 5, 7).to(dtype).contiguous(memory_format=memory_format)
    scale, shift = torch.rand(channels) + 0.5, torch.randn(channels)
    expected = x * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)
    target = x.clone(memory_format=torch.preserve_format)
    out = scale_shift_(target, scale, shift)
    assert out.data_ptr() == target.data_ptr() and out.is_contiguous(memory_format=memory_format)
    assert torch.equal(out, expected)
    term = shift.to(dtype).view(1, -1, 1, 1)
    written_out = dtype == torch.bfloat16 and memory_format == torch.channels_last and channels % 32 != 0
    assert ready_to_add(x, term).shape == ((1, channels, 5, 7) if written_out else (1, channels, 1, 1))
    per_sample = torch.randn(3, channels, 1, 1).to(dtype)
    assert ready_to_add(x, per_sample).shape == (x.shape if written_out else per_sample.shape)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_spatial_mean_matches_mean_and_keeps_the_layout(memory_format) -> None:
    from models.efficientnet import spatial_mean

    x = torch.randn(3, 5, 4, 6, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    torch.testing.assert_close(spatial_mean(x), x.mean((2, 3), keepdim=True))
    assert torch.autograd.gradcheck(spatial_mean, (x,))
    (grad,) = torch.autograd.grad(spatial_mean(x).sum(), x)
    assert grad.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("variant, fold_min_elements", [("g16-lnpn", 0), ("g16-lnpn", 10**9), ("g16-gn", 0)])
def test_grad_checkpointing_gives_the_same_gradients_with_less_memory(variant: str, fold_min_elements: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks recomputed in backward: the same loss and gradients (drop-path masks included, the
    RNG state is replayed), and less memory held during the step; with Proxy Norm, with every
    layer's folded into the next conv (as at training sizes) and with none."""
    from training.measure import peak_memory_bytes

    monkeypatch.setattr("models.efficientnet.FOLD_MIN_ELEMENTS", fold_min_elements)
    model = create_model("efficientnet-b0", **VARIANTS[variant], **dict(TINY, stochastic_depth=0.5)).train()
    # 96 px: large enough that the blocks' activations, not the stem's, make the peak
    x, y = torch.randn(4, 3, 96, 96), torch.randint(10, (4,))

    def step() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same drop-path masks in both runs
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, grads = step()
    kept = peak_memory_bytes(step, torch.device("cpu"))
    model.set_grad_checkpointing(True)
    loss_recomputed, grads_recomputed = step()
    recomputed = peak_memory_bytes(step, torch.device("cpu"))
    assert loss_recomputed == loss
    for name, grad in grads.items():
        torch.testing.assert_close(grads_recomputed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert recomputed < 0.8 * kept, (recomputed, kept)
    model.eval()  # inference recomputes nothing and gives what the model without checkpointing gives
    plain = EfficientNet(dataclasses.replace(model.config, grad_checkpointing=False))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain.eval()(x))


def test_grad_checkpointing_is_refused_with_batch_norm() -> None:
    with pytest.raises(ValueError, match="running statistics twice"):
        create_model("efficientnet-b0", **VARIANTS["g1-bn"], grad_checkpointing=True)
    with pytest.raises(ValueError, match="running statistics twice"):
        create_model("efficientnet-b0", **VARIANTS["g1-bn"], **TINY).set_grad_checkpointing(True)
