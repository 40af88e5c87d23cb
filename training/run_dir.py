"""Run folders: a new run never overwrites another's files, and two processes never share one.

`--resume auto` picks `output_dir/run_name` (or the newest run of the same config) and its newest
loadable checkpoint; with no checkpoint it starts fresh there, so the same command serves the
first launch and every restart (torchrun --max-restarts).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from .checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    newest_good_checkpoint,
    runs_inside,
    write_failed,
)
from .config import ConfigError, TrainConfig

LOCK_NAME = ".lock"
# a lock file without a pid is one being written (another process made it between its create and
# its write: taking it over then let both runs in) for this long, then one left by a process killed there
LOCK_WRITE_S = 10.0


def _new_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.config or cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def _is_empty(folder: Path) -> bool:
    return not any(folder.iterdir())


def _latest_run_of(output_dir: Path, config_name: str | None) -> Path | None:
    candidates = []
    for folder in output_dir.iterdir() if output_dir.is_dir() else []:
        saved = folder / "config.yaml"
        if saved.is_file():
            try:
                name = (yaml.safe_load(saved.read_text()) or {}).get("config")
            except yaml.YAMLError:
                continue
            if name == config_name:
                candidates.append((saved.stat().st_mtime, folder))
    return max(candidates)[1] if candidates else None


def locate_run(cfg: TrainConfig, report=print) -> tuple[Path, dict | None, Path | None]:
    """(run folder, checkpoint state or None, checkpoint path or None), before anything is written."""
    output_dir = Path(cfg.output_dir).expanduser()
    if cfg.resume and cfg.resume != "auto":
        target = Path(cfg.resume).expanduser()
        folder = target if target.is_dir() else target.parent
        if cfg.run_name and cfg.run_name != folder.name:  # it would be ignored: the run goes on in its own folder
            raise ConfigError(f"--resume {cfg.resume} continues the run in its folder {folder}, not in --run-name "
                              f"{cfg.run_name}: leave --run-name out, or start a new run from those weights with "
                              f"--initial-weights {cfg.resume}")
        if target.is_dir():
            found = newest_good_checkpoint(target, report)
            if found is None:
                raise CheckpointError(f"--resume {target}: no usable checkpoint in that folder{runs_inside(target)}")
            return target, found[1], found[0]
        return target.parent, load_checkpoint(target), target
    if cfg.resume == "auto":
        folder = output_dir / cfg.run_name if cfg.run_name else _latest_run_of(output_dir, cfg.config)
        if folder is not None and folder.is_dir():
            found = newest_good_checkpoint(folder, report)
            if found is not None:
                return folder, found[1], found[0]
            return folder, None, None  # restart of a run that died before its first checkpoint
    if cfg.run_name:
        folder = output_dir / cfg.run_name
        if folder.exists() and not _is_empty(folder):
            raise ConfigError(
                f"run folder {folder} already holds a run; use --resume auto to continue it or pick another --run-name"
            )
        return folder, None, None
    folder = output_dir / _new_run_name(cfg)
    suffix = 1
    while folder.exists():
        folder = output_dir / f"{_new_run_name(cfg)}-{suffix}"
        suffix += 1
    return folder, None, None


class RunLock:
    """An exclusive lock file holding the owner's pid; a lock left by a dead process is taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create the run folder {self.path.parent}: {error.strerror} "
                              f"(check --output-dir)") from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise ConfigError(
                        f"run folder {self.path.parent} is in use by another training process (pid {owner})"
                    ) from None
                if owner is None and self._age() < LOCK_WRITE_S:  # made this instant, its pid not yet written
                    raise ConfigError(f"run folder {self.path.parent} is being locked by another training "
                                      f"process") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            except OSError as error:
                raise ConfigError(f"cannot write to the run folder {self.path.parent}: {error.strerror} "
                                  f"(check --output-dir)") from None
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(str(os.getpid()))
            except OSError as error:  # a full disk: the file is made, its few bytes are refused
                self.path.unlink(missing_ok=True)
                raise write_failed(self.path, error) from error
            self.held = True
            return
        raise ConfigError(f"could not lock run folder {self.path.parent}")

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held and self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_if_empty(folder: Path) -> None:
    """Remove a run folder that holds nothing (a run that failed before writing anything)."""
    try:
        folder.rmdir()  # refuses a folder that holds anything
    except OSError:
        pass


def write_config(folder: Path, values: dict) -> None:
    text = yaml.safe_dump(values, sort_keys=False)
    atomic_write(folder / "config.yaml", lambda handle: handle.write(text.encode()))
