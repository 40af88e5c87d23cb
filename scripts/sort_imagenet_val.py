"""Sort ImageNet's validation images, as distributed (50,000 files in one folder), into class
folders named by WordNet ID, the layout `--data imagenet` reads (and the train/ set already has).

    python scripts/sort_imagenet_val.py /data/imagenet/val --labels LOC_val_solution.csv
    python scripts/sort_imagenet_val.py /data/imagenet/val --devkit ILSVRC2012_devkit_t12

The labels come from Kaggle's `LOC_val_solution.csv` (each row: the image's name, then its boxes,
each starting with the class's WordNet ID), or from the ILSVRC2012 devkit (extracted): its
`data/ILSVRC2012_validation_ground_truth.txt` gives each image's ILSVRC2012_ID in file order and
`data/meta.mat` maps those IDs to WordNet IDs (read with scipy, as torchvision's ImageNet does).

Every image is checked before any is moved; each then moves with one rename within the folder, so an
interrupted run leaves every image either where it was or in its class folder, and running the
same command again finishes the job (images already sorted are recognised and left alone).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.image_folder import IMAGE_EXTENSIONS  # noqa: E402

WNID = re.compile(r"n\d{8}")


class LabelError(Exception):
    """Labels that cannot be read, or that do not fit the folder."""


def kaggle_labels(path: Path) -> dict[str, str]:
    """Image name (no extension) → WordNet ID, from Kaggle's LOC_val_solution.csv."""
    labels = {}
    try:
        with open(path, newline="") as handle:
            rows = csv.reader(handle)
            header = next(rows, None)
            if header is None or [name.strip() for name in header[:2]] != ["ImageId", "PredictionString"]:
                raise LabelError(f"{path} does not start with Kaggle's header 'ImageId,PredictionString'")
            for line, row in enumerate(rows, start=2):
                if not any(field.strip() for field in row):  # a blank line (one left at the end, say)
                    continue
                wnid = row[1].split()[0] if len(row) >= 2 and row[1].split() else ""
                if not WNID.fullmatch(wnid):
                    raise LabelError(f"{path}, line {line}: no WordNet ID (nXXXXXXXX) at the start of {row[1:2]}")
                labels[row[0]] = wnid
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LabelError(f"cannot read {path}: {error}") from None
    return labels


def devkit_labels(devkit: Path) -> dict[str, str]:
    """Image name (no extension) → WordNet ID, from the extracted ILSVRC2012 devkit."""
    truth, meta = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt", devkit / "data" / "meta.mat"
    for path in (truth, meta):
        if not path.is_file():
            raise LabelError(f"{path} not found: give the extracted ILSVRC2012 devkit folder")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise LabelError("reading the devkit's meta.mat needs scipy (pip install scipy), or use --labels "
                         "with Kaggle's LOC_val_solution.csv") from None
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        wnid_of_id = {int(synset["ILSVRC2012_ID"]): str(synset["WNID"]) for synset in synsets
                      if int(synset["num_children"]) == 0}  # the 1,000 leaf classes
        ids = [int(line) for line in truth.read_text().split()]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LabelError(f"cannot read the devkit in {devkit}: {error}") from None
    unknown = sorted(set(ids) - set(wnid_of_id))
    if unknown:
        raise LabelError(f"{truth} names ILSVRC2012_IDs that {meta} has no leaf class for: {unknown[:5]}")
    return {f"ILSVRC2012_val_{index:08d}": wnid_of_id[label] for index, label in enumerate(ids, start=1)}


def plan_moves(folder: Path, labels: dict[str, str]) -> tuple[list[tuple[Path, Path]], int]:
    """(moves still to make, images already in their class folder); refuses anything that does not fit."""
    if not folder.is_dir():
        raise LabelError(f"folder not found: {folder}")
    moves, done, unlabelled = [], 0, []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        stem = Path(entry.name).stem
        if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.name.startswith("."):
            if stem not in labels:
                unlabelled.append(entry.name)
            else:
                moves.append((Path(entry.path), folder / labels[stem] / entry.name))
        elif entry.is_dir() and WNID.fullmatch(entry.name):
            for image in os.scandir(entry.path):
                stem = Path(image.name).stem
                if stem in labels and labels[stem] != entry.name:
                    raise LabelError(f"{image.path} is labelled {labels[stem]}, not {entry.name}: are these the "
                                     "labels of this folder?")
                done += stem in labels
    if unlabelled:
        raise LabelError(f"{len(unlabelled)} image(s) in {folder} have no label (first: {unlabelled[0]}): are these "
                         "the labels of ImageNet's validation set?")
    return moves, done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the folder of validation images (e.g. /data/imagenet/val)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", type=Path, help="Kaggle's LOC_val_solution.csv")
    source.add_argument("--devkit", type=Path, help="the extracted ILSVRC2012_devkit_t12 folder")
    args = parser.parse_args(argv)
    try:
        labels = kaggle_labels(args.labels) if args.labels else devkit_labels(args.devkit)
        moves, done = plan_moves(args.folder, labels)
        for wnid in sorted({target.parent.name for _, target in moves}):
            (args.folder / wnid).mkdir(exist_ok=True)
        for source_path, target in moves:
            os.replace(source_path, target)
    except (LabelError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    classes = len(set(labels.values()))
    print(f"moved {len(moves)} image(s) into class folders ({done} already sorted); {classes} classes in the labels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
