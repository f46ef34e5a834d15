"""Crash-safe profile folders: append-only tables and an atomically replaced meta.json.

Every finished row is appended to its table as one CSV line and fsync'ed before the next
measurement starts, so `kill -9` loses at most the row being measured. On restart the
table is read back, a torn last line (killed mid-write) is cut off, and the keys found
are skipped. The tables are the profile itself: no separate finalise step can be missed.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from rkvsim.models.files import fsync_dir
from rkvsim.profiler.schema import TableSchema, row_key


def _csv_line(values: list) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _cell(v) -> object:
    # Empty cell for missing values; repr-exact floats so a reread table equals what was timed.
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def repair_tail(path: Path) -> int:
    """Cut a partial last line left by a kill mid-write; returns the bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


class TableWriter:
    """Appends rows of one table; knows which keys are already there."""

    def __init__(self, folder: Path, schema: TableSchema):
        self.schema = schema
        self.path = folder / schema.filename
        self.keys: set[tuple] = set()
        self.repaired_bytes = 0
        if self.path.exists() and self.path.stat().st_size > 0:
            self.repaired_bytes = repair_tail(self.path)
            self._load_keys()
        self._file = None

    def _load_keys(self) -> None:
        with open(self.path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            if tuple(header) != self.schema.columns:
                raise ValueError(f"{self.path} has columns {header}, expected {list(self.schema.columns)} "
                                 "(written by another schema version?)")
            for values in reader:
                self.keys.add(row_key(self.schema, dict(zip(header, values))))

    def __contains__(self, key: tuple) -> bool:
        return key in self.keys

    def append(self, row: dict) -> None:
        key = row_key(self.schema, row)
        if key in self.keys:
            raise ValueError(f"duplicate {self.schema.name} row {key}")
        missing = [c for c in self.schema.columns if c not in row]
        if missing:
            raise ValueError(f"{self.schema.name} row lacks {missing}")
        if self._file is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "a", newline="")
            if new:
                self._file.write(_csv_line(list(self.schema.columns)))
                fsync_dir(self.path.parent)
        self._file.write(_csv_line([_cell(row[c]) for c in self.schema.columns]))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.keys.add(key)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
