"""The fitted tables calibration ships as package data (calibration/data/...), found and read once."""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from rkvsim.models.files import read_json


def packaged(*parts: str) -> Path:
    spec = importlib.util.find_spec("rkvsim.calibration")
    return Path(list(spec.submodule_search_locations)[0]).joinpath("data", *parts)


def profiler_data() -> Path:
    """Where the profiles shipped with the package live (profiler/data)."""
    spec = importlib.util.find_spec("rkvsim.profiler")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@lru_cache(maxsize=8)
def load(path: str, what: str) -> dict:
    return read_json(Path(path), what)
