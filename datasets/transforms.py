"""Train and test preprocessing (torchvision v2), as in the paper: Inception crop + flip for
training; resize the short side to res / crop_pct and centre-crop for testing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import v2

from .image_folder import draft_jpeg, open_image, to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratios of the Inception crop
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def eval_resize_size(resolution: int, crop_pct: float) -> int:
    """Short side before the centre crop: res·256/224 for the default crop_pct = 0.875."""
    return int(math.floor(resolution / crop_pct))


def train_transform(resolution: int, min_area: float = 0.05, hflip: float = 0.5, crop: bool = True) -> v2.Compose:
    """Inception crop, flip, normalise. `crop=False`: for images that `RandomCropDecoder` cropped
    while decoding them, the same with the crop's resize only."""
    steps: list[v2.Transform] = [v2.ToImage()]
    if crop:
        steps.append(v2.RandomResizedCrop(resolution, scale=(min_area, 1.0), ratio=CROP_RATIO, antialias=True))
    else:
        steps.append(v2.Resize((resolution, resolution), antialias=True))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


@dataclass(frozen=True)
class RandomCropDecoder:
    """Decodes a file's Inception crop (before `train_transform(crop=False)` resizes it), choosing
    the crop from the file's header first, so that a JPEG is decoded at 1/2, 1/4 or 1/8 scale
    (draft mode: far less work) whenever the crop still spans at least `resolution` pixels at that
    scale. With no scale applied it draws and crops as `v2.RandomResizedCrop` on the decoded image.

    Drafting the whole image to the resolution before choosing the crop would give most crops
    fewer pixels than the output has (at 160 px from a 500×375 JPEG, about four in five): a
    blurrier training set than the usual pipeline's."""

    resolution: int
    min_area: float = 0.05

    def __call__(self, path: str) -> Image.Image:
        with open_image(path) as image:
            top, left, height, width = transforms.RandomResizedCrop.get_params(image, [self.min_area, 1.0],
                                                                               list(CROP_RATIO))
            box = (left, top, left + width, top + height)
            scale = draft_jpeg(image, min(height, width) / self.resolution)
            image.load()
            if scale == 1:
                return to_rgb(image.crop(box))
            # the box falls between decoded pixels: resized here, so `v2.Resize` has nothing left to do
            return to_rgb(image).resize((self.resolution, self.resolution), Image.Resampling.BILINEAR,
                                        box=tuple(value / scale for value in box))


def eval_transform(resolution: int, crop_pct: float = 0.875, interpolation: str = "bilinear") -> v2.Compose:
    """Resize the short side to res / crop_pct, centre-crop, normalise. `interpolation`: bilinear as
    in training, or bicubic, as torchvision and timm score their ImageNet weights. A PIL image is
    resized and cropped as PIL does it, before it becomes a tensor, as torchvision's and timm's
    evaluation transforms do (a tensor's resize rounds some pixels one level apart)."""
    return v2.Compose(
        [
            v2.Resize(eval_resize_size(resolution, crop_pct), INTERPOLATIONS[interpolation], antialias=True),
            v2.CenterCrop(resolution),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
