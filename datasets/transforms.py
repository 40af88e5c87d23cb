"""Train and test preprocessing (torchvision v2), as in the paper: Inception crop + flip for
training; resize the short side to res / crop_pct and centre-crop for testing."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_resize_size(resolution: int, crop_pct: float) -> int:
    """Short side before the centre crop: res·256/224 for the default crop_pct = 0.875."""
    return int(math.floor(resolution / crop_pct))


def train_transform(resolution: int, min_area: float = 0.05, hflip: float = 0.5) -> v2.Compose:
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(resolution, scale=(min_area, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def eval_transform(resolution: int, crop_pct: float = 0.875) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(eval_resize_size(resolution, crop_pct), antialias=True),
            v2.CenterCrop(resolution),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
