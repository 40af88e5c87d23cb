"""The EfficientNet family as data: one B0 stage table, per-size scaling, and the model config.

Everything that decides a network's shape lives here, so that `efficientnet.py` only builds what
this file describes (the torchvision pattern: a small typed table drives the model).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

NormKind = Literal["batch", "group", "layer"]
NORM_KINDS: tuple[str, ...] = ("batch", "group", "layer")


@dataclass(frozen=True)
class StageSpec:
    """One stage of the B0 network (before width/depth scaling)."""

    expand_ratio: int  # 1 for the first stage (MBConv1); the model's expand_ratio elsewhere
    kernel: int
    stride: int
    out_channels: int
    repeats: int


# B0 (Tan & Le 2019, table 1). expand_ratio here is the *default* 6; the model config's
# `expand_ratio` replaces every value that is not 1 (the G16 variant uses 4).
B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 16, 1),
    StageSpec(6, 3, 2, 24, 2),
    StageSpec(6, 5, 2, 40, 2),
    StageSpec(6, 3, 2, 80, 3),
    StageSpec(6, 5, 1, 112, 3),
    StageSpec(6, 5, 2, 192, 4),
    StageSpec(6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class FamilyMember:
    """Compound-scaling coefficients and the resolutions/dropout that go with one size."""

    width: float
    depth: float
    resolution: int
    half_resolution: int
    dropout: float


# Half resolutions B0-B5 are the paper's. B6 and B7 are not in the paper: for them we take the
# resolution with the same (res mod 32) whose pixel count is nearest half the native one.
FAMILY: dict[str, FamilyMember] = {
    "efficientnet-b0": FamilyMember(1.0, 1.0, 224, 160, 0.2),
    "efficientnet-b1": FamilyMember(1.0, 1.1, 240, 176, 0.2),
    "efficientnet-b2": FamilyMember(1.1, 1.2, 260, 196, 0.3),
    "efficientnet-b3": FamilyMember(1.2, 1.4, 300, 204, 0.3),
    "efficientnet-b4": FamilyMember(1.4, 1.8, 380, 252, 0.4),
    "efficientnet-b5": FamilyMember(1.6, 2.2, 456, 328, 0.4),
    "efficientnet-b6": FamilyMember(1.8, 2.6, 528, 368, 0.5),
    "efficientnet-b7": FamilyMember(2.0, 3.1, 600, 408, 0.5),
}


def round_channels(channels: float, divisor: int = 8) -> int:
    """Width rounding of Tan & Le: nearest multiple of 8, never more than 10 % below."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(repeats * depth))


