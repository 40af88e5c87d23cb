"""Private memory that forked DataLoader workers gain by reading an ImageNet-sized image list:
as `ImageFolderDataset` holds it (`SampleTable`: numpy arrays) against a list of (path, label)
tuples, the usual way (torchvision's `ImageFolder.samples`).

    python scripts/loader_worker_memory.py --samples 1281167 --workers 4

Each worker reads its share of the samples (every `workers`-th, in a random order) as a training
epoch does, then reports how much of its memory is its own (Linux: /proc/self/smaps_rollup).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.image_folder import SampleTable  # noqa: E402
from training.measure import private_memory_bytes  # noqa: E402


class ReadShare(torch.utils.data.IterableDataset):
    """Yields one figure per worker: its private memory before and after reading its share."""

    def __init__(self, samples) -> None:
        self.samples = samples

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        before = private_memory_bytes() / 2**20
        share = list(range(info.id, len(self.samples), info.num_workers))
        random.Random(info.id).shuffle(share)
        for index in share:
            path, label = self.samples[index]
        yield before, private_memory_bytes() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_281_167, help="paths in the list (ImageNet's training set)")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    draw = random.Random(0)
    listed = [(f"/data/imagenet/train/n{draw.randrange(10**8):08d}/n{draw.randrange(10**8):08d}_{i}.JPEG", i % 1000)
              for i in range(args.samples)]
    for name, samples in (("list of tuples", listed), ("SampleTable", SampleTable(listed))):
        loader = torch.utils.data.DataLoader(ReadShare(samples), num_workers=args.workers, batch_size=None)
        grown = [after - before for before, after in loader]
        print(f"{name}: each worker gained {min(grown):.0f}-{max(grown):.0f} MiB of private memory "
              f"({args.workers} workers, {args.samples:,} samples)")


if __name__ == "__main__":
    main()
