"""Sweeps (axes, resume, backends, crossover) and capacity plans (SLOs, monotone answers)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rkvsim.planning.axes import Range, check_path, lhs_points, AxisError
from rkvsim.planning.crossover import find_crossovers
from rkvsim.planning.plan import plan
from rkvsim.planning.slo import SLOError, meets, parse_slos
from rkvsim.planning.spec import load_sweep
from rkvsim.planning.sweep import run_sweep
from rkvsim.cli.main import rkvsim as rkvsim_main
from rkvsim.simulator.config import ScenarioError

BASE = {"name": "small", "seed": 0, "model": "llama-2-7b", "hardware": "a6000", "methods": ["fp16", "kivi-4"],
        "scheduler": {"max_batch_size": 32, "max_batched_tokens": 4096},
        "workload": {"num_requests": 40, "arrival": {"process": "poisson", "rate": 2.0},
                     "prompt": {"dist": "uniform", "low": 200, "high": 1500},
                     "output": {"dist": "lognormal", "median": 64, "sigma": 0.5, "min": 8, "max": 256}}}


def write_sweep(tmp_path: Path, axes: dict, seeds=1, base=None, **extra) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base or BASE))
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump({"name": "t", "base": "base.yaml", "seeds": seeds, "axes": axes, **extra}))
    return f


# ---------------------------------------------------------------- axes
@pytest.mark.parametrize("path, named", [
    ("workload.arival.rate", "'arival'"),
    ("scheduler.max_batch_sizes", "'max_batch_sizes'"),
    ("seed.value", "'value'"),
    ("workload.prompt.mean", "'mean'"),
    ("hardwares", "'hardwares'"),
])
def test_axis_rejects_unknown_field_and_names_it(tmp_path, path, named):
    with pytest.raises(AxisError, match=named):
        check_path(path)
    f = write_sweep(tmp_path, {path: [1, 2]})
    with pytest.raises(ScenarioError, match=named):
        load_sweep(f)


def test_axis_accepts_fields_of_any_union_member():
    for p in ("workload.arrival.rate", "workload.arrival.cv", "workload.prompt.value", "workload.output.sigma",
              "scheduler.max_batch_size", "methods", "tp", "replicas", "hardware", "router", "fleet",
              "verbosity.data", "workload.lengths.max_prompt"):
        check_path(p)


def test_point_that_does_not_validate_names_point_and_field(tmp_path):
    f = write_sweep(tmp_path, {"scheduler.max_batch_size": [16, 0]})
    with pytest.raises(ScenarioError, match=r"point 1 .*scheduler\.max_batch_size"):
        load_sweep(f)


def test_cli_bad_axis_is_one_line_exit_2(tmp_path, capsys):
    f = write_sweep(tmp_path, {"workload.arival.rate": [1, 2]})
    assert rkvsim_main(["sweep", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "arival" in err
    assert not (tmp_path / "o").exists()


def test_lhs_uses_every_stratum_once():
    pts = lhs_points({"a": Range(0.0, 10.0), "b": Range(1.0, 100.0, log=True), "c": ["x", "y"]}, 10, seed=3)
    for axis, lo, hi, log in (("a", 0.0, 10.0, False), ("b", 1.0, 100.0, True)):
        v = np.array([p[axis] for p in pts])
        u = (np.log(v) - np.log(lo)) / (np.log(hi) - np.log(lo)) if log else (v - lo) / (hi - lo)
        assert sorted(np.floor(u * 10).astype(int)) == list(range(10))
    assert sorted(p["c"] for p in pts) == ["x"] * 5 + ["y"] * 5
    assert lhs_points({"a": Range(0.0, 10.0)}, 10, seed=3) != lhs_points({"a": Range(0.0, 10.0)}, 10, seed=4)


# ---------------------------------------------------------------- running, resuming, backends
def _keys(df) -> list[tuple]:
    return list(zip(df["point"], df["method"], df["seed"]))


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path):
    base = {**BASE, "workload": {**BASE["workload"], "num_requests": 150}}
    f = write_sweep(tmp_path, {"workload.arrival.rate": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}, base=base)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "rkvsim.cli", "sweep", str(f), "--out", str(out),
                             "--workers", "1"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    parts = out / "parts"
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("p*.parquet"))) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = sorted(p.name for p in parts.glob("p*.parquet"))
    assert 2 <= len(before) < 12, f"the kill should land mid-sweep, found {len(before)} finished parts"
    assert not (out / "rows.parquet").exists()
    sweep = load_sweep(f)
    res = run_sweep(sweep, out, workers=1)
    assert res.skipped == len(before) and res.ran == 12 - len(before)
    keys = _keys(res.rows)
    assert len(keys) == len(set(keys)) == 12 * 2
    assert set(keys) == {(i, m, 0) for i in range(12) for m in ("fp16", "kivi-4")}
    # The resumed table equals an uninterrupted run's.
    fresh = run_sweep(sweep, tmp_path / "fresh", workers=1)
    pd.testing.assert_frame_equal(res.rows, fresh.rows)
    # A second resume runs nothing.
    again = run_sweep(sweep, out, workers=1)
    assert again.ran == 0 and len(again.rows) == 24


def test_resume_refuses_a_folder_of_another_sweep(tmp_path):
    f = write_sweep(tmp_path, {"workload.arrival.rate": [1]})
    run_sweep(load_sweep(f), tmp_path / "o", workers=1)
    g = write_sweep(tmp_path, {"workload.arrival.rate": [2]})
    with pytest.raises(ScenarioError, match="another sweep"):
        run_sweep(load_sweep(g), tmp_path / "o", workers=1)


def test_local_and_ray_give_identical_rows(tmp_path):
    pytest.importorskip("ray")
    f = write_sweep(tmp_path, {"workload.arrival.rate": [1, 4], "scheduler.max_batch_size": [8, 32]}, seeds=2)
    sweep = load_sweep(f)
    local = run_sweep(sweep, tmp_path / "local", backend="local", workers=2)
    ray_ = run_sweep(sweep, tmp_path / "ray", backend="ray", workers=2)
    assert len(local.rows) == 4 * 2 * 2
    pd.testing.assert_frame_equal(local.rows, ray_.rows)
    assert (tmp_path / "ray" / "report.html").stat().st_size > 10_000


def test_rows_have_every_summary_metric_and_axis(tmp_path):
    f = write_sweep(tmp_path, {"workload.arrival.rate": [2]})
    df = run_sweep(load_sweep(f), tmp_path / "o", workers=1).rows
    for col in ("point", "seed", "method", "workload.arrival.rate", "e2e_s_p90", "ttft_s_p99", "tpot_s_mean",
                "output_tokens_per_s", "requests_rejected", "preemptions", "kv_peak_fraction", "gpus", "status"):
        assert col in df.columns, col
    assert (df["status"] == "ok").all() and df["workload.arrival.rate"].tolist() == [2.0, 2.0]


# ---------------------------------------------------------------- crossover
def test_crossover_found_and_interpolated():
    rows = []
    for x, fp16, kivi in ((1, 10.0, 12.0), (2, 10.0, 11.0), (4, 10.0, 8.0), (8, 10.0, 5.0)):
        for m, v in (("fp16", fp16), ("kivi-4", kivi)):
            rows.append({"status": "ok", "compress": m, "tp": 1, "arm": "", "rate": float(x), "e2e_s_p90": v})
    (c,) = find_crossovers(pd.DataFrame(rows), "rate", "e2e_s_p90", [])
    assert c.status == "crosses" and c.between == (2.0, 4.0)
    # advantage = 10/11 - 1 at 2 and 10/8 - 1 at 4: zero crossing by linear interpolation.
    a0, a1 = 10 / 11 - 1, 10 / 8 - 1
    assert c.x == pytest.approx(2 + 2 * (-a0) / (a1 - a0))
    # Throughput is higher-is-better: the same numbers read the other way never cross.
    df = pd.DataFrame(rows).rename(columns={"e2e_s_p90": "output_tokens_per_s"})
    (c,) = find_crossovers(df, "rate", "output_tokens_per_s", [])
    assert c.status == "never"


# ---------------------------------------------------------------- plan
def test_slo_parsing():
    s = parse_slos("ttft_p99<=2s, e2e_p90<=30s,tpot_p50<=80ms")
    assert [(x.column, x.limit_s) for x in s] == [("ttft_s_p99", 2.0), ("e2e_s_p90", 30.0), ("tpot_s_p50", 0.08)]
    for bad in ("ttft<=2s", "latency_p99<=2s", "ttft_p99>=2s", ""):
        with pytest.raises(SLOError):
            parse_slos(bad)
    row = {"status": "ok", "requests_rejected": 0, "ttft_s_p99": 1.0, "e2e_s_p90": 31.0, "tpot_s_p50": 0.01}
    assert not meets(row, s) and meets({**row, "e2e_s_p90": 29.0}, s)
    assert not meets({**row, "e2e_s_p90": 29.0, "requests_rejected": 1}, s)


def test_plan_answer_is_monotone_in_gpus(tmp_path):
    base = {**BASE, "methods": ["fp16", "kivi-4"],
            "workload": {**BASE["workload"], "num_requests": 60, "arrival": {"process": "poisson", "rate": 4.0}}}
    slos = parse_slos("e2e_p90<=6s")
    res = plan(base, str(tmp_path), 4.0, slos, [1, 2], 4, [0, 1], bisect_steps=2, max_doublings=1,
               full_curve=True, workers=1)
    for mp in res.methods:
        for tp in (1, 2):
            shares = [x["share"] for x in sorted(mp.curve, key=lambda x: x["replicas"]) if x["tp"] == tp]
            assert shares == sorted(shares), (mp.method, tp, shares)
        assert mp.answer is not None, mp.method
        g = mp.answer["gpus"]
        assert mp.answer["share"] == 1.0
        assert all(x["share"] < 1.0 for x in mp.curve if x["gpus"] < g)
        assert all(x is not None and x <= g for x in mp.per_seed_gpus)
        assert not mp.notes
    # The load is real: one GPU cannot meet the SLO for FP16 in every seed.
    assert res.methods[0].answer["gpus"] > 1
    mr = res.methods[0].max_rate
    assert mr["min"] >= 4.0 and len(mr["per_seed"]) == 2


def test_plan_rejects_closed_loop(tmp_path):
    base = {**BASE, "workload": {**BASE["workload"], "arrival": {"process": "closed_loop", "concurrency": 4}}}
    with pytest.raises(ScenarioError, match="workload.arrival"):
        plan(base, str(tmp_path), 1.0, parse_slos("e2e_p90<=5s"), [1], 2, [0], workers=1)


def test_negative_rate_from_shared_scores(shared_dir):
    from rkvsim.models import parse_method
    from rkvsim.planning.quality import negative_rate
    d = shared_dir / "data" / "rethink-kv" / "longbench_scores"
    k4, k2 = negative_rate(parse_method("kivi-4"), d), negative_rate(parse_method("kivi-2"), d)
    assert k4["prefix"].endswith("4bits_group32_residual128") and 0 < k4["rate"] < k2["rate"] < 1
    assert negative_rate(parse_method("snapkv-1024"), d) is None
    assert negative_rate(parse_method("h2o-512"), d)["prefix"].endswith("c512_w64_k7_maxpool")


def test_plan_cli_writes_table_json_and_report(tmp_path, capsys):
    import json
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**BASE, "workload": {**BASE["workload"], "num_requests": 30}}))
    out = tmp_path / "plan"
    rc = rkvsim_main(["plan", str(f), "--rate", "2", "--slo", "e2e_p90<=20s", "--max-gpus", "2", "--seeds", "2",
                      "--bisect-steps", "1", "--workers", "1", "--no-verbosity", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fewest GPUs" in printed and "kivi-4" in printed
    data = json.loads((out / "plan.json").read_text())
    assert set(data["methods"]) == {"fp16", "kivi-4"} and data["verbosity"].startswith("off")
    for m in data["methods"].values():
        assert m["answer"]["gpus"] >= 1 and len(m["per_seed_gpus"]) == 2
    assert (out / "report.html").stat().st_size > 10_000


def test_plan_cli_bad_slo_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(BASE))
    assert rkvsim_main(["plan", str(f), "--rate", "2", "--slo", "latency<=2s", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--slo" in err
    assert not (tmp_path / "p").exists()


def test_methods_axis_takes_one_method_per_point(tmp_path):
    f = write_sweep(tmp_path, {"methods": ["fp16", "kivi-4"]})
    sweep = load_sweep(f)
    assert [p.overrides["methods"] for p in sweep.points] == [["fp16"], ["kivi-4"]]
