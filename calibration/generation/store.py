"""Durable, resumable storage of generation rows.

Layout of an output folder:
  part-<name>.jsonl  one finished (prompt, config) row per line; appended with flush +
                     fsync per row, so a kill loses at most the row being written;
  prompts.jsonl      the sampled prompts (id, ShareGPT id, text, token count), atomic;
  meta.json          what produced the rows (model, versions, settings, seed, command),
                     written atomically.
Resume: every part file is read, rows are keyed by (prompt_id, config) and the first
occurrence wins; a line that does not parse (the torn tail of a killed run) is ignored,
and the part file a run appends to is first cut back to its last complete line, so the
redone row replaces the torn one. Parallel workers use different part names; one part
file is held under an exclusive lock while a run appends to it.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

PART_GLOB = "part-*.jsonl"
KEY_FIELDS = ("prompt_id", "config")


def part_path(out_dir: Path, name: str = "0") -> Path:
    return Path(out_dir) / f"part-{name}.jsonl"


def row_key(row: dict) -> tuple[str, str]:
    return str(row["prompt_id"]), str(row["config"])


def read_rows(path: Path) -> tuple[list[dict], int]:
    """(complete rows of one JSONL file, number of lines ignored as torn or not rows)."""
    rows, bad = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                bad += 1          # a torn last line: the row is redone
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict) and all(k in row for k in KEY_FIELDS):
                rows.append(row)
            elif line.strip():
                bad += 1
    return rows, bad


def load_rows(out_dir: Path) -> tuple[dict[tuple[str, str], dict], int]:
    """{(prompt_id, config): row} over all part files, and the count of ignored lines."""
    done: dict[tuple[str, str], dict] = {}
    bad = 0
    for p in sorted(Path(out_dir).glob(PART_GLOB)):
        rows, b = read_rows(p)
        bad += b
        for r in rows:
            done.setdefault(row_key(r), r)
    return done, bad


def truncate_torn_tail(path: Path) -> int:
    """Cut a file back to just after its last newline; returns the bytes removed."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                pos = pos - step + nl + 1
                break
            pos -= step
        if pos < size:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
        return size - pos


class RowWriter:
    """Appends rows to one part file, each durable before append() returns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")
        try:
            # A second writer on the same part would interleave lines: refuse it.
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise RuntimeError(f"{self.path} is being written by another run; "
                               "use a different --part name for a parallel worker") from None
        truncate_torn_tail(self.path)
        self._f.seek(0, os.SEEK_END)

    def append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._f.write(line.encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
