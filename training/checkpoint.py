"""Checkpoints that survive crashes: atomic writes, safe loads, newest-good-one discovery.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over the target, so a crash or a full disk leaves the previous checkpoint untouched. Loading
uses `weights_only=True`: a file that carries pickled code is refused, never run.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
_UMASK = os.umask(0o022)  # read once (it can only be read by setting it), then restored
os.umask(_UMASK)
_REFUSED_GLOBAL = re.compile(r"GLOBAL [A-Za-z_][\w]*(?:\.[A-Za-z_<>][\w<>]*)+ (?:was not|whose)")  # module.qualname
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{9})(?:-(train|fine_tune)-epoch(\d{4}))?\.pt$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used (missing, truncated, corrupt, unsafe or foreign)."""


class WriteError(Exception):
    """An output file that the file system refused (full disk, quota, read-only, permissions).

    Raised instead of the writer's own error, which can be far from the cause: torch.save reports a
    full disk as a RuntimeError about a zip position, with the OSError only in its context."""


def os_error_behind(error: BaseException) -> OSError | None:
    """The OSError that `error` is, or that caused it (its __cause__ / __context__ chain), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def write_failed(path: Path, error: OSError) -> WriteError:
    reason = error.strerror or type(error).__name__
    return WriteError(f"could not write {path}: {reason}")


def atomic_write(path: Path, write) -> None:
    """Call write(file_object) on a temp file beside `path`, fsync, then rename over `path`.

    A refusal by the file system (full disk, permissions) raises WriteError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise write_failed(path, error) from error
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs private to their writer
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        cause = os_error_behind(error) if isinstance(error, Exception) else None
        if cause is not None:  # the file it would have replaced is untouched
            raise write_failed(path, cause) from error
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_checkpoint(path: Path, state: dict) -> None:
    state = dict(state, format_version=FORMAT_VERSION)
    atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_torch_file(path: str | Path, what: str) -> object:
    """A file of torch.save's, loaded with weights_only=True (tensors and plain data only); each way
    it can fail is a CheckpointError naming the file as `what` ("checkpoint", "weights file")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # a raw pickle gets torch's protocol warning before its refusal below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for bad files
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # the weights-only unpickler names the global it refused (a function or class to be called);
        # a text file starting with "c" reads as a GLOBAL opcode too, but its "name" is no Python name
        refused = [line for line in lines if _REFUSED_GLOBAL.search(line)]
        if refused:
            raise CheckpointError(
                f"{what} {path} holds objects that could run code when unpickled; refused "
                f"(only tensors and plain data are loaded): {refused[0]}"
            ) from None
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; text, images, raw pickles are not
            raise CheckpointError(f"{what} {path} is truncated or corrupt, or not a PyTorch {what} at all: "
                                  f"torch.save writes a zip archive, and this file is not a complete one") from None
        raise CheckpointError(f"{what} {path} is truncated or corrupt: {lines[0]}") from None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.suffix == ".safetensors":  # torch.load would misread it as a pickle
        raise CheckpointError(f"{path} holds exported weights, not a training checkpoint (checkpoint-*.pt, "
                              f"which also holds the optimizer and the run's progress)")
    state = load_torch_file(path, "checkpoint")
    if not isinstance(state, dict) or "model" not in state or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a checkpoint written by this application")
    return state


def checkpoint_name(step: int, phase: str | None = None, epoch: int | None = None) -> str:
    """checkpoint-<step>.pt, or checkpoint-<step>-<phase>-epoch<N>.pt at the end of an epoch."""
    if phase is None:
        return f"checkpoint-{step:09d}.pt"
    return f"checkpoint-{step:09d}-{phase}-epoch{epoch:04d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in a run folder, oldest first (by step; an epoch-end one after a step one)."""
    found = []
    for entry in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        match = CHECKPOINT_RE.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2) is not None, entry))
    return [entry for *_, entry in sorted(found)]


def no_weights_in(folder: Path, exported: bool = True) -> CheckpointError:
    """The error for a run folder holding no checkpoint (nor, where `exported`, model.safetensors)."""
    return CheckpointError(f"no checkpoints (checkpoint-*.pt){' or model.safetensors' if exported else ''} "
                           f"in run folder {folder}{runs_inside(folder)}")


def runs_inside(folder: Path) -> str:
    """For an error about a folder without checkpoints: where it holds run folders (it is the
    --output-dir, say), a hint naming them, else ""."""
    try:
        runs = sorted(entry.name for entry in Path(folder).iterdir() if entry.is_dir()
                      and (list_checkpoints(entry) or (entry / "model.safetensors").is_file()))
    except OSError:
        return ""
    if not runs:
        return ""
    shown = ", ".join(runs[-3:]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
    return f"; it holds run folders ({shown}): give one of them"


def is_epoch_end(checkpoint: Path) -> bool:
    """Written at the end of an epoch (not mid-epoch, by --checkpoint-every-steps)."""
    return CHECKPOINT_RE.match(Path(checkpoint).name).group(2) is not None


def newest_good_checkpoint(run_dir: Path, report=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; bad ones are reported and passed over."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            report(f"warning: skipping unusable checkpoint: {error}")
    return None


def prune_checkpoints(run_dir: Path, keep_step: int, keep_epoch: int = 0) -> None:
    """Delete all but the newest `keep_step` mid-epoch checkpoints and, unless `keep_epoch` is 0,
    all but the newest `keep_epoch` epoch-end ones. A checkpoint holds the weight averages, so
    resuming never needs an older one."""
    checkpoints = list_checkpoints(run_dir)
    step_only = [p for p in checkpoints if not is_epoch_end(p)]
    epoch_end = [p for p in checkpoints if is_epoch_end(p)]
    doomed = step_only[: max(len(step_only) - keep_step, 0)]
    if keep_epoch > 0:
        doomed += epoch_end[: max(len(epoch_end) - keep_epoch, 0)]
    for path in doomed:
        path.unlink(missing_ok=True)


def export_safetensors(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    payload = save(tensors, metadata=metadata)
    atomic_write(Path(path), lambda handle: handle.write(payload))
