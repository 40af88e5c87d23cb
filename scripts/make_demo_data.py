"""Regenerate the committed demo image set (datasets/demo_data/) from scikit-learn's copy of the
UCI ML hand-written digits (CC BY 4.0). Run once by a maintainer; training never needs sklearn.

    python3 -m venv /tmp/skl && /tmp/skl/bin/pip install scikit-learn pillow
    /tmp/skl/bin/python scripts/make_demo_data.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

try:
    from sklearn.datasets import load_digits
except ImportError:
    raise SystemExit("error: this maintainer script needs scikit-learn (see its docstring); training does not") from None

OUT = Path(__file__).resolve().parent.parent / "datasets" / "demo_data"
SIZE = 32  # 8x8 originals upscaled x4 (Lanczos) so crops and resizes behave as on photos
VAL_EVERY = 5  # every 5th image of each class goes to validation (20 %)


def main() -> None:
    digits = load_digits()
    staging = OUT.with_name(OUT.name + ".new")  # written beside, then swapped in: a failure keeps the old set
    shutil.rmtree(staging, ignore_errors=True)
    seen: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        position = seen.get(label, 0)
        seen[label] = position + 1
        split = "validation" if position % VAL_EVERY == VAL_EVERY - 1 else "train"
        folder = staging / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((SIZE, SIZE), Image.LANCZOS).save(folder / f"{index:04d}.png", optimize=True)
    (staging / "LICENSE.txt").write_text(
        "UCI ML hand-written digits (Alpaydin & Kaynak, 1998), as shipped in scikit-learn's\n"
        "sklearn/datasets/data/digits.csv.gz. Licence: CC BY 4.0\n"
        "(https://archive.ics.uci.edu/dataset/80). 1797 8x8 grayscale images of 10 classes,\n"
        f"upscaled to {SIZE}x{SIZE} with Lanczos; every {VAL_EVERY}th image of a class is in validation/.\n"
    )
    if OUT.exists():
        shutil.rmtree(OUT)
    staging.rename(OUT)


if __name__ == "__main__":
    main()
