"""What a run leaves behind, loaded back: a checkpoint (.pt), exported weights (.safetensors) or
a run folder (its model.safetensors, or its newest checkpoint) as (config, weights), or as a ready model.

    from training.trained import eval_preprocessing, load_trained_model, load_weights
    model, cfg = load_trained_model("runs/demo-20261125-223620/model.safetensors")
    logits = model(eval_preprocessing(cfg)(image).unsqueeze(0))  # image: a PIL image
    cfg, state, classes = load_weights("runs/demo-20261125-223620/model.safetensors")  # classes[i]: output i's

Checkpoints load with `weights_only=True` and safetensors hold no code, so neither runs anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from datasets import eval_transform
from models import EfficientNet, create_model

from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, no_weights_in
from .config import ConfigError, TrainConfig, from_dict, model_overrides, native_resolution

# --weights choice → the checkpoint entry holding those weights
WEIGHTS = {"raw": "model", "ema": "ema", "averaged": "epoch_average"}


class MissingWeights(ConfigError):
    """The file is good but holds no weights of the kind asked for (e.g. a fine-tune phase's
    checkpoint keeps no averages). `have`: the kinds it holds."""

    def __init__(self, message: str, have: list[str]) -> None:
        super().__init__(message)
        self.have = have


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and tensors (the format holds no code)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), "pt") as handle:  # one read of the file for the metadata and the tensors
            return handle.metadata() or {}, {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"weights file {path} is truncated or corrupt: {error}") from None


def load_weights(path: str | Path,
                 weights: str = "raw") -> tuple[TrainConfig, dict[str, torch.Tensor], list[str] | None]:
    """The run's config, one set of its weights (`raw`, `ema` or `averaged`) as a state dict, and
    the names of the class folders it was trained on, by output index (None for generated data, and
    for files written before the names were saved). `path`: a file, or a run folder (`run_weights_file`)."""
    path = Path(path).expanduser()
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if path.is_dir():
        path = run_weights_file(path, weights)
    if path.suffix == ".safetensors":
        metadata, state = read_safetensors(path)
        if "config" not in metadata:
            raise CheckpointError(f"{path} carries no config in its metadata; export it with run_train.py")
        if weights != "raw":
            raise MissingWeights(f"--weights {weights}: {path} holds only the final weights; use --weights raw",
                                 ["raw"])
        try:
            classes = json.loads(metadata["classes"]) if "classes" in metadata else None
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: its class names are not a list of names") from None
        return from_dict(json.loads(metadata["config"]), f"config in {path}"), state, checked_classes(classes, path)
    state = load_checkpoint(path)
    cfg = from_dict(state["config"], f"config saved in {path}")
    chosen = state.get(WEIGHTS[weights])
    if chosen is None:
        have = [name for name, key in WEIGHTS.items() if state.get(key) is not None]
        raise MissingWeights(f"--weights {weights}: {path} has no such weights (it has: {', '.join(have)})", have)
    if weights != "raw":  # AveragedModel state: module.* plus its n_averaged counter
        chosen = {k.removeprefix("module."): v for k, v in chosen.items() if k != "n_averaged"}
    return cfg, chosen, checked_classes(state.get("classes"), path)


def run_weights_file(run_dir: Path, weights: str) -> Path:
    """The file of a run folder holding its `weights`: the exported final weights (model.safetensors)
    for `raw`, else (or before the run has finished) its newest checkpoint."""
    exported = run_dir / "model.safetensors"
    if weights == "raw" and exported.is_file():
        return exported
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise no_weights_in(run_dir, exported=weights == "raw")
    return checkpoints[-1]


def checked_classes(classes, path: Path) -> list[str] | None:
    if classes is not None and not (isinstance(classes, list) and all(isinstance(name, str) for name in classes)):
        raise CheckpointError(f"{path}: its class names are not a list of names")
    return classes


def model_from_weights(cfg: TrainConfig, state: dict[str, torch.Tensor], source: str | Path) -> EfficientNet:
    """The config's model (its classifier sized by the weights) holding `state`, in eval mode."""
    if "classifier.1.weight" not in state:
        raise CheckpointError(f"{source}: no classifier weights (classifier.1.weight): not weights of this model")
    model = create_model(cfg.model, **model_overrides(cfg, state["classifier.1.weight"].shape[0]))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: weights do not fit the model in its config: "
                              f"{str(error).splitlines()[0]}") from None
    return model.eval()


def load_trained_model(path: str | Path, weights: str = "raw") -> tuple[EfficientNet, TrainConfig]:
    """(model in eval mode on the CPU, its training config) from a checkpoint or exported weights.
    `eval_preprocessing(cfg)` prepares images as the run's validation did."""
    cfg, state, _ = load_weights(path, weights)
    return model_from_weights(cfg, state, path), cfg


def eval_preprocessing(cfg: TrainConfig):
    """The run's test-time transform of a PIL image: resize, centre crop at the test resolution,
    normalise. The resolution is the model's own where the config leaves it unset, as the named
    ImageNet configs do (`cfg.resolution` is then None)."""
    return eval_transform(native_resolution(cfg), cfg.crop_pct, cfg.interpolation)
