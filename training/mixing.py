"""Mixup and CutMix on a batch, with soft labels.

MixUp is torchvision's v2 transform (coefficient ~ Beta(α, α); symmetric, so the same mixtures as
the paper's max(m, 1 − m)). CutMix uses the authors' parametrisation: a fixed share λ of each
image is kept and a box of area 1 − λ is pasted from another image; torchvision's CutMix only
samples λ from a Beta distribution, hence this small class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


class FixedCutMix:
    """Paste a random box of area (1 − keep) from the batch rolled by one; labels mix by the
    box's real (clipped) area."""

    def __init__(self, keep: float) -> None:
        if not 0 < keep < 1:
            raise ValueError(f"CutMix keep share must be in (0, 1), got {keep}")
        self.keep = keep

    def __call__(self, images: torch.Tensor, soft_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = images.shape[-2:]
        cut = math.sqrt(1.0 - self.keep)
        box_h, box_w = int(round(height * cut)), int(round(width * cut))
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, bottom = max(cy - box_h // 2, 0), min(cy + box_h - box_h // 2, height)
        left, right = max(cx - box_w // 2, 0), min(cx + box_w - box_w // 2, width)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images.roll(1, 0)[..., top:bottom, left:right]
        pasted = (bottom - top) * (right - left) / (height * width)
        return mixed, soft_labels * (1.0 - pasted) + soft_labels.roll(1, 0) * pasted


class BatchMixer:
    """Mixup then CutMix as configured; labels always come back as probabilities."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_keep: float = 1.0) -> None:
        self.num_classes = num_classes
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = FixedCutMix(cutmix_keep) if cutmix_keep < 1.0 else None

    @property
    def active(self) -> bool:
        return self.mixup is not None or self.cutmix is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is not None:
            images, soft = self.mixup(images, labels)
        else:
            soft = F.one_hot(labels, self.num_classes).to(images.dtype)
        if self.cutmix is not None:
            images, soft = self.cutmix(images, soft)
        return images, soft
