"""Writing artifacts so readers never see half a file, and hashing them."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_path(path: Path, fill: Callable[[str], object]) -> None:
    """fill(tmp) writes a temp file beside `path` by name (for writers that want a path, such as
    pandas' to_parquet), then it is renamed into place: readers see the old file or the whole
    new one, and a crash leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """atomic_path with write(f) on the open temp file."""
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
    atomic_path(path, fill)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes(path: Path, data: bytes) -> None:
    """atomic_write of a ready byte string."""
    atomic_write(path, lambda f: f.write(data))
