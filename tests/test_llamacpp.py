"""llama.cpp as ground truth: bench-output parsing (on captured real output), engine profile
rows, the server harness's pieces, and one small real end-to-end validate-serving run."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from rkvsim.profiler.engine_bench import BenchSettings, parse_jsonl, parse_output, parse_table, prefill_steps
from rkvsim.profiler.engine_collect import _rows

DATA = Path(__file__).resolve().parent / "data" / "llamacpp"


# ---- batched-bench output (captured from llama.cpp 0c1e570, the pinned build) -------------------
def test_parse_jsonl_output_of_a_real_run():
    text = (DATA / "batched_bench_jsonl.txt").read_text()
    rows = parse_jsonl(text)
    # -npp 64 -ntg 16 -npl 1,2,4: three results among the log lines
    assert [(r["pp"], r["tg"], r["pl"]) for r in rows] == [(64, 16, 1), (64, 16, 2), (64, 16, 4)]
    for r in rows:
        assert r["n_kv"] == r["pl"] * (r["pp"] + r["tg"])
        assert r["t_pp"] > 0 and r["t_tg"] > 0
        # the bench's own speed columns are consistent with its times
        assert r["speed_tg"] == pytest.approx(r["pl"] * r["tg"] / r["t_tg"], rel=1e-3)
    assert parse_output(text) == rows


def test_parse_markdown_table_of_a_real_run():
    text = (DATA / "batched_bench_md.txt").read_text()
    rows = parse_table(text)
    assert [(r["pp"], r["tg"], r["pl"]) for r in rows] == [(64, 16, 1), (64, 16, 2), (64, 16, 4)]
    for r in rows:
        assert r["speed_pp"] == pytest.approx(r["pl"] * r["pp"] / r["t_pp"], rel=2e-2)
    assert parse_output(text) == rows      # no JSON lines: falls back to the table
    assert parse_jsonl(text) == []


def test_bench_results_become_engine_rows():
    rows = parse_jsonl((DATA / "batched_bench_jsonl.txt").read_text())
    s = BenchSettings(n_batch=128)
    out = _rows("q8_0", 64, [rows, rows], s)
    assert len(out) == 2 * len(rows)
    dec = [r for r in out if r["stage"] == "decode"]
    pre = [r for r in out if r["stage"] == "prefill"]
    for r, src in zip(dec, rows):
        assert r["time_s_median"] == pytest.approx(src["t_tg"] / src["tg"]) and r["repeats"] == 2
    assert [r["steps"] for r in pre] == [prefill_steps(r["pl"], 64, 128) for r in rows] == [1, 1, 2]


def test_engine_build_refuses_clearly_without_cmake(monkeypatch):
    from rkvsim.profiler import engine_build
    from rkvsim.profiler.device import ProfilerError

    monkeypatch.setattr(engine_build.shutil, "which", lambda name: None)
    with pytest.raises(ProfilerError, match="cmake") as e:
        engine_build.build_engine(say=lambda s: None)
    assert "\n" not in str(e.value)


def test_engine_cache_folder_is_keyed_and_overridable(tmp_path, monkeypatch):
    from rkvsim.profiler import engine_build

    monkeypatch.setenv("RKVSIM_ENGINE_CACHE", str(tmp_path))
    key = engine_build.build_key()
    f = engine_build.build_folder(key)
    assert f.parent == tmp_path and f.name.startswith("llamacpp-0.3.36-")
    assert engine_build.build_folder({**key, "cmake_flags": key["cmake_flags"] + ["-DGGML_NATIVE=OFF"]}) != f
    assert engine_build.find_engine() is None


def test_server_command_carries_the_scenario_settings():
    from rkvsim.simulator.config import load_scenario
    from rkvsim.profiler.llamacpp_server import server_args

    sc = load_scenario("scenarios/llamacpp_q4_0.yaml").scheduler
    argv = server_args(Path("/x/llama-server"), Path("/m.gguf"), "q4_0", sc, 1234)
    pairs = dict(zip(argv[1::], argv[2::]))
    assert pairs["-np"] == str(sc.n_parallel) and pairs["-c"] == str(sc.ctx_size)
    assert pairs["-b"] == str(sc.n_batch) and pairs["-ub"] == str(sc.n_ubatch) and pairs["-t"] == str(sc.threads)
    assert pairs["-ctk"] == pairs["-ctv"] == "q4_0" and pairs["--host"] == "127.0.0.1"
    assert "--no-kv-unified" in argv


def test_compare_errors_and_saturation_from_known_columns():
    from rkvsim.validation.serving_compare import error_pct, summarize_columns

    arr = np.arange(20, dtype=float)
    # wait grows by 0.5 s per s of arrival: a growing queue
    wait = 0.5 * arr
    first = arr + wait + 0.1
    fin = first + 1.0
    out = np.full(20, 11)
    m = summarize_columns(arr, first, fin, out, wait, open_loop=True)
    assert m["saturated"] and m["queue_growth_s_per_s"] == pytest.approx(0.5)
    assert m["tpot_s"]["mean"] == pytest.approx(0.1)
    s = summarize_columns(arr, first, fin + 0.1, out, wait, open_loop=True)
    e = error_pct(m, s)
    assert e["e2e_s"]["mean"] == pytest.approx(100 * 0.1 / m["e2e_s"]["mean"])
    assert e["ttft_s"]["p90"] == pytest.approx(0.0)


# ---- one real run: build (or reuse) the engine, profile it, replay a few dozen requests ------
def _need_engine_prereqs():
    missing = [t for t in ("cmake",) if shutil.which(t) is None]
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        missing.append("a C++ compiler")
    if missing:
        msg = f"building llama.cpp needs {', '.join(missing)}"
        if os.environ.get("RKVSIM_REQUIRE_SHARED") == "1":    # CI: must not skip silently
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        from rkvsim.models.weights import gguf_path
        gguf_path()
    except ImportError as e:
        pytest.skip(str(e))


def test_real_llama_server_end_to_end(tmp_path):
    _need_engine_prereqs()
    import yaml

    from rkvsim.profiler.engine_build import build_engine
    from rkvsim.profiler.engine_collect import ENGINE_GRIDS, EngineCollectConfig, collect_engine
    from rkvsim.cli.main import rkvsim as main

    eng = build_engine(say=print)      # minutes on a fresh machine, then cached
    prof = tmp_path / "profile"
    collect_engine(EngineCollectConfig(model="smollm2-135m", kv_types=["f16"], grid=ENGINE_GRIDS["tiny"],
                                       out=prof, engine=eng), say=print)
    scn = yaml.safe_load(Path("scenarios/llamacpp_f16.yaml").read_text())
    scn["profile"] = str(prof)
    scn["workload"] = {"num_requests": 24, "arrival": {"process": "poisson", "rate": 4.0},
                       "prompt": {"dist": "uniform", "low": 8, "high": 96},
                       "output": {"dist": "uniform", "low": 2, "high": 24}}
    path = tmp_path / "scn.yaml"
    path.write_text(yaml.safe_dump(scn))
    out = tmp_path / "out"
    assert main(["validate-serving", str(path), "--out", str(out), "--timeout-s", "300"]) == 0
    res = json.loads((out / "validation_serving.json").read_text())
    assert res["requests"] == 24 and res["measured"]["requests_completed"] == 24
    assert res["measured"]["requests_failed"] == 0 and res["simulated"]["requests_completed"] == 24
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        for st in ("mean", "p50", "p90", "p99"):
            assert res["measured"][key][st] > 0 and res["simulated"][key][st] > 0
            assert res["error_pct"][key][st] is not None
    assert res["cost_source"].startswith("profile:cpu@")
    # probes bracket the replay; the simulation ran on the profile scaled to their speed
    p = res["probe"]
    assert p["plan"]["prompt_tokens"] == 64 and p["plan"]["batches"] == [1, 2]
    for when in ("before", "after"):
        assert p[when]["decode"] > 0 and p[when]["prefill"] > 0 and len(p[when]["points"]) == 4
    assert p["verifiable"] == (p["drift_pct"]["max_abs"] <= 2.0)
    scaled = json.loads((out / "engine_profile_at_replay" / "meta.json").read_text())
    assert scaled["probe_scale"] == p["scale"] and res["error_pct_as_profiled"]["e2e_s"]["mean"] is not None
    if len(os.sched_getaffinity(0)) >= 2:     # the server had its own core, the client the rest
        assert res["cpu_affinity"]["engine_cpus"] == [min(os.sched_getaffinity(0))]
    assert (out / "validation_serving.html").stat().st_size > 10_000
    # every request measured: one CSV line each, all tokens received
    lines = (out / "requests_measured.csv").read_text().strip().splitlines()[1:]
    assert len(lines) == 24 and all(line.endswith(",") for line in lines)   # empty error column
    # the server is gone: its process has exited and nobody listens on its port any more
    srv = res["server_process"]
    assert not Path(f"/proc/{srv['pid']}").exists()
    import socket
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv["port"]), timeout=2).close()
    # every token's arrival time is kept, and the server's iterations can be rebuilt from them
    from rkvsim.validation.serving_steps import compare, iterations, read_run
    from rkvsim.simulator.llamacpp_cost import LlamaCppCostModel, read_engine_profile
    from rkvsim.models import parse_method
    reqs, toks = read_run(out)
    assert sum(len(v) for v in toks.values()) == sum(int(r["output_tokens"]) for r in reqs)
    from rkvsim.validation.serving_steps import slots_from_log
    slots = slots_from_log(out / "server.log", reqs, skip=res["warm_up_requests"])
    assert len(slots) == 24 and set(slots.values()) <= {0, 1, 2, 3}
    its = iterations(reqs, toks, slots=slots)
    assert len(its) >= max(int(r["output_tokens"]) for r in reqs)
    assert sum(len(i.prefill) for i in its) == 24          # every prompt starts exactly one iteration
    rows = compare(its, LlamaCppCostModel(*read_engine_profile(prof), parse_method("f16")))
    assert sum(r["iterations"] for r in rows) == len(its) and all(r["model_s"] > 0 for r in rows)


def test_engine_collection_repeats_in_rounds_and_resumes_after_a_kill(tmp_path, monkeypatch):
    """Repeats run round by round over every invocation; a run killed mid-round keeps the
    repeats it finished and the next run does only the rest (no real engine: the bench is faked)."""
    from rkvsim.profiler import engine_collect as ec
    from rkvsim.profiler.engine_build import EngineBuild

    calls: list[tuple[str, int]] = []

    def fake_bench(cmd, timeout_s=900, cores=()):
        kv, pp = cmd[cmd.index("-ctk") + 1], int(cmd[cmd.index("-npp") + 1])
        if len(calls) == budget[0]:
            raise KeyboardInterrupt          # the "kill"
        calls.append((kv, pp))
        pls = [int(x) for x in cmd[cmd.index("-npl") + 1].split(",")]
        return [{"pp": pp, "tg": 8, "pl": pl, "t_pp": 0.01 * pl * pp * (1 + 0.01 * len(calls)),
                 "t_tg": 0.08 * pl} for pl in pls], ""

    monkeypatch.setattr(ec, "run_bench", fake_bench)
    monkeypatch.setattr(ec, "_probe_server", lambda *a, **k: None)
    eng = EngineBuild(tmp_path / "eng", {"version": "0.3.36", "llamacpp_commit": "0c1e570"})
    grid = ec.EngineGrid("t", (16, 64), (8,), (1, 2), 3, probe_batches=(1,))
    cfg = ec.EngineCollectConfig(model="smollm2-135m", kv_types=["f16"], grid=grid, out=tmp_path / "p", engine=eng,
                                 progress=False)
    budget = [3]
    with pytest.raises(KeyboardInterrupt):
        ec.collect_engine(cfg, say=lambda *_: None)
    # rounds: (16, 64) then (16, 64) again ... the kill came in round 2
    assert calls == [("f16", 16), ("f16", 64), ("f16", 16)]
    assert len(list((tmp_path / "p" / ec.PARTIAL_DIR).glob("*.json"))) == 3
    budget[0] = 10**6
    meta = ec.collect_engine(cfg, say=lambda *_: None)
    assert calls[3:] == [("f16", 64), ("f16", 16), ("f16", 64)]       # only the missing repeats
    assert meta["status"] == "complete" and not (tmp_path / "p" / ec.PARTIAL_DIR).exists()
    import csv
    with open(tmp_path / "p" / "engine_steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 and {r["repeats"] for r in rows} == {"3"}      # (pp, pl, stage)


def test_build_leaves_out_amx_where_the_cpu_reports_it():
    """ggml's AMX kernels crash where the VM never granted AMX tile state: such CPUs build with
    every other instruction set named instead of -march=native; other CPUs keep their build key."""
    from rkvsim.profiler.engine_build import isa_flags
    assert isa_flags({"avx2", "fma", "f16c", "avx512f"}) == ()
    flags = isa_flags({"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"})
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AMX_INT8=OFF" in flags and "-DGGML_AMX_TILE=OFF" in flags
    assert "-DGGML_AVX512=ON" in flags and "-DGGML_AVX512_VNNI=ON" in flags and "-DGGML_AVX512_BF16=OFF" in flags