def spatial_conv_groups(channels: int, group_size: int) -> int:
    """Groups of a spatial conv with about `group_size` channels per group.

    The largest divisor of `channels` not above channels // group_size (at least 1), so that
    every size B0-B7 works even where channels is not a multiple of group_size.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    target = max(channels // group_size, 1)
    for groups in range(target, 0, -1):
        if channels % groups == 0:
            return groups
    return 1


@dataclass(frozen=True)
class NormConfig:
    """Which normalisation every norm layer of the network uses."""

    kind: NormKind = "batch"
    groups: int = 4  # for kind == "group"; "layer" is GroupNorm with 1 group
    eps: float | None = None  # None: 1e-3 for group/layer, BatchNorm's own default otherwise
    proxy_norm: bool = False
    proxy_eps: float = 0.03
    proxy_quantiles: int = 200

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise ValueError(f"norm must be one of {', '.join(NORM_KINDS)}, got {self.kind!r}")
        if self.proxy_norm and self.kind == "batch":
            raise ValueError("proxy_norm needs a batch-independent norm: use norm='group' or 'layer'")
        if self.groups < 1:
            raise ValueError(f"norm_groups must be >= 1, got {self.groups}")
        for name, value in (("norm_eps", self.eps), ("proxy_eps", self.proxy_eps)):
            if value is not None and not value > 0:  # (the square root of a variance of 0 would divide by 0)
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.proxy_quantiles < 1:
            raise ValueError(f"proxy_quantiles must be >= 1, got {self.proxy_quantiles}")

    @property
    def resolved_eps(self) -> float:
        if self.eps is not None:
            return self.eps
        return 1e-5 if self.kind == "batch" else 1e-3

    @property
    def num_groups(self) -> int:
        return 1 if self.kind == "layer" else self.groups


# timm's names for create_model's options, which a timm user will try first
TIMM_OPTIONS = {
    "drop_rate": "this is dropout",
    "drop_path_rate": "this is stochastic_depth",
    "in_chans": "this is in_channels",
    "pretrained": "nothing is downloaded here: load a run's weights with training.trained.load_trained_model, "
                  "or start a G1-BN run from torchvision's or timm's file with run_train.py --initial-weights",
}


@dataclass(frozen=True)
class EfficientNetConfig:
    """Everything needed to build one network. `from_name` fills it from the family table."""

    name: str = "efficientnet-b0"
    width: float = 1.0
    depth: float = 1.0
    group_size: int = 1  # channels per group of every spatial conv; 1 = depthwise (G1)
    expand_ratio: int = 6
    se_ratio: float = 0.25
    stochastic_depth: float = 0.2
    dropout: float = 0.2
    num_classes: int = 1000
    norm: NormConfig = NormConfig()
    in_channels: int = 3
    # recompute each MBConv block's activations in backward instead of keeping them: less memory,
    # one more forward pass of the blocks (the original application's recomputation checkpoints)
    grad_checkpointing: bool = False  # refused with BatchNorm (see EfficientNet.set_grad_checkpointing)

    def __post_init__(self) -> None:
        """Refuse sizes that would build a broken network (zero-width layers, a division by zero at
        initialisation, drop rates that are not probabilities) with the option's name. (group_size:
        `spatial_conv_groups` refuses it.)"""
        checks = [("width", self.width > 0, "> 0"), ("depth", self.depth > 0, "> 0"),
                  ("expand_ratio", self.expand_ratio >= 1, ">= 1"),
                  ("se_ratio", 0 < self.se_ratio <= 1, "in (0, 1]"), ("num_classes", self.num_classes >= 1, ">= 1"),
                  ("in_channels", self.in_channels >= 1, ">= 1"),
                  ("stochastic_depth", 0 <= self.stochastic_depth < 1, "in [0, 1)"),
                  ("dropout", 0 <= self.dropout < 1, "in [0, 1)")]
        for name, ok, wanted in checks:
            if not ok:
                raise ValueError(f"{name} must be {wanted}, got {getattr(self, name)}")

    @classmethod
    def from_name(cls, name: str, **overrides: object) -> EfficientNetConfig:
        if name not in FAMILY:
            spelled = name.lower().replace("_", "-")  # torchvision's and timm's efficientnet_b0
            hint = f" (did you mean {spelled!r}?)" if spelled in FAMILY else ""
            raise ValueError(f"unknown model {name!r}{hint}; known: {', '.join(FAMILY)}")
        member = FAMILY[name]
        norm_fields = {f.name for f in dataclasses.fields(NormConfig)}
        norm_overrides: dict[str, object] = {}
        model_overrides: dict[str, object] = {}
        for key, value in overrides.items():
            # norm options may be given flat: norm="layer", norm_groups=4, norm_eps=1e-3, proxy_norm=True
            if key == "norm" and isinstance(value, str):
                norm_overrides["kind"] = value
            elif key.startswith("norm_") and key[5:] in norm_fields:
                norm_overrides[key[5:]] = value
            elif key in norm_fields and key != "kind":
                norm_overrides[key] = value
            else:
                model_overrides[key] = value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(model_overrides) - known)
        if unknown:
            hints = [f"{key}: {TIMM_OPTIONS[key]}" for key in unknown if key in TIMM_OPTIONS]
            raise ValueError(f"unknown model option(s): {', '.join(unknown)}"
                             + (f" ({'; '.join(hints)})" if hints else "")
                             + f"; known: {', '.join(sorted(known - {'name'}))}, and the norm's own "
                             f"({', '.join(sorted(norm_fields - {'kind'}))}, each also as norm_<name>)")
        norm = model_overrides.pop("norm", None) or NormConfig(**norm_overrides)  # type: ignore[arg-type]
        base = dict(name=name, width=member.width, depth=member.depth, dropout=member.dropout)
        base.update(model_overrides)
        return cls(norm=norm, **base)  # type: ignore[arg-type]

    def stages(self) -> list[tuple[StageSpec, int]]:
        """Scaled stages as (spec with this config's expand ratio and repeats, in_channels)."""
        scaled = []
        in_channels = self.stem_channels
        for spec in B0_STAGES:
            out = round_channels(spec.out_channels * self.width)
            expand = 1 if spec.expand_ratio == 1 else self.expand_ratio
            repeats = round_repeats(spec.repeats, self.depth)
            scaled.append((StageSpec(expand, spec.kernel, spec.stride, out, repeats), in_channels))
            in_channels = out
        return scaled

    @property
    def stem_channels(self) -> int:
        return round_channels(STEM_CHANNELS * self.width)

    @property
    def head_channels(self) -> int:
        return round_channels(HEAD_CHANNELS * self.width)
