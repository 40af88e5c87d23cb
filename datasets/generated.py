"""Random images and labels, for benchmarks and tests: no disk, no decoding."""

from __future__ import annotations

import torch


class GeneratedDataset(torch.utils.data.Dataset):
    """`size` samples of shape (3, resolution, resolution); each one fixed by its index."""

    def __init__(self, size: int, resolution: int, num_classes: int, seed: int = 0) -> None:
        self.size = size
        self.resolution = resolution
        self.num_classes = num_classes
        self.seed = seed
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = key[0] if isinstance(key, tuple) else key
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randn(3, self.resolution, self.resolution, generator=generator)
        return image, int(torch.randint(self.num_classes, (1,), generator=generator))
