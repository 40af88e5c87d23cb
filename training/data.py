"""Opening a run's datasets from its config, and switching their preprocessing between phases."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from datasets import GeneratedDataset, load_image, open_split

from .config import TrainConfig


def open_dataset(cfg: TrainConfig, split: str, resolution: int,
                 num_classes: int | None = None) -> torch.utils.data.Dataset:
    """The split named by the config's data options, preprocessing unset (see set_preprocessing).
    Generated data has `generated_size` training samples and a quarter as many for validation."""
    size = cfg.generated_size if split == "train" else max(cfg.generated_size // 4, 1)
    return open_split(cfg.data, split, None, cfg.data_path, cfg.strict_images, resolution,
                      num_classes or cfg.num_classes or 1000, size)


def set_preprocessing(dataset: torch.utils.data.Dataset, resolution: int, transform: Callable,
                      decode: Callable[[str], Image.Image] = load_image) -> None:
    """Images: this decoder and transform. Generated data: tensors at this resolution."""
    if isinstance(dataset, GeneratedDataset):
        dataset.resolution = resolution
    else:
        dataset.transform = transform
        dataset.decode = decode
