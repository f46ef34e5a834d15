"""One unit of sweep work: a point's scenario at one seed, every set-up it compares, as tidy rows.

The same function runs in a local worker process and in a Ray task, and reads nothing but its
arguments and installed package data, so both backends return identical rows.
"""
from __future__ import annotations

import math
from pathlib import Path

from rkvsim.simulator.outputs import build_summary
from rkvsim.simulator.pipeline import run_scenario
from rkvsim.simulator.verbosity import load_inflation

from rkvsim.planning.axes import cell
from rkvsim.planning.spec import build_scenario

ROW_SCHEMA_VERSION = 1
_INFLATION: dict = {}


def _inflation(scn, base_dir: Path):
    """Fitted once per worker process per (data, seed): fitting reads the generation rows."""
    v = scn.verbosity
    if v.data is None:
        return None
    key = (v.data, v.min_prompts, scn.seed, str(base_dir))
    if key not in _INFLATION:
        _INFLATION[key] = load_inflation(scn, base_dir)
    return _INFLATION[key]


def flatten_metrics(m: dict) -> dict:
    """{'ttft_s': {'p90': x}} -> {'ttft_s_p90': x}; numbers as float so every row has one type."""
    out = {}
    for k, v in m.items():
        if isinstance(v, dict):
            for q, x in v.items():
                if isinstance(x, str):
                    continue        # e.g. prefix_cache.why: the method's reason, not a metric
                out[f"{k}_{q}"] = math.nan if x is None else float(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def run_task(base: dict, base_dir: str, overrides: dict, seed: int, point: int, key: str,
             stop_on_miss: list | None = None) -> list[dict]:
    """Rows (one per compared set-up) of one point at one seed. With `stop_on_miss` (MissRule
    list) a simulation certain to miss one of them stops there: its row's status says so and
    carries no metrics (planning/slo.py's meets() reads it as a miss, which it is)."""
    scn = build_scenario(base, overrides)
    bd = Path(base_dir)
    res = run_scenario(scn, seed, bd, inflation=_inflation(scn, bd), keep_going=True, stop_on_miss=stop_on_miss)
    head = {"schema_version": ROW_SCHEMA_VERSION, "point": point, "point_key": key, "seed": seed}
    axes = {path: cell(value) for path, value in overrides.items()}
    runs = {r.label: r for r in res.runs}
    rows = []
    for v in res.variants:
        desc = {"method": v.label, "compress": v.method.label, "tp": v.tp, "arm": v.arm, "router": v.router,
                "fleet": v.fleet_label, "gpus": v.gpus}
        if v.label in res.does_not_fit:
            rows.append({**head, **desc, **axes, "status": f"does not fit: {res.does_not_fit[v.label]}", "cost_source": ""})
            continue
        run = runs[v.label]
        if run.stopped is not None:
            rows.append({**head, **desc, **axes, "status": f"stopped: {run.stopped}", "cost_source": run.cost_source})
            continue
        summary = build_summary(scn.name, seed, [run], {})
        rows.append({**head, **desc, **axes, "status": "ok", "cost_source": run.cost_source,
                     **flatten_metrics(summary["methods"][v.label])})
    return rows
