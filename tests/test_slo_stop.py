"""Stopping a run once an objective's miss is decided (simulator/slo_stop.py) is exact: a run that
stops would have missed, a run that does not stop is the run without the watch, figure for figure,
and a plan's answer is the same with and without it."""
from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_event_skipping import LOG_FIELDS, METHODS, STEP_FIELDS, arrival_st

from rkvsim.simulator.config import Scenario
from rkvsim.simulator.kv_memory import DoesNotFitError
from rkvsim.simulator.metrics import latency_stats, per_request_columns
from rkvsim.simulator.pipeline import run_scenario
from rkvsim.simulator.simulation import build_workload
from rkvsim.simulator.slo_stop import BOUNDED, STATS, MissRule, decided_miss, lower_bounds


def assert_same(a_runs, b_runs) -> None:
    """Every recorded figure equal (floats bit for bit), runs taken included."""
    for a, b in zip(a_runs, b_runs, strict=True):
        for f in LOG_FIELDS:
            x, y = getattr(a.log, f), getattr(b.log, f)
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f"log.{f} differs"
        assert np.array_equal(a.log.itl_hist, b.log.itl_hist)
        assert a.log.prefill_tokens == b.log.prefill_tokens and a.log.reject_reason == b.log.reject_reason
        for ra, rb in zip(a.replicas, b.replicas, strict=True):
            for f in STEP_FIELDS:
                assert getattr(ra.steps, f) == getattr(rb.steps, f), f"replica {ra.index}: steps.{f} differs"
            assert (ra.runs, ra.run_steps) == (rb.runs, rb.run_steps)


def _value(run, rule: MissRule) -> float:
    s = latency_stats(per_request_columns(run.log)[rule.column])[rule.stat]
    return math.nan if s is None else s


def _missed(run, rules) -> bool:
    return bool(run.log.rejected.any()) or any(not (_value(run, r) <= r.limit_s) for r in rules)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(METHODS), arrival=arrival_st, policy=st.sampled_from(["vllm-v1", "vllm-v0", "lmdeploy"]),
       bs=st.integers(1, 64), replicas=st.integers(1, 3), router=st.sampled_from(["round_robin", "least_kv"]),
       step=st.booleans(), plo=st.integers(1, 2000), omax=st.integers(1, 600), seed=st.integers(0, 99),
       picks=st.lists(st.tuples(st.sampled_from(BOUNDED), st.sampled_from(STATS), st.floats(0.2, 3.0)),
                      min_size=1, max_size=3))
def test_a_stopped_run_misses_and_an_unstopped_one_is_unchanged(method, arrival, policy, bs, replicas, router, step,
                                                               plo, omax, seed, picks):
    raw = {"name": "p", "model": "llama-2-7b", "hardware": "a6000", "methods": [method], "replicas": replicas,
           "router": router, "step_by_step": step, "profile": "roofline",
           "scheduler": {"policy": policy, "max_batch_size": bs},
           "workload": {"num_requests": 40, "arrival": arrival,
                        "prompt": {"dist": "uniform", "low": plo, "high": plo + 800},
                        "output": {"dist": "uniform", "low": 1, "high": omax}}}
    scn = Scenario.model_validate(raw)
    wl = build_workload(scn, seed, ".")
    try:
        full = run_scenario(scn, seed, ".", workload=wl, inflation=None).runs
    except DoesNotFitError:
        return
    # Limits around the run's own figures, so that both verdicts occur.
    rules = []
    for col, stat, f in picks:
        v = _value(full[0], MissRule(col, stat, 1.0))
        rules.append(MissRule(col, stat, max(v * f if math.isfinite(v) else 1.0, 1e-3)))
    watched = run_scenario(scn, seed, ".", workload=wl, inflation=None, stop_on_miss=rules).runs
    if watched[0].stopped is None:
        assert_same(full, watched)
    else:
        assert _missed(full[0], rules), f"stopped ({watched[0].stopped}) but the full run meets {rules}"


def test_bounds_never_exceed_the_final_values():
    """Part-way through (the log as settled at t), every request's bound is at most its value."""
    raw = {"name": "p", "model": "llama-2-7b", "hardware": "a6000", "methods": ["kivi-4"], "profile": "roofline",
           "workload": {"num_requests": 60, "arrival": {"process": "poisson", "rate": 4.0},
                        "prompt": {"dist": "uniform", "low": 100, "high": 2000},
                        "output": {"dist": "uniform", "low": 1, "high": 400}}}
    scn = Scenario.model_validate(raw)
    run = run_scenario(scn, 0, ".", inflation=None).runs[0]
    final = per_request_columns(run.log)
    log = run.log
    for t in np.linspace(0, float(np.nanmax(log.finish)), 13)[1:-1]:
        # The log as it stood at t: what had not happened by then is unknown.
        class At:
            pass
        at = At()
        at.output, at.rejected, at.prompt = log.output, log.rejected, log.prompt
        for f in ("arrival", "first_sched", "first_token", "finish"):
            x = getattr(log, f).copy()
            x[x > t] = np.nan
            setattr(at, f, x)
        for col in BOUNDED:
            lb = lower_bounds(at, col, float(t))
            want = final[col] if col != "tpot_s" else final[col][log.output > 1]
            assert (lb <= want + 1e-9).all(), col
        assert decided_miss(at, [MissRule("e2e_s", "p90", 1e6)], float(t)) is None


def test_plan_answer_same_with_and_without_early_stop(tmp_path, shared_dir):
    import subprocess
    import sys
    args = ["scenarios/sharegpt_poisson.yaml", "--rate", "6", "--slo", "ttft_p99<=2s,e2e_p90<=30s", "--max-gpus", "2",
            "--seeds", "2", "--bisect-steps", "2", "--workers", "1", "--set", "workload.num_requests=60",
            "--set", "methods=[fp16,kivi-4]", "--json"]
    out = []
    for extra, d in (([], "a"), (["--no-early-stop"], "b")):
        r = subprocess.run([sys.executable, "-m", "rkvsim.cli", "plan", *args, *extra, "--out", str(tmp_path / d)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        out.append(json.loads((tmp_path / d / "plan.json").read_text()))
    a, b = out
    assert a["simulations_stopped_early"] > 0 and b["simulations_stopped_early"] == 0
    for x in (a, b):
        x.pop("simulations_stopped_early")
    assert a == b
