"""Result tables (validation sweeps, benchmarks) written as CSV or JSON.

The output's folder is checked before the work that fills it, so a long run never ends in an
unwritable path; files are written atomically, so a reader never sees half of one, and an older
file at the same path stays whole until the new one replaces it.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from .checkpoint import atomic_write
from .config import ConfigError

TABLE_SUFFIXES = (".csv", ".json")


def check_writable(path: Path, option: str) -> None:
    """Create the folder of an output file and try writing in it, or raise ConfigError naming `option`.
    One byte is written and flushed: an empty file can be made on a full disk, a byte cannot."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent) as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror} (check {option})") from None


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per row; the columns are the union of the rows' keys, in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(path), lambda handle: handle.write(table.getvalue().encode()))


def write_json(document: object, path: Path) -> None:
    atomic_write(Path(path), lambda handle: handle.write((json.dumps(document, indent=2) + "\n").encode()))
