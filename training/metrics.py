"""Metrics to JSONL and CSV in the run folder, and optionally to Weights & Biases."""

from __future__ import annotations

import csv
import json
import os
import secrets
import sys
from pathlib import Path

from .checkpoint import atomic_write, write_failed

METRICS_FILES = ("metrics.jsonl", "metrics.csv")
CSV_COLUMNS = [
    "phase", "epoch", "step", "resolution", "lr", "train_loss", "train_top1", "images_per_s", "skipped_images",
    "val_top1", "val_top5", "val_loss", "val_weights", "seconds",
]


class MetricsLog:
    """Appends one record per event; every line is flushed so a killed run keeps its history.

    `keep_bytes` ({file name: size}, from the checkpoint a run resumes from, or zeros for a fresh
    start) cuts each file back to what it held at that checkpoint: the records of steps that are
    about to be trained again are dropped rather than repeated, as TensorBoard's purge_step does.
    """

    def __init__(self, run_dir: Path, config: dict, use_wandb: bool = False, wandb_project: str = "",
                 keep_bytes: dict[str, int] | None = None) -> None:
        self.jsonl_path, self.csv_path = (run_dir / name for name in METRICS_FILES)
        for path in (self.jsonl_path, self.csv_path):
            size = (keep_bytes or {}).get(path.name)
            if size is not None and path.is_file() and path.stat().st_size > size:
                try:
                    os.truncate(path, size)
                except OSError as error:
                    raise write_failed(path, error) from error
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self.jsonl = _open_for_append(self.jsonl_path)
        self.csv_file = _open_for_append(self.csv_path)
        self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            try:
                self.csv.writeheader()
            except OSError as error:
                raise write_failed(self.csv_path, error) from error
        self.failure = None  # a WriteError, once a record could not be written
        self.wandb = None
        if use_wandb:
            self.wandb = _start_wandb(run_dir, config, wandb_project)

    def log(self, record: dict) -> None:
        """A failed write (full disk) is kept in `failure`, naming the file, and later records are
        not written: the caller raises it where every rank can stop together (the next checkpoint)."""
        if self.failure is not None:
            return
        try:
            self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as error:
            return self._failed(self.jsonl_path, error)
        if record.get("event") == "epoch":
            try:
                self.csv.writerow({key: _fmt(record.get(key)) for key in CSV_COLUMNS})
            except OSError as error:
                return self._failed(self.csv_path, error)
        if self.wandb is not None:
            try:
                self.wandb.log(wandb_values(record), step=record.get("step"))
            except Exception as error:  # noqa: BLE001 - tracking must never stop training
                print(f"warning: wandb logging failed, continuing without it: {error}", file=sys.stderr)
                self.wandb = None

    def sizes(self) -> dict[str, int]:
        """Each file's size now, for the checkpoint (lines are flushed as written)."""
        return {path.name: path.stat().st_size if path.is_file() else 0 for path in (self.jsonl_path, self.csv_path)}

    def _failed(self, path: Path, error: OSError) -> None:
        """Keep the first failure; close the files now, dropping what their buffers still hold
        (closed later, they would fail again, as noise at exit)."""
        self.failure = self.failure or write_failed(path, error)
        for handle in (self.jsonl, self.csv_file):
            try:
                handle.close()
            except OSError:
                pass

    def close(self) -> None:
        """A failure to write out the last lines is kept in `failure`, like one in log()."""
        for path, handle in ((self.jsonl_path, self.jsonl), (self.csv_path, self.csv_file)):
            try:
                handle.close()
            except OSError as error:
                self.failure = self.failure or write_failed(path, error)
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass


def _open_for_append(path: Path):
    try:
        return open(path, "a", newline="", buffering=1)
    except OSError as error:
        raise write_failed(path, error) from error


def _fmt(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


def _start_wandb(run_dir: Path, config: dict, project: str):
    """Offline unless an API key is configured (training never waits on the network), or as
    WANDB_MODE says where it is set: `wandb.init(mode=...)` would override the user's own setting
    (WANDB_MODE=offline with a key in the environment went online; WANDB_MODE=online after
    `wandb login`, which keeps the key in ~/.netrc, stayed offline)."""
    try:
        import wandb
    except ImportError:
        print("warning: --wandb given but wandb is not installed; not tracking", file=sys.stderr)
        return None
    mode = None if os.environ.get("WANDB_MODE") else "online" if os.environ.get("WANDB_API_KEY") else "offline"
    try:
        return wandb.init(project=project, dir=str(run_dir), config=config, mode=mode, name=run_dir.name,
                          id=_wandb_run_id(run_dir), resume="allow", settings=wandb.Settings(silent=True))
    except Exception as error:  # noqa: BLE001
        print(f"warning: wandb could not start ({error}); not tracking", file=sys.stderr)
        return None


def _wandb_run_id(run_dir: Path) -> str:
    """One W&B run per training run, resumes included: the id is made once and kept in the run
    folder (a name such as --run-name baseline is not unique across a shared project). Steps logged
    again after a resume repeat values W&B already has, since resumed training is exact."""
    path = run_dir / "wandb-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    run_id = secrets.token_hex(8)
    atomic_write(path, lambda handle: handle.write(run_id.encode()))
    return run_id


def wandb_values(record: dict) -> dict[str, int | float]:
    """The numbers of a record, as W&B gets them. A run validates several sets of weights at its
    last step (the EMA, the epoch average, the final ones): each gets keys of its own
    (`final/top1`), where one `top1` would keep only the last of them at that step."""
    values = {k: v for k, v in record.items() if isinstance(v, (int, float))}
    if record.get("event") == "validation":
        values = {(k if k == "step" else f"{record['weights']}/{k}"): v for k, v in values.items()}
    return values
