"""`--initial-weights`: start a run from weights on disk instead of random ones.

The files taken: a run's exported `model.safetensors` (or its run folder), a checkpoint of this
application (its raw weights), torchvision's or timm's EfficientNet weights for a G1-BN model (a
`.pth`, or timm's `model.safetensors`; mapped by `models.external_weights`), and a plain state dict
of the model (`torch.save(model.state_dict())` or a safetensors file of it). Every tensor must fit
the model except the classifier, which is kept as initialised where the number of classes differs
(fine-tuning to other classes). The file is checked before any data is read, and loaded before the
model is split into replicas or pipeline stages, so every rank starts from the same weights. A
resumed run takes its weights from its checkpoint instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.external_weights import LAYOUTS, ExternalWeightsError, external_layout, external_to_ours

from .checkpoint import CheckpointError, load_torch_file, runs_inside
from .config import ConfigError
from .trained import read_safetensors


@dataclass
class InitialWeights:
    """A weights file as read: its tensors under the names it gave them, what kind of file it was,
    and for torchvision's or timm's weights which of the two ("" otherwise)."""

    path: Path
    state: dict[str, torch.Tensor]
    kind: str
    library: str = ""


# kinds of file that carry their own config (the others need one given)
OWN_KINDS = ("a run's exported weights", "a checkpoint's raw weights")


def read_initial_weights(path: str | Path, option: str = "--initial-weights") -> InitialWeights:
    """The file's weights, loaded with weights_only=True (or from safetensors, which hold no code).
    `option`: the command-line option that named the file, for the error messages."""
    path = Path(path).expanduser()
    if path.is_dir():  # a run folder: the weights it exported (as run_validate and --resume take a folder)
        if not (path / "model.safetensors").is_file():
            hint = runs_inside(path) or " (a run that has not finished?): give the weights file, or one of its checkpoints"
            raise ConfigError(f"{option} {path} is a folder without a model.safetensors{hint}")
        path = path / "model.safetensors"
    try:
        if path.suffix == ".safetensors":
            metadata, loaded = read_safetensors(path)
            if "config" in metadata:
                return InitialWeights(path, loaded, OWN_KINDS[0])
        else:
            loaded = load_torch_file(path, "weights file")
    except CheckpointError as error:
        raise ConfigError(f"{option}: {error}") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping) and "config" in loaded:
        return InitialWeights(path, dict(loaded["model"]), OWN_KINDS[1])
    if isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        library = external_layout(loaded)
        if library:
            return InitialWeights(path, dict(loaded), f"{library}'s weights", library)
        return InitialWeights(path, dict(loaded), "a state dict")
    raise ConfigError(f"{option} {path} holds a {type(loaded).__name__}, not weights: give a run's "
                      f"model.safetensors or checkpoint, or torchvision's or timm's EfficientNet file")


def classifier_outputs(weights: InitialWeights) -> int | None:
    """The number of classes the file's classifier has (None where it has no classifier we know)."""
    classifier = weights.state.get(LAYOUTS[weights.library][1] if weights.library else "classifier.1.weight")
    return classifier.shape[0] if isinstance(classifier, torch.Tensor) and classifier.dim() == 2 else None


def fit_initial_weights(model: nn.Module, weights: InitialWeights,
                        option: str = "--initial-weights") -> tuple[dict[str, torch.Tensor], str]:
    """The file's weights as `model`'s state dict, and a line saying what was loaded. `model` may
    be on the meta device: the check made before any work."""
    state, kind, path = weights.state, weights.kind, weights.path
    own = model.state_dict()
    classes = own["classifier.1.weight"].shape[0]
    their_classes = classifier_outputs(weights)
    fresh_classifier = their_classes is not None and their_classes != classes
    if weights.library:
        try:
            state = external_to_ours(model, state, weights.library, classifier=not fresh_classifier)
        except ExternalWeightsError as error:
            raise ConfigError(f"{option} {path}: {error}") from None
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    if missing or unexpected:
        raise ConfigError(
            f"{option} {path} ({kind}) does not fit this config's model: "
            f"{len(missing)} of its tensors missing (first: {missing[:1]}), {len(unexpected)} unknown "
            f"(first: {unexpected[:1]}); weights of another model or variant?")
    fitted = {}
    for name, mine in own.items():
        if name.startswith("classifier.") and fresh_classifier:
            fitted[name] = mine
        elif state[name].shape != mine.shape:
            raise ConfigError(f"{option} {path} ({kind}): its {name} {tuple(state[name].shape)} does not fit "
                              f"the model's {tuple(mine.shape)}; weights of another model size or variant?")
        else:
            fitted[name] = state[name].to(mine.dtype)
    note = (f"; its classifier ({their_classes} classes) is left out and this run's ({classes}) "
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
