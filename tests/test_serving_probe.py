"""Speed probes, the interleaved validation matrix and its verdicts, core pinning (no real engine)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from rkvsim.models import parse_method
from rkvsim.profiler.cpu_affinity import allowed_cores, pinned, split
from rkvsim.simulator.llamacpp_cost import LlamaCppCostModel, read_engine_profile
from rkvsim.simulator.cost_model import StepBatch
from rkvsim.validation import serving_matrix as sm
from rkvsim.validation.serving_probe import (drift, measured_points, plan_probe, profile_points, scale_at_replay,
                                             speed, write_scaled_profile)
from tests.test_slots import write_profile


@pytest.fixture(scope="module")
def prof(tmp_path_factory):
    return write_profile(tmp_path_factory.mktemp("probe-profile"))


def test_probe_plan_takes_the_grid_points_the_workload_looks_like(prof, monkeypatch):
    from rkvsim.validation import serving_probe
    _meta, rows = read_engine_profile(prof)
    # grid prompts 64 / 256 / 1024; batches 1 2 4 8; gen 32. Capped at 128 tokens: 64.
    assert plan_probe(rows, "f16", np.array([150, 200, 220, 400]), 4).as_dict() == \
        {"kv": "f16", "prompt_tokens": 64, "gen_tokens": 32, "batches": [1, 4]}
    monkeypatch.setattr(serving_probe, "PROBE_MAX_PROMPT", 4096)
    # token-weighted: nine 20-token prompts and one of 400 put the prefill time near 282 tokens
    assert plan_probe(rows, "f16", np.array([20] * 9 + [400]), 4).prompt_tokens == 256
    assert plan_probe(rows, "f16", np.array([20, 30]), 3).prompt_tokens == 64      # nearest in log
    assert plan_probe(rows, "f16", np.array([20]), 3).batches == (1, 2)           # largest grid batch <= slots
    with pytest.raises(ValueError, match="q4_0"):
        plan_probe(rows, "q4_0", np.array([100]), 4)


def test_the_probe_drops_its_warm_up_run(prof, monkeypatch):
    from rkvsim.profiler import engine_bench
    from rkvsim.profiler.engine_bench import BenchSettings
    from rkvsim.validation.serving_probe import run_probe
    _meta, rows = read_engine_profile(prof)
    plan = plan_probe(rows, "f16", np.array([64]), 4)
    calls = []

    def fake(cmd, timeout_s=900, cores=()):
        pls = [int(x) for x in cmd[cmd.index("-npl") + 1].split(",")]
        calls.append(pls)
        # the first configuration is 50% slow (first touch); repeats differ by 2%
        k = 1 + 0.02 * len(calls)
        return [{"pl": pl, "pp": 64, "tg": 32, "t_pp": 0.1 * pl * k * (1.5 if i == 0 else 1),
                 "t_tg": 0.3 * pl * k * (1.5 if i == 0 else 1)} for i, pl in enumerate(pls)], ""

    monkeypatch.setattr(engine_bench, "run_bench", fake)
    got = run_probe(Path("bench"), Path("m.gguf"), plan, BenchSettings())
    assert calls == [[1, 1, 4], [1, 1, 4]]
    assert got[("prefill", 1)] == pytest.approx(0.1 * 1.03) and got[("decode", 4)] == pytest.approx(1.2 / 32 * 1.03)


def test_probe_speed_is_time_over_the_profile_per_stage(prof):
    _meta, rows = read_engine_profile(prof)
    plan = plan_probe(rows, "f16", np.array([64]), 4)
    base = profile_points(rows, plan)
    assert set(base) == {("prefill", 1), ("prefill", 4), ("decode", 1), ("decode", 4)}
    # batched-bench results 10% slower on decode, 20% / 0% on the two prefill points
    bench = [{"pl": b, "pp": 64, "tg": 32, "t_pp": base[("prefill", b)] * (1.2 if b == 1 else 1.0),
              "t_tg": base[("decode", b)] * 1.1 * 32} for b in (1, 4)]
    sp = speed(measured_points(bench), base)
    assert sp["decode"] == pytest.approx(1.1) and sp["prefill"] == pytest.approx(math.sqrt(1.2))
    assert len(sp["points"]) == 4
    with pytest.raises(ValueError, match="decode"):
        speed({k: v for k, v in measured_points(bench).items() if k[0] == "prefill"}, base)


def test_drift_and_the_speed_at_replay():
    before, after = {"prefill": 1.00, "decode": 1.02}, {"prefill": 1.03, "decode": 0.99}
    d = drift(before, after)
    assert d["prefill"] == pytest.approx(3.0) and d["decode"] == pytest.approx(100 * (0.99 / 1.02 - 1))
    assert d["max_abs"] == pytest.approx(3.0)
    s = scale_at_replay(before, after)
    assert s["decode"] == pytest.approx(math.sqrt(1.02 * 0.99)) and s["prefill"] == pytest.approx(math.sqrt(1.03))


def test_a_scaled_profile_scales_every_step_cost(prof, tmp_path):
    meta, rows = read_engine_profile(prof)
    out = write_scaled_profile(prof, rows, meta, {"prefill": 1.25, "decode": 1.25}, tmp_path / "scaled")
    meta2, rows2 = read_engine_profile(out)
    assert meta2["probe_scale"] == {"prefill": 1.25, "decode": 1.25} and len(rows2) == len(rows)
    m = parse_method("f16")
    a, b = LlamaCppCostModel(meta, rows, m), LlamaCppCostModel(meta2, rows2, m)
    i = lambda *x: np.array(x, np.int64)  # noqa: E731
    for batch in (StepBatch(i(), i(), i(100, 300), i(60, 200)), StepBatch(i(120), i(0), i(50), i(20))):
        assert b.step_time(batch) == pytest.approx(1.25 * a.step_time(batch), rel=1e-6)
    # decode and prefill rows get their own factors
    out = write_scaled_profile(prof, rows, meta, {"prefill": 2.0, "decode": 1.0}, tmp_path / "pre")
    _m, rows3 = read_engine_profile(out)
    for r, r3 in zip(rows, rows3):
        f = 2.0 if r["stage"] == "prefill" else 1.0
        assert float(r3["time_s_median"]) == pytest.approx(f * float(r["time_s_median"]))


def _res(kv_thpt, e2e, ttft, sat=False, drift_pct=0.5, err=1.0, growth=None, sim=None):
    summ = lambda t, e, f: {"output_tokens_per_s": t, "e2e_s": {"mean": e, "p90": 1.5 * e},  # noqa: E731
                            "ttft_s": {"mean": f, "p90": 2 * f}, "saturated": sat, "queue_growth_s_per_s": growth}
    m = summ(kv_thpt, e2e, ttft)
    s = sim or summ(kv_thpt * (1 + err / 100), e2e * (1 + err / 100), ttft * (1 + err / 100))
    e = {"output_tokens_per_s": err, "e2e_s": {"mean": err, "p90": err}, "ttft_s": {"p90": err}}
    return {"measured": m, "simulated": s, "simulated_as_profiled": s, "error_pct": e,
            "probe": {"verifiable": drift_pct <= 2.0, "drift_pct": {"max_abs": drift_pct}, "scale": {"decode": 1.0}}}


def test_matrix_order_interleaves_kv_types_and_rounds():
    cs = sm.cells([0.35, 0.7], 2.0, rounds=1, closed_rounds=3)
    assert [c.name for c in cs] == ["closed", "poisson-0.35", "poisson-0.7", "gamma2-0.35", "gamma2-0.7"]
    assert sm.schedule(cs[0], ["f16", "q8_0"]) == [(0, "f16"), (0, "q8_0"), (1, "f16"), (1, "q8_0"),
                                                   (2, "f16"), (2, "q8_0")]
    assert cs[1].arrival == {"process": "poisson"} and cs[3].arrival == {"process": "gamma", "cv": 2.0}


def test_verdicts_count_only_cells_whose_probes_agree():
    assert sm.verdict(_res(100, 2.0, 0.5, err=3.0)) == "met"
    assert sm.verdict(_res(100, 2.0, 0.5, err=6.0)) == "missed"
    assert sm.verdict(_res(100, 2.0, 0.5, err=6.0, drift_pct=2.5)) == "unverifiable"
    assert sm.verdict(_res(100, 2.0, 0.5, err=1.0, drift_pct=2.5)) == "unverifiable"
    # saturated: the simulator must say so and match the queue growth within 25%
    sat_sim = {"saturated": True, "queue_growth_s_per_s": 0.45}
    assert sm.verdict(_res(100, 2.0, 0.5, sat=True, growth=0.4, sim=sat_sim)) == "met"
    assert sm.verdict(_res(100, 2.0, 0.5, sat=True, growth=0.3, sim=sat_sim)) == "missed"
    assert sm.verdict(_res(100, 2.0, 0.5, sat=True, growth=0.4, sim={**sat_sim, "saturated": False})) == "missed"


def test_ratios_pair_each_round_with_the_reference_round():
    # q8_0 measured at 0.9x f16's throughput both rounds while the host drifted 10% between rounds;
    # the simulation says 0.88x: a -2.2% ratio error whatever the drift
    f16 = [_res(100, 2.0, 0.5, err=0), _res(110, 1.8, 0.45, err=0)]
    sim = lambda t, e, f: {"output_tokens_per_s": t, "e2e_s": {"mean": e, "p90": 1.5 * e},  # noqa: E731
                           "ttft_s": {"mean": f, "p90": 2 * f}, "saturated": False, "queue_growth_s_per_s": None}
    q8 = [_res(90, 2.2, 0.55, sim=sim(88, 2.2, 0.55)), _res(99, 1.98, 0.495, sim=sim(88, 2.2, 0.55))]
    for r in f16:
        r["simulated_as_profiled"] = sim(100, 2.0, 0.5)
    (row,) = sm.ratios({"f16": f16, "q8_0": q8}, "f16")
    assert row["rounds"] == 2 and row["below_saturation"]
    th = row["figures"]["throughput"]
    assert th["measured"] == pytest.approx(0.9) and th["simulated"] == pytest.approx(0.88)
    assert th["error_pct"] == pytest.approx(100 * (0.88 / 0.9 - 1))
    assert row["figures"]["E2E mean"]["measured"] == pytest.approx(1.1)
    assert row["goal_met"] is True
    q8[1]["measured"]["saturated"] = True
    assert sm.ratios({"f16": f16, "q8_0": q8}, "f16")[0]["goal_met"] is None     # judged at saturation apart


def test_drift_floor_is_the_spread_of_repeated_replays():
    runs = [_res(100, 2.0, 0.5), _res(100, 2.2, 0.5), _res(100, 2.1, 0.5)]
    for r, tpot in zip(runs, (0.030, 0.033, 0.031)):
        r["measured"]["tpot_s"] = {"mean": tpot}
    d = sm.drift_floor(runs)
    assert d["replays"] == 3 and d["tpot_s_spread_pct"] == pytest.approx(10.0)
    assert d["e2e_s_spread_pct"] == pytest.approx(10.0) and d["probe_drift_pct"] == [0.5] * 3


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux core affinity")
def test_engine_and_load_generator_get_separate_cores():
    cores = allowed_cores()
    s = split(1)
    if len(cores) >= 2:
        assert s.engine == cores[:1] and s.client == cores[1:] and not set(s.engine) & set(s.client)
    assert split(len(cores)).engine == () and split(1, pin=False).client == ()
    before = os.sched_getaffinity(0)
    with pinned(cores[-1:]):
        assert os.sched_getaffinity(0) == set(cores[-1:])
    assert os.sched_getaffinity(0) == before


def test_server_overhead_is_one_for_all_kv_types(prof):
    """Sampling and streaming cost the same whatever the KV type: the probe rows of every KV
    type are pooled, each less its own bench model, and every KV type gets the same overhead."""
    from rkvsim.simulator.llamacpp_cost import _g_of
    meta, rows = read_engine_profile(prof)
    extra = []
    for kv in ("f16", "q8_0"):
        base = LlamaCppCostModel(meta, rows, parse_method(kv))
        for c in (1, 2, 4):
            bench = _g_of(base.knots, base.values, c) + base.k_dec * c * (128 + (9 + 96) / 2)
            t = bench + 0.002 + 0.001 * c
            extra.append({**rows[0], "method": kv, "stage": "server_decode", "batch_size": str(c),
                          "prompt_tokens": "128", "gen_tokens": "96", "time_s_median": repr(t)})
    a = LlamaCppCostModel(meta, rows + extra, parse_method("f16"))
    b = LlamaCppCostModel(meta, rows + extra, parse_method("q8_0"))
    assert a.server_step_s == pytest.approx(0.002, abs=1e-9) and a.server_seq_s == pytest.approx(0.001, abs=1e-9)
    assert (a.server_step_s, a.server_seq_s) == pytest.approx((b.server_step_s, b.server_seq_s))
    # one slow probe row of q8_0 moves both KV types a little, not q8_0 alone by all of it
    noisy = [dict(r) for r in extra]
    noisy[-1]["time_s_median"] = repr(float(noisy[-1]["time_s_median"]) + 0.012)
    a2 = LlamaCppCostModel(meta, rows + noisy, parse_method("f16"))
    b2 = LlamaCppCostModel(meta, rows + noisy, parse_method("q8_0"))
    assert (a2.server_step_s, a2.server_seq_s) == pytest.approx((b2.server_step_s, b2.server_seq_s))
    assert 0.001 < a2.server_seq_s < 0.001 + 0.012 / 4


def test_matrix_report_has_the_figures_and_the_tables(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_serving", Path(__file__).resolve().parents[1] / "bench" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    f16 = [_res(100, 2.0, 0.5, err=2.0), _res(100, 2.0, 0.5, err=3.0)]
    q8 = [_res(90, 2.2, 0.55, err=6.0, drift_pct=3.0), _res(90, 2.2, 0.55, err=1.0)]
    for r in f16 + q8:
        r["measured"]["tpot_s"] = {"mean": 0.03}
        r["loadavg_before"], r["requests"] = [0.5, 0.5, 0.5], 40
        r["measured"]["output_tokens_per_s"] = float(r["measured"]["output_tokens_per_s"])
        r["error_pct_as_profiled"] = r["error_pct"]
    summary = bench.summarize({"closed": {"f16": f16, "q8_0": q8}}, "f16", 0.8)
    assert [c["verdict"] for c in summary["cells"]] == ["met", "met", "unverifiable", "met"]
    assert summary["drift_floor"]["q8_0"]["replays"] == 2 and len(summary["ratios"]) == 2
    from rkvsim.validation.serving_matrix_report import write_report
    write_report(tmp_path / "m.html", summary)
    text = (tmp_path / "m.html").read_text()
    assert "Ratios" in text and "unverifiable" in text and text.count("<tr>") == 1 + 4 + 1 + 2


def test_engine_fit_puts_knots_only_where_rows_measure_them():
    """A 6-token tail of a 1,536-token prefill (510 x 3 + 6) is no knot: g(6) comes from its
    neighbours, and a noisy long row cannot lift g for every larger ubatch (g monotone in the fit)."""
    from rkvsim.simulator.llamacpp_cost import _fit, _g_of
    g = lambda t: 0.01 + 0.006 * t  # noqa: E731
    obs = [([(float(t), 0.0, 0.0)], g(t)) for t in (1, 2, 3, 4, 16, 32, 64, 128, 510)]
    obs.append(([(510.0, 0.0, 0.0)] * 3 + [(6.0, 0.0, 0.0)], (3 * g(510) + g(6)) * 1.05))   # 5% slow row
    knots, values, k_dec, k_pre = _fit(obs)
    assert 6.0 not in knots.tolist() and len(knots) == 9
    assert _g_of(knots, values, 10) == pytest.approx(g(10), rel=0.05)
    assert np.all(np.diff(values) >= 0) and k_dec >= 0 and k_pre >= 0
