"""Opening a run's datasets from its config, and switching their preprocessing between phases."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from datasets import GeneratedDataset, load_image, open_split

from .config import TrainConfig


def open_dataset(cfg: TrainConfig, split: str, resolution: int, num_classes: int | None = None,
                 trained: bool = False, trained_classes: list[str] | None = None) -> torch.utils.data.Dataset:
    """The split named by the config's data options, preprocessing unset (see set_preprocessing).
    Generated data has `generated_size` training samples and a quarter as many for validation.
    `trained`, `trained_classes`: for a model already trained (see datasets.open_split)."""
    size = cfg.generated_size if split == "train" else max(cfg.generated_size // 4, 1)
    return open_split(cfg.data, split, None, cfg.data_path, cfg.strict_images, resolution,
                      num_classes or cfg.num_classes or 1000, size, trained, trained_classes)


def class_names(dataset: torch.utils.data.Dataset) -> list[str] | None:
    """The class folder names a model trained on `dataset` gives its outputs, in order (None for
    generated data, which has no names): saved with its weights, so that a validation folder is
    labelled by name, whatever subset of the classes it holds."""
    return None if isinstance(dataset, GeneratedDataset) else list(dataset.classes)


def set_preprocessing(dataset: torch.utils.data.Dataset, resolution: int, transform: Callable,
                      decode: Callable[[str], Image.Image] = load_image) -> None:
    """Images: this decoder and transform. Generated data: tensors at this resolution."""
    if isinstance(dataset, GeneratedDataset):
        dataset.resolution = resolution
    else:
        dataset.transform = transform
        dataset.decode = decode
