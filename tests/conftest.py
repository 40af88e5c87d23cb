"""Shared helpers: a tiny, fast training command line on the demo digits."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# pytest-xdist's `-n N` (the README's test command) runs N test processes at once: the cores are
# shared out between them, and so with the programs they start. Two processes of two threads each
# on two cores took longer than one process (OpenMP threads spin waiting for a core).
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)


def tiny_train_args(output_dir: Path, *extra: str) -> list[str]:
    """A seconds-long demo run: B0 at width/depth 0.25, 32 px, 3 steps of 8 images per epoch."""
    return [
        "--config", "demo", "--width", "0.25", "--depth", "0.25", "--resolution", "32", "--half-resolution", "24",
        "--epochs", "2", "--max-steps-per-epoch", "3", "--micro-batch-size", "8", "--workers", "0",
        "--progress", "false", "--output-dir", str(output_dir), "--fine-tune-epochs", "1",
        "--precision", "fp32", "--channels-last", "false", *extra,
    ]


def file_size_limiter(limit: int | None):
    """A preexec_fn for subprocess: the child's files may grow to `limit` bytes, then write() fails
    (EFBIG; Python ignores SIGXFSZ), as on a full disk but for that process alone. None: no limit."""
    if limit is None:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_cli(script: str, *args: str, timeout: float = 600, env: dict | None = None,
            file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
        preexec_fn=file_size_limiter(file_size_limit),
    )


def run_clis(commands: list[list[str]], **kwargs) -> list[subprocess.CompletedProcess]:
    """`run_cli` for each command ([script, *args]), a few processes at a time (each spends seconds
    importing torch, on one core): for checks of many command lines that each stop early."""
    with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 1) + 1)) as pool:
        return list(pool.map(lambda command: run_cli(*command, **kwargs), commands))


def run_main(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """A CLI's `main(argv)` in this process: (exit code, what it wrote to stderr). For checks of many
    command lines that stop before any work: a process per line spends seconds importing torch. An
    exception a CLI leaves uncaught fails the test here as a traceback would in a process; each such
    test still runs one of its command lines as a real process (`run_cli`)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own exits
        code = stop.code
    return code, capsys.readouterr().err


@pytest.fixture
def tiny_args(tmp_path: Path):
    return lambda *extra: tiny_train_args(tmp_path / "runs", *extra)

