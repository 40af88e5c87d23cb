"""Host-side data: ImageNet-style folders, generated tensors, and the built-in demo set.

`open_split(kind, split, ...)` gives a dataset for "train" or "validation";
`make_loader` wraps it in a DataLoader whose batches are (images, labels, skipped files).
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing.util
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from . import shared_memory
from .generated import GeneratedDataset
from .image_folder import DataError, ImageFolderDataset, Skipped, find_classes, load_image
from .sampler import SeededSampler
from .shared_memory import batch_bytes, check_shared_memory
from .transforms import INTERPOLATIONS, RandomCropDecoder, eval_resize_size, eval_transform, train_transform

DEMO_ROOT = Path(__file__).resolve().parent / "demo_data"
DATA_KINDS = ("imagenet", "generated", "demo")
VALIDATION_DIRS = ("validation", "val")


def split_folder(root: Path, split: str) -> Path:
    """`root/train`, or `root/validation` / `root/val` for the validation split."""
    if not root.is_dir():
        if root.exists():  # an archive or a file list given by mistake
            raise DataError(f"data path {root} is a file, not a folder: give the folder that holds "
                            f"train/ and validation/ (or val/)")
        raise DataError(f"data path not found: {root}")
    names = ("train",) if split == "train" else VALIDATION_DIRS
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root} has no {' or '.join(names)}/ folder for the {split} split")


def check_classes(root: Path) -> list[str]:
    """Class names from train/, after checking validation/ has the same class folders."""
    train = find_classes(split_folder(root, "train"))
    validation = find_classes(split_folder(root, "validation"))
    if train != validation:
        only_train = sorted(set(train) - set(validation))[:5]
        only_val = sorted(set(validation) - set(train))[:5]
        raise DataError(
            f"class folders differ between train/ and validation/ under {root}: "
            f"only in train: {only_train or 'none'}, only in validation: {only_val or 'none'}"
        )
    return train


def some_names(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, comma-separated, with " ..." where more were left out (messages)."""
    return ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


def classes_for_model(root: Path, split: str, known: list[str] | None, outputs: int) -> list[str]:
    """The class names that give a trained model's split its labels, by output index.

    `known`: the class folder names the model was trained on, saved with it. The split's folders
    must be among them (a subset is fine: each image keeps its own class's output); for the train
    split (fine-tuning), all of them. Unknown (generated data, a file written before the names were
    saved): train/'s folders where there is a train/, else the split's own, which must number the
    model's `outputs`: with fewer or more, which output each folder is cannot be told."""
    folder = split_folder(root, split)
    found = find_classes(folder)
    if known is not None:
        strange = sorted(set(found) - set(known))
        if strange:
            raise DataError(f"{len(strange)} class folder(s) under {folder} are not among the {len(known)} classes "
                            f"the model was trained on: {some_names(strange)} "
                            f"(its classes include {some_names(known)}): validate on the kind of data it was "
                            f"trained on")
        if split == "train" and found != known:
            missing = sorted(set(known) - set(found))
            raise DataError(f"fine-tuning needs every class the model was trained on; {folder} lacks "
                            f"{len(missing)}: {some_names(missing)}")
        return known
    if (root / "train").is_dir():
        classes, where, remedy = check_classes(root), split_folder(root, "train"), "give the data it was trained on"
    else:
        classes, where = found, folder
        remedy = f"give a folder with all {outputs} classes, or with the train/ folder it was trained on beside it"
    if len(classes) != outputs:  # (output i would be scored as the i-th folder, whatever class it is)
        raise DataError(f"{where} has {len(classes)} class folders and the model {outputs} outputs, and the model's "
                        f"file holds no class names to match them by: {remedy}")
    return classes


def data_root(kind: str, data_path: str | None) -> Path | None:
    """The image folder that `--data kind` reads (None for generated data); unknown kinds and a
    missing `--data-path` are refused."""
    if kind == "generated":
        return None
    if kind == "demo":
        return DEMO_ROOT
    if kind == "imagenet":
        if not data_path:
            raise DataError("--data imagenet needs --data-path DIR (with train/ and validation/ or val/)")
        return Path(data_path).expanduser()
    raise DataError(f"unknown --data {kind!r}; choose from {', '.join(DATA_KINDS)}")


