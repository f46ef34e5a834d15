"""Reading a profile folder back, refusing one measured on other hardware or for another model.

Calibration calls `load_profile(folder, hardware="a6000", model="llama-2-7b")`; the
profiles shipped with the package live under `packaged_profiles()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rkvsim.models import resolve_hardware, resolve_model

from rkvsim.profiler.device import ProfilerError
from rkvsim.profiler.schema import META_FILE, SCHEMA_VERSION, TABLES
from rkvsim.models.files import read_json_if_exists

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass
class Profile:
    folder: Path
    meta: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def hardware(self) -> str:
        return self.meta["hardware"]

    @property
    def origin(self) -> str:
        """How results cite their costs: profile:<hardware>@<date>."""
        date = (self.meta.get("finished") or self.meta.get("imported") or self.meta.get("started") or "")[:10]
        return f"profile:{self.hardware}@{date}"


def load_profile(folder: Path | str, hardware: str | None = None, model: str | None = None) -> Profile:
    folder = Path(folder)
    meta = read_json_if_exists(folder / META_FILE)
    if meta is None:
        raise ProfilerError(f"{folder} has no {META_FILE}: not an rkvprof profile")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ProfilerError(f"{folder}: schema_version {meta.get('schema_version')}, this rkvsim reads {SCHEMA_VERSION}")
    if hardware is not None:
        try:
            want = resolve_hardware(hardware).name
        except KeyError:
            want = hardware
        if meta.get("hardware") != want:
            raise ProfilerError(f"{folder} was measured on {meta.get('hardware')!r}, not {want!r}")
    if model is not None and meta.get("model") != resolve_model(model).name:
        raise ProfilerError(f"{folder} profiles {meta.get('model')!r}, not {resolve_model(model).name!r}")
    if meta.get("status", "complete") != "complete":
        raise ProfilerError(f"{folder} is an unfinished collection (status {meta.get('status')!r}); rerun it to finish")
    import pandas as pd     # here: the simulator imports this module for table_path alone

    tables = {}
    for name, schema in TABLES.items():
        path = table_path(folder, schema.filename)
        if path is not None:
            df = pd.read_csv(path)
            if list(df.columns) != list(schema.columns) or (df["schema_version"] != SCHEMA_VERSION).any():
                raise ProfilerError(f"{path} does not follow table schema version {SCHEMA_VERSION}")
            tables[name] = df
    return Profile(folder, meta, tables)


def table_path(folder: Path, filename: str) -> Path | None:
    """A table's file: `<name>.csv`, or `<name>.csv.gz` (imported GPU profiles ship compressed)."""
    for p in (Path(folder) / filename, Path(folder) / f"{filename}.gz"):
        if p.exists():
            return p
    return None


def packaged_profiles() -> list[Path]:
    """Folders under rkvsim/profiler/data holding a meta.json (hardware/model/)."""
    return sorted(p.parent for p in DATA_DIR.glob(f"*/*/{META_FILE}"))
