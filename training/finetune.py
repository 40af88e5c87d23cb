"""Fine-tuning at the test resolution (FixRes): train only the layers from a named module on.

Everything before `first_trainable` is frozen and kept in eval mode (norm statistics, stochastic
depth and dropout there are fixed), as in the authors' PyTorch port.
"""

from __future__ import annotations

from torch import nn

from .config import ConfigError, close_matches


def check_layer_name(model: nn.Module, name: str, option: str = "--fine-tune-first-trainable-layer") -> None:
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        raise ConfigError(f"{option}: the model has no layer {name!r}{close_matches(name, names)}")


def freeze_before(model: nn.Module, first_trainable: str) -> list[nn.Module]:
    """Freeze every module registered before `first_trainable`; return those modules.

    They are the children of `first_trainable`'s ancestors that come before it: for `blocks.3.0`
    that is `stem`, `blocks.0` ... `blocks.2`; for `head` it is `stem` and `blocks`.
    """
    check_layer_name(model, first_trainable)
    parts = first_trainable.split(".")
    ancestors = {".".join(parts[:k]) for k in range(len(parts))}
    frozen = []
    for name, module in model.named_modules():
        if name == first_trainable:
            break
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if name not in ancestors and parent in ancestors:
            frozen.append(module)
    frozen_params = {id(p) for module in frozen for p in module.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) not in frozen_params)
    return frozen


def train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """model.train(), with the frozen part left in eval mode."""
    model.train()
    for module in frozen:
        module.eval()
