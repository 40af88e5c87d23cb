"""torchvision's EfficientNet B0–B7 weights in this family's G1-BN models.

A G1-BN model here holds the same tensors as torchvision's `efficientnet_b0` … `b7`, in the same
order (stem, blocks, head, classifier; in each layer the conv, then its norm), under other names.
So a torchvision state dict maps onto it by position, each tensor's kind and shape checked, and
the two models then compute the same function (a test checks outputs and gradients against
torchvision's). That lets a G1-BN run start from the ImageNet weights a user has on disk: files
are read by `training.initial_weights` (`run_train.py --initial-weights`), with the checkpoints'
safe loader. The G16 and Proxy Norm variants have other tensors; they have no torchvision weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class TorchvisionWeightsError(ValueError):
    """The file or state dict is not torchvision weights for this model."""


def torchvision_to_ours(model: nn.Module, theirs: Mapping[str, torch.Tensor],
                        classifier: bool = True) -> dict[str, torch.Tensor]:
    """`model`'s state dict filled from torchvision's `theirs`. `classifier=False` keeps the
    model's own classifier (fine-tuning to other classes)."""
    ours = model.state_dict()
    theirs = list(theirs.items())
    if len(theirs) != len(ours):
        raise TorchvisionWeightsError(
            f"the torchvision state dict holds {len(theirs)} tensors and the model {len(ours)}: only a G1-BN "
            "model (group size 1, expansion 6, BatchNorm, no Proxy Norm) of the same size takes them")
    mapped = {}
    for (name, mine), (their_name, tensor) in zip(ours.items(), theirs):
        if not isinstance(tensor, torch.Tensor):
            raise TorchvisionWeightsError(f"torchvision's {their_name} is a {type(tensor).__name__}, not a tensor")
        if name.startswith("classifier.") and not classifier:
            mapped[name] = mine
            continue
        kind, their_kind = name.rsplit(".", 1)[-1], their_name.rsplit(".", 1)[-1]
        if kind != their_kind or mine.shape != tensor.shape:
            hint = (" (other classes: pass classifier=False to keep the model's own classifier)"
                    if name.startswith("classifier.") else " (is it the same model size?)")
            raise TorchvisionWeightsError(
                f"torchvision's {their_name} {tuple(tensor.shape)} does not fit the model's {name} "
                f"{tuple(mine.shape)}{hint}")
        mapped[name] = tensor.to(mine.dtype)
    return mapped
