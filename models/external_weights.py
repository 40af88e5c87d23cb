"""torchvision's and timm's EfficientNet B0–B7 weights in this family's G1-BN models.

A G1-BN model here holds the same tensors as torchvision's `efficientnet_b0` … `b7` and timm's
`efficientnet_b0` … `b7`, under other names. Each name is translated (stage and block indices are
the same; the layers within a block are named by what they do), each tensor's shape checked, and
the models then compute the same function (tests check outputs and gradients against both
libraries' models). Names, not positions: a safetensors file, as timm publishes, keeps its tensors
in alphabetical order.

That lets a G1-BN run start from ImageNet weights a user has on disk: files are read by
`training.initial_weights` (`run_train.py --initial-weights`), with the checkpoints' safe loader.
The G16 and Proxy Norm variants have other tensors: no such weights exist for them.

timm's `tf_efficientnet_b*` weights have the same tensors but belong to another function
(TensorFlow's asymmetric "same" padding, BatchNorm eps 1e-3): nothing in a state dict tells them
apart, so they would load and compute something else. Use timm's `efficientnet_b*` ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# each library's name for its stem conv (which tells the layouts apart) and for its classifier weight
LAYOUTS: dict[str, tuple[str, str]] = {
    "torchvision": ("features.0.0.weight", "classifier.1.weight"),
    "timm": ("conv_stem.weight", "classifier.weight"),
}

_NORM = "norm_act.norm"
_TIMM_OUTSIDE_BLOCKS = {"conv_stem": "stem.conv", "bn1": f"stem.{_NORM}", "conv_head": "head.conv",
                        "bn2": f"head.{_NORM}", "classifier": "classifier.1"}
_TIMM_IN_BLOCK = {  # the first stage's blocks have no expansion ("ds" in timm), the others do ("ir")
    False: {"conv_dw": "spatial.conv", "bn1": f"spatial.{_NORM}", "conv_pw": "project.conv", "bn2": f"project.{_NORM}"},
    True: {"conv_pw": "expand.conv", "bn1": f"expand.{_NORM}", "conv_dw": "spatial.conv", "bn2": f"spatial.{_NORM}",
           "conv_pwl": "project.conv", "bn3": f"project.{_NORM}"},
}
_SE = {"conv_reduce": "reduce", "conv_expand": "expand", "fc1": "reduce", "fc2": "expand"}


class ExternalWeightsError(ValueError):
    """The state dict is not torchvision's or timm's weights for this model."""


def external_layout(theirs: Mapping[str, object]) -> str | None:
    """"torchvision" or "timm" where the state dict has that library's EfficientNet names, else None."""
    for library, (stem, _) in LAYOUTS.items():
        if stem in theirs:
            return library
    return None


def _timm_to_our_name(name: str, expanding: set[str]) -> str | None:
    *module, param = name.split(".")
    if len(module) == 1 and module[0] in _TIMM_OUTSIDE_BLOCKS:
        return f"{_TIMM_OUTSIDE_BLOCKS[module[0]]}.{param}"
    if len(module) < 4 or module[0] != "blocks":
        return None
    block, layer = ".".join(module[:3]), ".".join(module[3:])
    if layer.startswith("se.") and layer[3:] in _SE:
        return f"{block}.se.{_SE[layer[3:]]}.{param}"
    in_block = _TIMM_IN_BLOCK[block in expanding]
    return f"{block}.{in_block[layer]}.{param}" if layer in in_block else None


def _torchvision_to_our_name(name: str, expanding: set[str]) -> str | None:
    parts = name.split(".")
    if parts[0] == "classifier" and len(parts) == 3 and parts[1] == "1":
        return name
    if parts[0] != "features" or not all(part.isdigit() for part in parts[1:3]):
        return None
    if len(parts) == 4:  # features.0: the stem; the last entry of features: the head
        layer = {"0": "conv", "1": _NORM}.get(parts[2])
        return layer and f"{'stem' if parts[1] == '0' else 'head'}.{layer}.{parts[3]}"
    if len(parts) < 7 or parts[3] != "block" or not parts[4].isdigit():
        return None
    block = f"blocks.{int(parts[1]) - 1}.{parts[2]}"
    roles = ["expand", "spatial", "se", "project"][0 if ".".join(parts[:3]) in expanding else 1:]
    role = roles[int(parts[4])] if int(parts[4]) < len(roles) else None
    if role == "se" and len(parts) == 7 and parts[5] in _SE:
        return f"{block}.se.{_SE[parts[5]]}.{parts[6]}"
    layer = {"0": "conv", "1": _NORM}.get(parts[5])
    return f"{block}.{role}.{layer}.{parts[6]}" if role not in (None, "se") and layer and len(parts) == 7 else None


_TO_OUR_NAME = {"torchvision": _torchvision_to_our_name, "timm": _timm_to_our_name}


def _expanding_blocks(theirs: Mapping[str, object], library: str) -> set[str]:
    """The blocks (by their name prefix) that have an expansion conv: those with a fourth layer."""
    fourth = ".block.3." if library == "torchvision" else ".conv_pwl."
    return {".".join(name.split(".")[:3]) for name in theirs if fourth in name}


def external_to_ours(model: nn.Module, theirs: Mapping[str, torch.Tensor], library: str,
                     classifier: bool = True) -> dict[str, torch.Tensor]:
    """`model`'s state dict filled from `library`'s ("torchvision" or "timm") state dict `theirs`.
    `classifier=False` keeps the model's own classifier (fine-tuning to other classes)."""
    if library not in LAYOUTS:
        raise ValueError(f"library must be one of {', '.join(LAYOUTS)}, got {library!r}")
    ours = model.state_dict()
    if len(theirs) != len(ours):
        raise ExternalWeightsError(
            f"the {library} state dict holds {len(theirs)} tensors and the model {len(ours)}: only a G1-BN "
            "model (group size 1, expansion 6, BatchNorm, no Proxy Norm) of the same size takes them")
    mapped = {}
    expanding = _expanding_blocks(theirs, library)
    for their_name, tensor in theirs.items():
        name = _TO_OUR_NAME[library](their_name, expanding)
        if name not in ours or name in mapped:
            raise ExternalWeightsError(f"{library}'s {their_name} has no place in the model (is it {library}'s "
                                       "EfficientNet of the same size?)")
        if not isinstance(tensor, torch.Tensor):
            raise ExternalWeightsError(f"{library}'s {their_name} is a {type(tensor).__name__}, not a tensor")
        mine = ours[name]
        if name.startswith("classifier.") and not classifier:
            mapped[name] = mine
            continue
        if mine.shape != tensor.shape:
            hint = (" (other classes: pass classifier=False to keep the model's own classifier)"
                    if name.startswith("classifier.") else " (is it the same model size?)")
            raise ExternalWeightsError(
                f"{library}'s {their_name} {tuple(tensor.shape)} does not fit the model's {name} "
                f"{tuple(mine.shape)}{hint}")
        mapped[name] = tensor.to(mine.dtype)
    return {name: mapped[name] for name in ours}  # as many tensors, each placed once: every name is there
