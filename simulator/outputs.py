"""Writing a run's results: summary.json, per-request and per-step tables, report.html.
Everything is written into a temporary folder beside the target and renamed into place,
so a failed or interrupted run never leaves a half-written results folder."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rkvsim.simulator.simulation import MethodRun
from rkvsim.simulator.metrics import per_request_columns, summarize
from rkvsim.models.files import replace_dir

SCHEMA_VERSION = 1
MAX_SERIES_POINTS = 2000


def build_summary(scenario_name: str, seed: int, runs: list[MethodRun], extra: dict) -> dict:
    sources = sorted({r.cost_source for r in runs})
    return {
        "schema_version": SCHEMA_VERSION,
        "scenario": scenario_name,
        "seed": seed,
        "cost_source": sources[0] if len(sources) == 1 else sources,
        **extra,
        **_scheduler(runs),
        "methods": {r.label: {**summarize(r.log, [rep.steps for rep in r.replicas], r.layout.num_blocks),
                                     "kv_capacity_tokens": int(r.layout.num_blocks * r.layout.block_size),
                                     **_prefix_cache(r),
                                     **_cost_notes(r)}
                    for r in runs},
    }


def _scheduler(runs: list[MethodRun]) -> dict:
    """The paged scheduler's policy and the settings it resolved (None fields take the policy's)."""
    cfg = getattr(runs[0].replicas[0], "cfg", None) if runs and runs[0].replicas else None
    if getattr(cfg, "kind", None) != "paged":
        return {}
    keys = ("policy", "max_batch_size", "max_batched_tokens", "block_size", "chunked_prefill", "enable_prefix_caching",
            "cuda_graphs", "cpu_overhead", "kv_blocks", "eviction_blocks", "long_prefill_token_threshold", "watermark")
    return {"scheduler": {k: getattr(cfg, k) for k in keys}}


def _prefix_cache(r: MethodRun) -> dict:
    """Prefix-cache figures where the replicas ran one (vllm-v1 with enable_prefix_caching)."""
    if not any(getattr(rep, "caching", False) for rep in r.replicas):
        return {}
    pools = [rep.pool for rep in r.replicas if rep.pool is not None]   # none when the method shares nothing
    log, spec = r.log, r.method.spec
    return {"prefix_cache": {
        "hit_rate": log.prefix_hit_tokens / log.prefix_query_tokens if log.prefix_query_tokens else 0.0,
        "saved_prefill_tokens": int(log.prefix_hit_tokens),
        "looked_up_tokens": int(log.prefix_query_tokens),
        "evicted_blocks": int(sum(p.evictions for p in pools)),
        "shareable": spec.prefix_shareable,
        "why": spec.prefix_why,
    }}


def _cost_notes(r: MethodRun) -> dict:
    """How a calibrated cost model filled what its profile lacks (borrowed fits, priors), and where
    each part of the step cost came from (dense, attention, comm, cpu)."""
    notes = []
    for rep in r.replicas:
        for n in getattr(getattr(rep, "cost", None), "notes", None) or []:
            if n not in notes:
                notes.append(n)
    out = {"cost_notes": notes} if notes else {}
    parts = []
    for rep in r.replicas:
        cp = getattr(getattr(rep, "cost", None), "cost_parts", None)
        if cp:
            s = " ".join(f"{k}:{v}" for k, v in cp.items())
            if s not in parts:
                parts.append(s)
    if parts:
        out["cost_parts"] = parts[0] if len(parts) == 1 else parts
    trust = []
    for rep in r.replicas:
        for t in getattr(getattr(rep, "cost", None), "cost_trust", None) or []:
            d = asdict(t)
            if d not in trust:
                trust.append(d)
    if trust:
        out["cost_trust"] = trust
    return out


def request_table(runs: list[MethodRun]):
    import pandas as pd
    frames = []
    for r in runs:
        df = pd.DataFrame(per_request_columns(r.log))
        df.insert(0, "method", r.label)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def series_table(runs: list[MethodRun]):
    """Per-step KV occupancy and batch size, thinned to at most MAX_SERIES_POINTS per replica."""
    import pandas as pd
    frames = []
    for r in runs:
        for rep in r.replicas:
            n = len(rep.steps)
            if n == 0:
                continue
            idx = np.unique(np.linspace(0, n - 1, min(n, MAX_SERIES_POINTS)).astype(np.int64))
            frames.append(pd.DataFrame({
                "method": r.label, "replica": rep.index,
                "time_s": np.frombuffer(rep.steps.t_end)[idx],
                "kv_fraction": np.frombuffer(rep.steps.kv_fraction)[idx],
                "batch_size": np.frombuffer(rep.steps.batch, np.int64)[idx],
                "step_s": np.frombuffer(rep.steps.dt)[idx],
            }))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["method", "replica", "time_s", "kv_fraction", "batch_size", "step_s"])


def write_results(out_dir: Path, summary: dict, runs: list[MethodRun], scenario_text: str) -> Path:
    from rkvsim.simulator.report import write_report
    out_dir = Path(out_dir)

    def fill(tmp: Path) -> None:
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
        (tmp / "scenario.yaml").write_text(scenario_text)
        requests = request_table(runs)
        series = series_table(runs)
        requests.to_parquet(tmp / "requests.parquet", index=False)
        series.to_parquet(tmp / "timeseries.parquet", index=False)
        write_report(tmp / "report.html", summary, requests, series)

    replace_dir(out_dir, fill)
    return out_dir
