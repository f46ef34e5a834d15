"""Calibrated step costs: fit recovers a known closed form, held-out error is held out,
compiled lookups reproduce the predictors, `rkvsim validate` matches an independent
computation, and `rkvsim run` picks an installed profile up."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")

from rkvsim.calibration.steps import fit as sf  # noqa: E402
from rkvsim.calibration.steps.compile import compile_costs  # noqa: E402
from rkvsim.calibration.steps.features import (DECODE_FEATURES, DENSE_FEATURES, DENSE_OPS,  # noqa: E402
                                              PER_LAYER_OPS, PREFILL_FEATURES, decode_work, dense_work,
                                              design, prefill_work)
from rkvsim.models import parse_method, resolve_hardware, resolve_model  # noqa: E402
from rkvsim.profiler.profile import load_profile  # noqa: E402
from rkvsim.profiler.schema import ATTENTION, OPERATORS, SCHEMA_VERSION  # noqa: E402

MODEL = resolve_model("llama-2-7b")
# Known closed forms: seconds = coefficients . [1, features...]
DENSE_COEF = np.array([4e-6, 2.5e-14, 1e-12, 1.6e-12])              # 1, flops, vflops, bytes
DECODE_COEF = {"fp16": np.array([3e-6, 2e-4, 1e-13, 1.5e-12, 0.0, 0.0]),   # 1, batch, flops, kv, raw, score
               "kivi-4": np.array([6e-6, 3e-4, 1e-13, 2.5e-12, 0.0, 1e-11])}
PREFILL_COEF = {"fp16": np.array([5e-6, 0.0, 3e-14, 1e-12, 0.0]),          # 1, tokens, flops, kv, score
                "kivi-4": np.array([8e-6, 1e-9, 3.5e-14, 1e-12, 0.0])}


def truth_dense(op, t):
    m = MODEL
    w = dense_work(op, np.asarray(t), m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads,
                   m.head_dim, m.vocab_size, 1, 2)
    return design(w, DENSE_FEATURES) @ DENSE_COEF


def truth_decode(method, b, c):
    w = decode_work(parse_method(method), np.asarray(b), np.asarray(c), MODEL.num_heads, MODEL.num_kv_heads,
                    MODEL.head_dim)
    return design(w, DECODE_FEATURES) @ DECODE_COEF[method]


def truth_prefill(method, n, p):
    w = prefill_work(parse_method(method), np.asarray(n), np.asarray(p), MODEL.num_heads, MODEL.num_kv_heads,
                     MODEL.head_dim)
    return design(w, PREFILL_FEATURES) @ PREFILL_COEF[method]


def _timing(t):
    t = np.asarray(t, float)
    return {"time_s_median": t, "time_s_p10": t, "time_s_p90": t, "time_s_mean": t, "time_s_std": 0.0,
            "time_s_min": t, "time_s_max": t, "repeats": 5}


def make_profile(folder: Path, hardware: str = "a6000") -> Path:
    m = MODEL
    folder.mkdir(parents=True, exist_ok=True)
    toks = np.unique(np.geomspace(1, 8192, 40).round().astype(int))
    ops = []
    for op in DENSE_OPS:
        ops.append(pd.DataFrame({"schema_version": SCHEMA_VERSION, "method": "all", "op": op, "num_tokens": toks,
                                 "tp": 1, "hidden": m.hidden_size, "intermediate": m.intermediate_size,
                                 "num_q_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                                 "vocab": m.vocab_size, "dtype": "float16", **_timing(truth_dense(op, toks)),
                                 "source": "synthetic"}))
    pd.concat(ops)[list(OPERATORS.columns)].to_csv(folder / "operators.csv", index=False)
    att = []
    bs, cs = np.array([1, 2, 4, 8, 16, 32, 64]), np.array([16, 64, 128, 256, 512, 1024, 2048, 4096])
    B, C = [x.ravel() for x in np.meshgrid(bs, cs)]
    ns, ps = np.array([8, 32, 128, 512, 1024, 2048, 4096]), np.array([0, 256, 1024])
    N, P = [x.ravel() for x in np.meshgrid(ns, ps)]
    for meth in ("fp16", "kivi-4"):
        kind = parse_method(meth).kind
        common = {"schema_version": SCHEMA_VERSION, "method": meth, "kind": kind, "tp": 1,
                  "num_q_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                  "dtype": "float16", "overhead_s_median": 0.0, "cache_tokens": np.nan, "cache_nbytes": np.nan,
                  "source": "synthetic"}
        att.append(pd.DataFrame({**common, "stage": "decode", "batch_size": B, "kv_len": C, "new_tokens": 1,
                                 **_timing(truth_decode(meth, B, C))}))
        att.append(pd.DataFrame({**common, "stage": "prefill", "batch_size": 1, "kv_len": P, "new_tokens": N,
                                 **_timing(truth_prefill(meth, N, P))}))
    pd.concat(att)[list(ATTENTION.columns)].to_csv(folder / "attention.csv", index=False)
    meta = {"schema_version": SCHEMA_VERSION, "hardware": hardware, "model": m.name, "status": "complete",
            "dtype": "float16", "finished": "2026-11-23T00:00:00Z", "source": "synthetic test tables"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    return make_profile(tmp_path_factory.mktemp("prof") / "a6000-synth")


@pytest.fixture(scope="module")
def fit(profile):
    f = sf.fit_profile(load_profile(profile), only=("physics",))
    sf.save_fit(f, sf.fit_folder(profile))
    return f


def test_fit_recovers_closed_form(fit):
    phys = sf.PhysicsRegressor(DENSE_FEATURES)
    t = np.unique(np.geomspace(1, 8192, 40).round())
    for op in ("attn_pre_proj", "mlp_up_proj", "sample"):
        w = dense_work(op, t, MODEL.hidden_size, MODEL.intermediate_size, MODEL.num_heads, MODEL.num_kv_heads,
                       MODEL.head_dim, MODEL.vocab_size, 1, 2)
        y = truth_dense(op, t)
        phys.fit(w, y)
        pred = phys.predict(w)
        assert np.max(np.abs(pred - y) / y) < 1e-6
        # The artifact's chosen predictor is exact too, and so is its held-out error.
        f = fit.get("dense", "all", op)
        assert f.heldout[f.chosen] < 1e-4
        assert np.max(np.abs(f.predict(w) - y) / y) < 1e-4
    for meth in ("fp16", "kivi-4"):
        f = fit.get("decode", meth, "attention")
        b, c = np.array([3, 48, 100]), np.array([100, 3000, 8000])    # off the profiled grid, and beyond it
        w = decode_work(parse_method(meth), b, c, MODEL.num_heads, MODEL.num_kv_heads, MODEL.head_dim)
        assert np.allclose(f.predict(w), truth_decode(meth, b, c), rtol=1e-3)


class _Memorizer:
    """Exact on rows it was fitted on, a constant elsewhere: exposes any leak of training rows."""

    def fit(self, work, y):
        self.seen = dict(zip(np.asarray(work["tokens"]).tolist(), y.tolist()))
        return self

    def predict(self, work):
        return np.array([self.seen.get(t, 1.0) for t in np.asarray(work["tokens"]).tolist()])


def test_heldout_error_uses_only_heldout_rows():
    t = np.arange(1, 101, dtype=float)
    y = np.full(100, 2.0)
    err, oof = sf.kfold_error(_Memorizer, {"tokens": t}, y, folds=5, seed=0)
    # Every row was predicted by a model that never saw it: the constant, never the memorised 2.0.
    assert np.all(oof == 1.0)
    assert err == pytest.approx(0.5)


def test_compiled_lookups_match_predictors(fit):
    m = parse_method("kivi-4")
    comp = compile_costs(fit, MODEL, m, 1, max_tokens=4096, max_batch=64, max_ctx=4096)
    L = MODEL.num_layers
    for t in (1, 7, 300, 4000):
        expect = truth_dense("emb", [t])[0] + sum(L * truth_dense(op, [t])[0] for op in PER_LAYER_OPS)
        assert comp.dense[t] == pytest.approx(expect, rel=2e-3)
        assert comp.head[t] == pytest.approx(truth_dense("lm_head", [t])[0] + truth_dense("sample", [t])[0], rel=2e-3)
    from rkvsim.simulator.calibrated import CalibratedCostModel, EngineTerms, StageTerms
    from rkvsim.simulator.cost_model import RooflineCostModel, StepBatch
    rl = RooflineCostModel(MODEL, resolve_hardware("a6000"), m, 1)
    zero = StageTerms(1.0, 1.0, 0.0, 0.0)
    cm = CalibratedCostModel(comp, rl, EngineTerms(zero, zero, "none"))
    b = StepBatch(np.zeros(0, np.int64), np.zeros(0, np.int64), np.full(24, 1500), np.full(24, 1500))
    expect = comp.dense[24] + comp.head[24] + L * truth_decode("kivi-4", [24], [1500])[0]
    assert cm.step_time(b) == pytest.approx(expect, rel=2e-3)
    assert cm.source == "profile:a6000@2026-11-23"


def test_validate_matches_independent_computation(profile, fit, tmp_path):
    L = MODEL.num_layers
    rows = [(meth, b, n, st) for meth in ("None-16", "KIVI-4") for st in ("prefill", "decoding")
            for b in (1, 2, 8) for n in (256, 1000, 3000)]
    ops_s, attn_s = [], []
    for meth, b, n, st in rows:
        mk = "fp16" if meth == "None-16" else "kivi-4"
        t = b * n if st == "prefill" else b
        dense = truth_dense("emb", [t])[0] + sum(L * truth_dense(op, [t])[0] for op in PER_LAYER_OPS)
        head = truth_dense("lm_head", [b])[0] + truth_dense("sample", [b])[0]
        att = L * (b * truth_prefill(mk, [n], [0])[0] if st == "prefill" else truth_decode(mk, [b], [n])[0])
        ops_s.append(dense + head + att)
        attn_s.append(att)
    ops_s, attn_s = np.array(ops_s), np.array(attn_s)
    # An engine whose attention runs 1.3x the profiled kernels, plus fixed and per-sequence costs.
    meas_s = ops_s + 0.3 * attn_s + 0.004 + 1e-4 * np.array([r[1] for r in rows])
    work = np.array([b * n if st == "prefill" else b for _, b, n, st in rows], float)
    df = pd.DataFrame(rows, columns=["method", "bsz", "prompt_len", "stage"])
    df.insert(0, "model", "meta-llama-Llama-2-7b-hf")
    df["thr"] = work / meas_s
    csv = tmp_path / "measured.csv"
    df.to_csv(csv, index=False)
    out = tmp_path / "val"
    r = subprocess.run([sys.executable, "-m", "rkvsim.cli", "validate", "--profile", str(profile),
                        "--measured", str(csv), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "validation.json").read_text())
    # Operators only: accuracy of ops-time throughput, computed here without rkvsim's code path.
    acc = 100 * (1 - np.abs(work / ops_s - df["thr"]) / df["thr"])
    for meth in ("None-16", "KIVI-4"):
        sel = (df["method"] == meth).to_numpy()
        assert doc["modes"]["operators"]["methods"][meth]["accuracy"] == pytest.approx(acc[sel].mean(), abs=0.1)
        # The engine's terms are the same for both methods, so leaving a method out still recovers them.
        assert doc["methods"][meth]["accuracy"] > 99.5
    assert doc["modes"]["operators"]["overall"] == pytest.approx(acc.mean(), abs=0.1)
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == len(rows) and (out / "parity.html").exists()
    assert set(doc["methods"]) == {"None-16", "KIVI-4"} and "5-fold over step shapes" in doc["primary"]
    assert doc["modes"]["engine_lomo"]["overall"] > 99.5
    terms = doc["engine_terms_all_rows"]
    assert terms["decode"]["attn_scale"] == pytest.approx(1.3, rel=5e-3)
    assert terms["prefill"]["fixed_s"] == pytest.approx(0.004, rel=2e-2)


def test_validate_bad_csv_is_one_line(profile, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("model,method,bsz\nx,None-16,1\n")
    r = subprocess.run([sys.executable, "-m", "rkvsim.cli", "validate", "--profile", str(profile),
                        "--measured", str(bad), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "missing column(s) prompt_len, stage, thr" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_run_uses_installed_profile(profile, fit, tmp_path):
    env = dict(os.environ, RKVSIM_PROFILES=str(tmp_path / "store"), RKVSIM_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "rkvsim.cli.rkvprof", "install", str(profile)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    scn = tmp_path / "s.yaml"
    scn.write_text("name: cal\nmodel: llama-2-13b\nhardware: a6000\nmethods: [fp16, kivi-4, h2o-512]\n"
                   "scheduler: {max_batch_size: 64, max_batched_tokens: 4096}\n"
                   "workload:\n  num_requests: 40\n  arrival: {process: poisson, rate: 2.0}\n"
                   "  prompt: {dist: fixed, value: 512}\n  output: {dist: fixed, value: 64}\n")
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "rkvsim.cli", "run", str(scn), "--out", str(out)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    # Under vllm-v1 the CPU time per step is the measured line (the profile has no engine terms).
    assert summary["cost_source"] == "profile:a6000@2026-11-23; cpu:measured(vidur a40 host, tp1)"
    notes = summary["methods"]["h2o-512"]["cost_notes"]
    assert any("applied to llama-2-13b" in n for n in notes)          # shape transfer, said
    assert any("h2o attention not profiled" in n for n in notes)      # borrowed FP16 attention, said
    # The same scenario with the prior forced says so.
    r = subprocess.run([sys.executable, "-m", "rkvsim.cli", "run", str(scn), "--out", str(tmp_path / "r2"),
                        "--set", "profile=roofline"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r2" / "summary.json").read_text())["cost_source"].startswith(
        "roofline-prior (uncalibrated); graphs:decode+piecewise cpu:measured(")


def test_profile_of_other_hardware_is_refused(profile, tmp_path):
    scn = tmp_path / "s.yaml"
    scn.write_text(f"name: x\nmodel: llama-2-7b\nhardware: a100-80g\nprofile: {profile}\nmethods: [fp16]\n"
                   "workload:\n  num_requests: 5\n  arrival: {process: poisson, rate: 2.0}\n"
                   "  prompt: {dist: fixed, value: 64}\n  output: {dist: fixed, value: 8}\n")
    r = subprocess.run([sys.executable, "-m", "rkvsim.cli", "run", str(scn), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "measured on 'a6000'" in r.stderr and not (tmp_path / "o").exists()
