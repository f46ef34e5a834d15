"""Sweep axes: dotted paths into the scenario schema, and the points of a grid or a Latin hypercube.

A path is checked against the pydantic schema before anything runs, so a typo fails with the
field named (`workload.arival.rate: no field 'arival' in workload; known: ...`) instead of
after an hour of sweeping. A path may stop at a list-valued field (methods, fleet) but not
go inside it.
"""
from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from rkvsim.simulator.config import Scenario


class AxisError(ValueError):
    """A sweep axis that cannot be applied; the message names it and the fix."""


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold directly (through Optional/Union/Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        out: list[type[BaseModel]] = []
        for a in typing.get_args(annotation):
            out += _models_in(a)
        return out
    return []


def check_path(path: str, root: type[BaseModel] = Scenario) -> None:
    """Raise AxisError unless `path` names a field of the scenario schema."""
    keys = path.split(".")
    models: list[type[BaseModel]] = [root]
    where = "scenario"
    for i, k in enumerate(keys):
        if not models:
            raise AxisError(f"axis {path!r}: {where} is a value, it has no field {k!r}; "
                            f"sweep {where} itself or a field of the scenario reference in README.md")
        known = sorted({f for m in models for f in m.model_fields})
        if k not in known:
            raise AxisError(f"axis {path!r}: no field {k!r} in {where}; known: {', '.join(known)}")
        anns = [m.model_fields[k].annotation for m in models if k in m.model_fields]
        models = [x for a in anns for x in _models_in(a)]
        where = ".".join(keys[: i + 1])


@dataclass(frozen=True)
class Range:
    """A numeric axis given as a range: `{low, high, num (grid), log, integer}`."""
    low: float
    high: float
    num: int = 5
    log: bool = False
    integer: bool = False

    def at(self, u: np.ndarray) -> list:
        """Values at unit positions u in [0, 1]."""
        if self.log:
            v = np.exp(np.log(self.low) + u * (np.log(self.high) - np.log(self.low)))
        else:
            v = self.low + u * (self.high - self.low)
        return [int(round(x)) for x in v] if self.integer else [float(x) for x in v]

    def grid(self) -> list:
        u = np.linspace(0.0, 1.0, self.num) if self.num > 1 else np.zeros(1)
        vals = self.at(u)
        return list(dict.fromkeys(vals))  # integer rounding may repeat values


def parse_axis(path: str, spec) -> list | Range:
    check_path(path)
    if isinstance(spec, list):
        if not spec:
            raise AxisError(f"axis {path!r}: give at least one value")
        if path == "methods":
            # One method per point reads naturally: methods: [fp16, kivi-4] means two points.
            return [v if isinstance(v, list) else [v] for v in spec]
        return spec
    if isinstance(spec, dict):
        extra = set(spec) - {"low", "high", "num", "log", "integer"}
        if extra or "low" not in spec or "high" not in spec:
            raise AxisError(f"axis {path!r}: a range is {{low, high, num, log, integer}}; "
                            f"got keys {sorted(spec)}; or give a list of values")
        try:
            r = Range(float(spec["low"]), float(spec["high"]), int(spec.get("num", 5)),
                      bool(spec.get("log", False)), bool(spec.get("integer", False)))
        except (TypeError, ValueError):
            raise AxisError(f"axis {path!r}: low/high must be numbers, num an integer") from None
        if r.high < r.low or (r.log and r.low <= 0) or r.num < 1:
            raise AxisError(f"axis {path!r}: need low <= high, num >= 1 and low > 0 for log ranges")
        return r
    raise AxisError(f"axis {path!r}: give a list of values or a range {{low, high, num}}, got {spec!r}")


def grid_points(axes: dict[str, list | Range]) -> list[dict]:
    """Every combination, the first axis varying slowest."""
    lists = [(p, a.grid() if isinstance(a, Range) else a) for p, a in axes.items()]
    points: list[dict] = [{}]
    for path, vals in lists:
        points = [{**pt, path: v} for pt in points for v in vals]
    return points


def lhs_points(axes: dict[str, list | Range], n: int, seed: int) -> list[dict]:
    """n points of a Latin hypercube: each axis cut into n strata, each stratum used once.
    A list axis is categorical: stratum k takes the value at floor(u * len)."""
    rng = np.random.default_rng(seed)
    points: list[dict] = [{} for _ in range(n)]
    for path, a in axes.items():
        u = (rng.permutation(n) + rng.uniform(size=n)) / n
        vals = a.at(u) if isinstance(a, Range) else [a[min(int(x * len(a)), len(a) - 1)] for x in u]
        for pt, v in zip(points, vals):
            pt[path] = v
    return points


def point_key(overrides: dict) -> str:
    """A stable id of a point's settings (resume matches on it, not on list order alone)."""
    import hashlib
    return hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cell(value):
    """An axis value as one tidy-table cell: numbers stay numbers, anything else is JSON."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)
