"""The product's one way to write and read its files: readers never see half a file, a crash
leaves no partial one, and a JSON file that cannot be read is one clear error.

It sits in models/, the bottom layer, because every other package writes artifacts (profiles,
fits, generation rows, results, sweep parts) and none may import a package above it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

CACHE_ENV = "RKVSIM_CACHE"


def cache_dir() -> Path:
    """Where derived, rebuildable files go: `$RKVSIM_CACHE`, else ~/.cache/rkvsim."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rkvsim"


def fsync_dir(folder: Path) -> None:
    """Makes a file's creation or rename durable, not just its contents."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_path(path: Path, fill: Callable[[str], object]) -> None:
    """fill(tmp) writes a temp file beside `path` by name (for writers that want a path, such as
    pandas' to_parquet), then it is flushed to disk and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes it owner-only; caches and results may be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """atomic_path with write(f) on the open temp file."""
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
    atomic_path(path, fill)


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj, *, indent: int = 2, sort_keys: bool = False, default=None) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=default) + "\n")


def write_jsonl(path: Path, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class UnreadableFile(ValueError):
    """A file the product wrote (or a user gave) that is missing or not valid JSON."""


def read_json(path: Path, what: str = "JSON file"):
    """The parsed file, or UnreadableFile naming the file, what it should be and why not."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UnreadableFile(f"{path}: no such {what}") from None
    except (OSError, ValueError) as e:
        raise UnreadableFile(f"{path}: not a readable {what} ({e}); rewrite or delete it") from None


def read_json_if_exists(path: Path, what: str = "JSON file"):
    """read_json, or None when the file does not exist (a folder being started or resumed)."""
    return read_json(path, what) if Path(path).exists() else None


def replace_dir(dest: Path, fill: Callable[[Path], object]) -> None:
    """fill(tmp) builds a folder beside `dest`, which then takes its place: a reader sees the old
    folder or the whole new one (the swap itself is two renames; a crash between them leaves
    `dest` absent and the new folder complete under a temporary name, never a mix)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)   # mkdtemp makes it owner-only
        swap_in_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in_dir(ready: Path, dest: Path) -> None:
    """A complete folder `ready` (on dest's file system) takes dest's place; the old one is removed."""
    dest = Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(ready, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