def open_split(
    kind: str,
    split: str,
    transform: Callable,
    data_path: str | None = None,
    strict: bool = False,
    resolution: int = 224,
    num_classes: int = 1000,
    generated_size: int = 1024,
    trained: bool = False,
    trained_classes: list[str] | None = None,
) -> torch.utils.data.Dataset:
    """`trained`: the data is for a model already trained, of `num_classes` outputs, whose saved
    class names are `trained_classes` (None: not saved), and only the split itself must exist (see
    `classes_for_model`). Otherwise a model is to be trained on it: its classes are train/'s, and
    validation/ must hold the same."""
    if kind == "generated":
        return GeneratedDataset(generated_size, resolution, num_classes, seed=0 if split == "train" else 1)
    root = data_root(kind, data_path)
    classes = classes_for_model(root, split, trained_classes, num_classes) if trained else check_classes(root)
    dataset = ImageFolderDataset(split_folder(root, split), transform, classes, strict)
    if split == "train":  # a class without training images would be learned as never occurring
        found = set(dataset.samples.labels.tolist())
        empty = [name for label, name in enumerate(classes) if label not in found]
        if empty:
            raise DataError(f"{len(empty)} class folder(s) under {dataset.root} hold no image files: "
                            f"{some_names(empty)}")
    return dataset


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[Skipped]]:
    """Stack good samples; undecodable ones come back as a list for the caller to count."""
    good = [item for item in batch if not isinstance(item, Skipped)]
    skipped = [item for item in batch if isinstance(item, Skipped)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, labels = zip(*good)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), skipped


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def leave_stops_to_the_main_process(worker_id: int) -> None:
    """A loader worker ignores SIGINT and SIGTERM. A terminal's Ctrl-C, `timeout`, and Slurm's or
    a container's stop reach every process of the job: a worker killed by one would end the run
    with a loader error instead of the checkpoint that the main process writes at the next step.
    The main process shuts its workers down; a worker whose main process dies exits by itself.
    The worker was started with both signals blocked (`StopSafeLoader`): one that came meanwhile is
    pending, and is discarded here, as SIG_IGN discards a pending signal, before they are unblocked."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that made it exits


def exit_with_the_main_process(main_pid: int, kernel_watch: bool) -> None:
    """A loader worker ends when its main process dies, even one killed as the worker starts.

    torch's worker loop stops when `getppid()` differs from the parent it saw when the loop began.
    A main process killed (SIGKILL, the OOM killer) before that moment leaves the worker seeing
    init as its parent from the start: it polled for work for ever (seen in a test run, 34 minutes
    on). Here, before torch's loop: on Linux the kernel is asked to kill the worker when its parent
    dies (`kernel_watch`, only for workers started by the main thread, as the request follows the
    thread that forked), then a parent already gone ends it at once."""
    if kernel_watch and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != main_pid:
        os._exit(1)


def start_worker(main_pid: int, kernel_watch: bool, worker_id: int) -> None:
    """Every loader worker's worker_init_fn."""
    leave_stops_to_the_main_process(worker_id)
    exit_with_the_main_process(main_pid, kernel_watch)


def kill_workers_left_at_exit() -> None:
    """At exit, multiprocessing terminates daemonic children (SIGTERM) and then joins them. Loader
    workers ignore SIGTERM, so one still running then (its iterator never closed: left in a global,
    or in a traceback kept by an error) would keep the process from ever exiting. They are killed
    here, before that: registered after multiprocessing's own exit handler, this runs first.
    Their deaths are expected then: torch's SIGCHLD handler, which reports a worker killed by a
    signal as an error, is set back to the default first."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers and hasattr(signal, "SIGCHLD"):  # (none on Windows)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for worker in workers:
            worker.kill()


atexit.register(kill_workers_left_at_exit)  # multiprocessing.util, imported above, registered its handler first


class _StopSafeIterator(_MultiProcessingDataLoaderIter):
    """DataLoader ends a worker that has not exited when its iterator closes (one stuck in a read,
    or whose batch timed out) with SIGTERM, which loader workers ignore: such a worker is killed,
    instead of living on with its memory until the process ends."""

    def _shutdown_workers(self) -> None:
        closing = not getattr(self, "_shutdown", True)
        super()._shutdown_workers()  # also stops torch watching these workers' deaths
        if closing and self._shutdown:  # (not at interpreter exit, where it does nothing)
            for worker in self._workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)


class StopSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers are started with SIGINT and SIGTERM blocked, which they inherit,
    until `leave_stops_to_the_main_process` (in their worker_init_fn) ignores them: a stop sent to
    the whole process group while workers start (at each epoch and validation) cannot kill one
    before it ignores it. In the main process a signal that comes meanwhile waits, and is handled
    once they have started. Since workers ignore SIGTERM, one that outlives its iterator's shutdown
    is killed (`_StopSafeIterator`), and one whose main process dies ends with it
    (`exit_with_the_main_process`)."""

    def __iter__(self):
        if self.num_workers > 0:  # the process and thread that start this iterator's workers
            in_main_thread = threading.current_thread() is threading.main_thread()
            self.worker_init_fn = partial(start_worker, os.getpid(), in_main_thread)
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):  # (no signal masks on Windows)
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        return _StopSafeIterator(self)


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    sampler: SeededSampler,
    workers: int,
    drop_last: bool = False,
    device: torch.device | None = None,
) -> torch.utils.data.DataLoader:
    """`device`: where the batches go. For a CUDA device they come in page-locked memory, whose
    `non_blocking` copies to the GPU overlap with its work (from pageable memory they block the host)."""
    return StopSafeLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skipping,
        persistent_workers=False,
        drop_last=drop_last,
        pin_memory=device is not None and device.type == "cuda",
        timeout=shared_memory.BATCH_TIMEOUT_S if workers > 0 else 0,  # a batch lost by a worker ends in an error, not a hang
        # worker base seeds come from this private generator, not the global RNG, so creating an
        # iterator mid-run (a resume) does not shift the training RNG stream; augmentation seeds
        # come from the sampler anyway
        generator=torch.Generator().manual_seed(sampler.seed),
    )


__all__ = [
    "DATA_KINDS",
    "DEMO_ROOT",
    "DataError",
    "GeneratedDataset",
    "INTERPOLATIONS",
    "ImageFolderDataset",
    "RandomCropDecoder",
    "SeededSampler",
    "Skipped",
    "batch_bytes",
    "check_classes",
    "classes_for_model",
    "some_names",
    "check_shared_memory",
    "collate_skipping",
    "data_root",
    "eval_resize_size",
    "eval_transform",
    "load_image",
    "make_loader",
    "open_split",
    "train_transform",
]
