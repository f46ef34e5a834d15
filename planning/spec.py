"""A sweep file: a base scenario, fixed overrides, axes, a design and seeds.

    name: rate_crossover
    base: ../heavy_kv.yaml            # relative to this file
    set: {workload.num_requests: 300} # fixed overrides of the base (dotted paths)
    seeds: 2                          # an int n (seeds 0..n-1) or a list
    design: grid                      # grid | lhs
    samples: 50                       # lhs: number of points
    lhs_seed: 0
    axes:
      workload.arrival.rate: [1, 2, 4, 8]
      scheduler.max_batch_size: {low: 16, high: 256, num: 4, log: true, integer: true}
    report:
      x: workload.arrival.rate        # axis of the curves and of the crossover (default: first numeric)
      metric: e2e_s_p90               # the metric a method must beat FP16 on
      heatmap: [workload.arrival.rate, scheduler.max_batch_size]
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rkvsim.simulator.config import Scenario, ScenarioError, format_validation_error, set_dotted, load_scenario, read_yaml

from rkvsim.planning.axes import AxisError, Range, check_path, grid_points, lhs_points, parse_axis, point_key


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReportSpec(_Strict):
    x: str | None = None
    metric: str = "e2e_s_p90"
    heatmap: list[str] | None = None


class SweepFile(_Strict):
    name: str = "sweep"
    base: str
    set: dict = Field(default_factory=dict)
    seeds: int | list[int] = 1
    design: Literal["grid", "lhs"] = "grid"
    samples: int = Field(20, ge=1)
    lhs_seed: int = 0
    axes: dict[str, list | dict] = Field(min_length=1)
    report: ReportSpec = Field(default_factory=ReportSpec)


@dataclass
class Point:
    index: int
    overrides: dict
    key: str


@dataclass
class Sweep:
    name: str
    base: dict                 # the base scenario as data, fixed overrides applied
    base_dir: str              # the base scenario's folder (relative trace paths resolve there)
    axes: dict[str, list | Range]
    points: list[Point]
    seeds: list[int]
    report: ReportSpec
    fingerprint: str = ""
    tasks: list[tuple[Point, int]] = field(default_factory=list)

    def scenario(self, overrides: dict) -> Scenario:
        return build_scenario(self.base, overrides)


def build_scenario(base: dict, overrides: dict) -> Scenario:
    data = copy.deepcopy(base)
    for k, v in overrides.items():
        set_dotted(data, k, v)
    return Scenario.model_validate(data)


def load_sweep(path: str | Path, overrides: dict | None = None) -> Sweep:
    """Read, check every axis path and validate every point's scenario; raises ScenarioError.
    `overrides` ({dotted key: value}, from --set) apply on top of the sweep's own `set:`."""
    p = Path(path)
    raw = read_yaml(p, "sweep file; see scenarios/sweeps/ for examples")
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as e:
        raise ScenarioError(f"{p}: {format_validation_error(e)}") from None
    if overrides:
        spec.set.update(overrides)
    base_path = (p.parent / spec.base) if not Path(spec.base).is_absolute() else Path(spec.base)
    if not base_path.is_file():
        raise ScenarioError(f"{p}: base: {spec.base} not found (relative paths start at the sweep file's folder)")
    try:
        for k in spec.set:
            check_path(k)
        load_scenario(base_path, spec.set)   # a broken base fails here, naming its field
        base = read_yaml(base_path, "base scenario")
        for k, v in spec.set.items():
            set_dotted(base, k, v)
        axes = {k: parse_axis(k, v) for k, v in spec.axes.items()}
    except AxisError as e:
        raise ScenarioError(f"{p}: {e}") from None
    for which, name in (("report.x", spec.report.x), *(("report.heatmap", h) for h in spec.report.heatmap or [])):
        if name is not None and name not in axes:
            raise ScenarioError(f"{p}: {which}: {name!r} is not an axis; use one of {', '.join(axes)}")
    if spec.design == "grid" and "samples" in raw:
        raise ScenarioError(f"{p}: samples: only used with design: lhs; remove it or set design: lhs")
    raw_points = grid_points(axes) if spec.design == "grid" else lhs_points(axes, spec.samples, spec.lhs_seed)
    points = [Point(i, o, point_key(o)) for i, o in enumerate(raw_points)]
    for pt in points:
        try:
            build_scenario(base, pt.overrides)
        except ValidationError as e:
            at = ", ".join(f"{k}={v!r}" for k, v in pt.overrides.items())
            raise ScenarioError(f"{p}: point {pt.index} ({at}): {format_validation_error(e)}") from None
    seeds = list(range(spec.seeds)) if isinstance(spec.seeds, int) else list(spec.seeds)
    if not seeds:
        raise ScenarioError(f"{p}: seeds: give at least one seed")
    sw = Sweep(spec.name, base, str(base_path.resolve().parent), axes, points, seeds, spec.report)
    # What the rows depend on: a resumed sweep must be the same sweep.
    sw.fingerprint = hashlib.sha1(json.dumps(
        {"base": base, "points": [pt.overrides for pt in points], "seeds": seeds},
        sort_keys=True, default=str).encode()).hexdigest()[:16]
    sw.tasks = [(pt, s) for pt in points for s in seeds]
    return sw
