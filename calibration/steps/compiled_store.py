"""Compiled cost tables kept on disk between processes (~/.cache/rkvsim/compiled/, `$RKVSIM_CACHE`).

Compiling a method's lookups needs the fitted estimators: importing scikit-learn, unpickling the
fit and predicting over the grids, about 1.5 s in a fresh process and 0.15-0.4 s per (method, tp,
limits) after that. A plan or a sweep starts worker processes that each pay it again for tables
an earlier process already compiled, and `rkvsim run` pays it every time. The tables are a pure
function of what the key below names, so a process loads them instead (no scikit-learn import).

The key holds every input the compile reads: the profile folder and its tables' sha256, the
model and method specs, tp and the limits, the GPU carried to, FIT_VERSION, the source of the
packages the compile runs (calibration, models, profiler), the Python version and CPU, the versions of numpy,
scikit-learn, scipy and xgboost, the JSON data it reads beside them (method ratios, trust checks), and the
fit the compile reads (fit_id: the profile's fit/ folder, the fit cached under its tables'
sha256, pickles by size and mtime, and its meta.json). Only the attention donor (another GPU's
profile, for a profile that timed no attention) is found by scanning the profile stores, which the key cannot hold: the
entry records the donor it used (its folder, tables and fit_id), and a load whose donor would now
differ is a miss.
A file that cannot be read is a miss; writes go through a temp file and a rename.
"""
from __future__ import annotations

import hashlib
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Callable

from rkvsim.models.files import cache_dir, write_bytes

STORE_VERSION = 1
_ROOT = Path(__file__).resolve().parents[1]          # the calibration package
_CODE = ("calibration", "models", "profiler")
_DATA = ("method_ratios", "trust", "comm", "cpu_overheads")


def store_dir() -> Path:
    return cache_dir() / "compiled"


_LIBS = ("numpy", "scikit-learn", "scipy", "xgboost")   # the estimators' predictions depend on them


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of the source and small data files the compile depends on, and of the versions of
    the libraries that predict (read from their metadata, not imported); a few ms, once per process."""
    import platform
    from importlib.metadata import PackageNotFoundError, version
    h = hashlib.sha256()
    # A cache shared between machines: another interpreter or CPU may round the predictions apart.
    h.update(f"{platform.python_version()} {platform.machine()} {platform.processor()}".encode())
    for lib in _LIBS:
        try:
            h.update(f"{lib}={version(lib)}".encode())
        except PackageNotFoundError:
            h.update(f"{lib}=none".encode())
    for name in _CODE:
        root = _ROOT.parent / name       # the packages sit side by side, installed or editable
        for p in sorted(root.rglob("*.py")):
            h.update(f"{name}/{p.relative_to(root)}".encode())
            h.update(p.read_bytes())
    for sub in _DATA:
        for p in sorted((_ROOT / "data" / sub).glob("*.json")):
            h.update(f"data/{sub}/{p.name}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _files(folder: Path, tag: str) -> list[str]:
    out = []
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.suffix == ".json":
                out.append(f"{tag}{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}")
            elif p.is_file():
                st = p.stat()       # a fit pickle: large, so named by size and time
                out.append(f"{tag}{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return out


def fit_id(fit_dir: Path, cached_fit_dir: Path, meta: Path) -> tuple[str, ...]:
    """What decides the fit a profile's compile reads: the profile's fit/ folder (`rkvprof fit`
    writes it), else the fit cached under its tables' sha256, and the meta.json a fit reads."""
    out = _files(fit_dir, "fit/") + _files(cached_fit_dir, "cache/")
    if meta.is_file():
        out.append(f"meta:{hashlib.sha256(meta.read_bytes()).hexdigest()}")
    return tuple(out)


def key(folder: str, sha: str, fit: tuple[str, ...], fit_version: int, *args) -> str:
    """The entry's name: every input of the compile but the attention donor (see the module doc).
    fit: fit_id of the profile."""
    parts = [STORE_VERSION, fit_version, folder, sha, code_fingerprint(), list(fit), *map(repr, args)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def load(k: str, donor_now: Callable[[str], tuple | None]):
    """The compiled costs stored under k, or None. donor_now(here): the attention donor the
    compile would use today on GPU `here`, named as save's `donor` is (folder, tables sha, fit_id)."""
    try:
        entry = pickle.loads((store_dir() / f"{k}.pkl").read_bytes())
        if entry.get("version") != STORE_VERSION:
            return None
        if entry["needs_donor"] and donor_now(entry["here"]) != entry["donor"]:
            return None
        return entry["costs"]
    except Exception:   # noqa: BLE001 - absent, truncated or foreign: only a miss (and rewritten)
        return None


def save(k: str, costs, needs_donor: bool, here: str, donor: tuple | None) -> None:
    entry = {"version": STORE_VERSION, "costs": costs, "needs_donor": needs_donor, "here": here, "donor": donor}
    try:
        write_bytes(store_dir() / f"{k}.pkl", pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        pass            # a read-only cache only costs the next process the compile
