"""`--initial-weights`: start a run from weights on disk instead of random ones.

Three kinds of file: a run's exported `model.safetensors`, a checkpoint of this application (its
raw weights), and torchvision's EfficientNet state dict for a G1-BN model (mapped by
`models.torchvision_weights`); a plain state dict of the model (`torch.save(model.state_dict())`)
is taken too. Every tensor must fit the model except the classifier, which is kept as initialised
where the number of classes differs (fine-tuning to other classes). The file is checked before any
data is read, and loaded before the model is split into replicas or pipeline stages, so every rank
starts from the same weights. A resumed run takes its weights from its checkpoint instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.torchvision_weights import TorchvisionWeightsError, torchvision_to_ours

from .checkpoint import CheckpointError, load_torch_file
from .config import ConfigError
from .trained import load_weights


@dataclass
class InitialWeights:
    """A weights file as read: its tensors under the names it gave them, and what kind of file it was."""

    path: Path
    state: dict[str, torch.Tensor]
    kind: str


def read_initial_weights(path: str | Path) -> InitialWeights:
    """The file's weights, loaded with weights_only=True."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return InitialWeights(path, load_weights(path)[1], "a run's exported weights")
        loaded = load_torch_file(path, "weights file")
    except CheckpointError as error:
        raise ConfigError(f"--initial-weights: {error}") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping) and "config" in loaded:
        return InitialWeights(path, dict(loaded["model"]), "a checkpoint's raw weights")
    if isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        if any(str(name).startswith("features.") for name in loaded):
            return InitialWeights(path, dict(loaded), "torchvision's weights")
        return InitialWeights(path, dict(loaded), "a state dict")
    raise ConfigError(f"--initial-weights {path} holds a {type(loaded).__name__}, not weights: give a run's "
                      f"model.safetensors or checkpoint, or torchvision's EfficientNet file")


def fit_initial_weights(model: nn.Module, weights: InitialWeights) -> tuple[dict[str, torch.Tensor], str]:
    """The file's weights as `model`'s state dict, and a line saying what was loaded. `model` may
    be on the meta device: the check made before any work."""
    state, kind, path = weights.state, weights.kind, weights.path
    own = model.state_dict()
    theirs_classifier = state.get("classifier.1.weight")
    fresh_classifier = theirs_classifier is not None and theirs_classifier.shape != own["classifier.1.weight"].shape
    if kind == "torchvision's weights":
        try:
            state = torchvision_to_ours(model, state, classifier=not fresh_classifier)
        except TorchvisionWeightsError as error:
            raise ConfigError(f"--initial-weights {path}: {error}") from None
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    if missing or unexpected:
        raise ConfigError(
            f"--initial-weights {path} ({kind}) does not fit this config's model: "
            f"{len(missing)} of its tensors missing (first: {missing[:1]}), {len(unexpected)} unknown "
            f"(first: {unexpected[:1]}); weights of another model or variant?")
    fitted = {}
    for name, mine in own.items():
        if name.startswith("classifier.") and fresh_classifier:
            fitted[name] = mine
        elif state[name].shape != mine.shape:
            raise ConfigError(f"--initial-weights {path} ({kind}): its {name} {tuple(state[name].shape)} does not fit "
                              f"the model's {tuple(mine.shape)}; weights of another model size or variant?")
        else:
            fitted[name] = state[name].to(mine.dtype)
    classes = own["classifier.1.weight"].shape[0]
    note = (f"; its classifier ({theirs_classifier.shape[0]} classes) is left out and this run's ({classes}) "
            f"starts from random weights" if fresh_classifier else "")
    return fitted, f"initial weights: {path} ({kind}){note}"


def load_initial_weights(model: nn.Module, weights: InitialWeights | str | Path) -> str:
    """Load the weights (a file, or a file already read) into `model` in place; the line saying what
    was loaded."""
    if not isinstance(weights, InitialWeights):
        weights = read_initial_weights(weights)
    fitted, line = fit_initial_weights(model, weights)
    model.load_state_dict(fitted)
    return line
