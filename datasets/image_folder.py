"""ImageNet-style class folders, loaded so that one bad file never stops a run.

Every image becomes 8-bit RGB (grayscale, CMYK, palette, alpha and 16-bit included). A file that
cannot be decoded (corrupt, truncated, zero bytes, decompression bomb) is returned as a skip that
the collate function counts and reports by path; `strict=True` makes it fatal instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DataError(Exception):
    """A problem with the data the user pointed at (missing folder, no images, bad file in strict mode)."""


@dataclass(frozen=True)
class Skipped:
    """Placeholder for a sample whose file could not be decoded."""

    path: str
    reason: str


def find_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        flat = sum(1 for entry in os.scandir(root) if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
        if flat:  # e.g. ImageNet's validation images as distributed, before they are sorted by label
            raise DataError(f"no class folders in {root}, but {flat} image file(s) directly in it: the label of an "
                            f"image is the name of its folder, so move each image into {root}/<class>/ (ImageNet's "
                            f"validation set: scripts/sort_imagenet_val.py sorts it by its labels)")
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    return classes


def list_samples(root: Path, classes: list[str]) -> tuple[list[tuple[str, int]], int]:
    """(path, label) for every image file, and how many non-image files were ignored."""
    samples, ignored = [], 0
    for label, name in enumerate(classes):
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, filename), label))
                elif not filename.startswith("."):
                    ignored += 1
    if not samples:
        raise DataError(f"no image files under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return samples, ignored


class SampleTable(Sequence):
    """(path, label) of every image, held in three numpy arrays instead of a list of Python objects.

    A forked DataLoader worker that reads a list of (str, int) tuples writes to each object it
    touches (reference counts), so the memory pages holding them are copied into every worker:
    about 250 MiB per worker for ImageNet's 1.28M training images, whether 4 or 16 workers share
    the epoch, against 3-12 MiB from these arrays, which are only read and so stay shared
    (scripts/loader_worker_memory.py, docs/benchmarks.md A.5)."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        encoded = [os.fsencode(path) for path, _ in samples]  # fsencode: any file name round-trips
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(name) for name in encoded], out=self.offsets[1:])
        self.paths = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[str, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        index %= len(self)
        path = self.paths[self.offsets[index]:self.offsets[index + 1]].tobytes()
        return os.fsdecode(path), int(self.labels[index])


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16-bit and 32-bit images are scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


UNDECODABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


@contextmanager
def open_image(path: str) -> Iterator[Image.Image]:
    """The file opened: its header read, its pixels not yet decoded. A decompression bomb raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            yield image


def draft_jpeg(image: Image.Image, reduction: float) -> int:
    """Ask an opened JPEG to decode at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling: far less
    work), the largest of these not above `reduction`. Returns the scale it will decode at (1: full)."""
    if image.format != "JPEG" or reduction < 2:
        return 1
    scale = next(s for s in (8, 4, 2) if s <= reduction)
    width, height = image.size
    drafted = image.draft("RGB", (max(width // scale, 1), max(height // scale, 1)))
    return round(width / drafted[1][2]) if drafted else 1  # its box: the full size in decoded pixels


def load_image(path: str) -> Image.Image:
    """Decode one file to RGB, in full (training crops: `RandomCropDecoder`)."""
    with open_image(path) as image:
        image.load()
        return to_rgb(image)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Class-folder dataset; `transform` sees an RGB PIL image. Keys are indices or (index, seed)."""

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], torch.Tensor],
        classes: list[str] | None = None,
        strict: bool = False,
        decode: Callable[[str], Image.Image] = load_image,
    ) -> None:
        self.root = Path(root)
        self.classes = classes if classes is not None else find_classes(self.root)
        samples, self.ignored_files = list_samples(self.root, self.classes)
        self.samples = SampleTable(samples)
        self.transform = transform
        self.strict = strict
        self.decode = decode  # path -> RGB image: `load_image`, or `RandomCropDecoder` for training crops

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | Skipped:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        with seeded(seed):  # the decoder may draw the crop, the transform the rest
            try:
                image = self.decode(path)
            except UNDECODABLE as error:
                if self.strict:
                    raise DataError(f"cannot decode image {path}: {error}") from None
                return Skipped(path, f"{type(error).__name__}: {error}")
            return self.transform(image), label


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Random transforms inside run under their own seed, leaving the caller's RNG untouched, so a
    sample's augmentation depends only on (run seed, epoch, position): exact resumes."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
