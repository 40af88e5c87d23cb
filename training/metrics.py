"""Metrics to JSONL and CSV in the run folder, and optionally to Weights & Biases."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

CSV_COLUMNS = [
    "phase", "epoch", "step", "resolution", "lr", "train_loss", "train_top1", "images_per_s", "skipped_images",
    "val_top1", "val_top5", "val_loss", "val_weights", "seconds",
]


class MetricsLog:
    """Appends one record per event; every line is flushed so a killed run keeps its history."""

    def __init__(self, run_dir: Path, config: dict, use_wandb: bool = False, wandb_project: str = "") -> None:
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        csv_path = run_dir / "metrics.csv"
        new_csv = not csv_path.exists() or csv_path.stat().st_size == 0
        self.csv_file = open(csv_path, "a", newline="", buffering=1)
        self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self.csv.writeheader()
        self.wandb = None
        if use_wandb:
            self.wandb = _start_wandb(run_dir, config, wandb_project)

    def log(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        if record.get("event") == "epoch":
            self.csv.writerow({key: _fmt(record.get(key)) for key in CSV_COLUMNS})
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))
            except Exception as error:  # noqa: BLE001 - tracking must never stop training
                print(f"warning: wandb logging failed, continuing without it: {error}", file=sys.stderr)
                self.wandb = None

    def close(self) -> None:
        self.jsonl.close()
        self.csv_file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass


def _fmt(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


def _start_wandb(run_dir: Path, config: dict, project: str):
    """Offline unless an API key is configured: training never waits on the network."""
    try:
        import wandb
    except ImportError:
        print("warning: --wandb given but wandb is not installed; not tracking", file=sys.stderr)
        return None
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    try:
        return wandb.init(project=project, dir=str(run_dir), config=config, mode=mode, name=run_dir.name,
                          settings=wandb.Settings(silent=True))
    except Exception as error:  # noqa: BLE001
        print(f"warning: wandb could not start ({error}); not tracking", file=sys.stderr)
        return None
