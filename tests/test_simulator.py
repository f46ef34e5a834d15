"""Behaviour of the serving simulator: scheduling, memory, determinism, outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rkvsim.models import parse_method, resolve_hardware, resolve_model
from rkvsim.cli.main import rkvsim as main
from rkvsim.simulator.config import Scenario
from rkvsim.simulator.cost_model import StepBatch
from rkvsim.simulator.simulation import Workload, build_workload, make_cost_model, simulate_method


def scenario(**kw) -> Scenario:
    base = {
        "name": "t", "model": "llama-2-7b", "hardware": "a6000", "methods": ["fp16"],
        "workload": {"num_requests": 20, "arrival": {"process": "poisson", "rate": 5.0},
                     "prompt": {"dist": "uniform", "low": 100, "high": 800},
                     "output": {"dist": "uniform", "low": 1, "high": 120}},
    }
    for k, v in kw.items():
        base[k] = v
    return Scenario.model_validate(base)


def check_invariants(run, wl: Workload) -> None:
    log = run.log
    done = np.isfinite(log.finish)
    # every request finishes or is reported rejected, never both, never neither
    assert np.all(done ^ log.rejected)
    assert np.array_equal(log.generated[done], log.output[done])
    for rep in run.replicas:
        assert rep.blocks_used == 0 and rep.n_dec == 0 and not rep.prefilling and not rep.waiting
        pool = getattr(rep, "pool", None)
        if pool is not None:
            # No block leaked, no reference count left or negative, free queue = unreferenced blocks.
            pool.check()
            assert pool.used == 0 and pool.refs == 0 and not rep.held and not rep.counted
        kv = np.frombuffer(rep.steps.kv_fraction)
        assert np.all(kv <= 1.0 + 1e-12)
        t = np.frombuffer(rep.steps.t_end)
        assert np.all(np.diff(t) >= 0)
    # causality per request
    assert np.all(log.first_token[done] >= log.arrival[done])
    assert np.all(log.finish[done] >= log.first_token[done])


def test_light_load_e2e_is_sum_of_step_costs():
    """One request at a time: E2E = one prefill step + (output-1) decode steps, from the cost model."""
    scn = scenario(workload={"num_requests": 5, "arrival": {"process": "constant", "rate": 0.01},
                             "prompt": {"dist": "uniform", "low": 200, "high": 900},
                             "output": {"dist": "uniform", "low": 2, "high": 60}})
    wl = build_workload(scn, 0, ".")
    m = parse_method("fp16")
    run = simulate_method(scn, m, wl)
    cost = make_cost_model(scn, m, 1)
    e = np.array([]).astype(np.int64)
    for rid in range(5):
        p, o = int(wl.prompt[rid]), int(wl.output[rid])
        t = cost.step_time(StepBatch(np.array([p]), np.array([0]), e, e))
        for g in range(1, o):
            t += cost.step_time(StepBatch(e, e, np.array([p + g]), np.array([p])))
        assert run.log.finish[rid] - run.log.arrival[rid] == pytest.approx(t, rel=1e-9)
        assert run.log.first_token[rid] - run.log.arrival[rid] == pytest.approx(
            cost.step_time(StepBatch(np.array([p]), np.array([0]), e, e)), rel=1e-9)


@pytest.mark.parametrize("policy", ["vllm-v1", "vllm-v0"])
def test_kivi_serves_more_concurrent_requests_where_kv_binds(policy):
    scn = scenario(hardware="l4", methods=["fp16", "kivi-2"], scheduler={"policy": policy},
                   workload={"num_requests": 120, "arrival": {"process": "closed_loop", "concurrency": 120},
                             "prompt": {"dist": "fixed", "value": 1500},
                             "output": {"dist": "fixed", "value": 200}})
    wl = build_workload(scn, 0, ".")
    fp16 = simulate_method(scn, parse_method("fp16"), wl)
    kivi = simulate_method(scn, parse_method("kivi-2"), wl)
    peak = lambda r: max(max(rep.steps.batch) for rep in r.replicas)  # noqa: E731
    assert kivi.layout.num_blocks * kivi.layout.block_size > 2 * fp16.layout.num_blocks * fp16.layout.block_size
    assert peak(kivi) > peak(fp16)
    if policy == "vllm-v0":
        # The worst-case residual reserved per request keeps KIVI from over-admitting. Under v1 it
        # holds its actual bytes and admits up to the last block (no watermark), so its growing
        # residual windows preempt more: a real cost of packing tighter, not asserted away.
        assert fp16.log.preemptions.sum() >= kivi.log.preemptions.sum()


def test_eviction_caps_memory_per_request():
    scn = scenario(hardware="l4", methods=["fp16", "streamingllm-512"],
                   workload={"num_requests": 60, "arrival": {"process": "offline"},
                             "prompt": {"dist": "fixed", "value": 2000},
                             "output": {"dist": "fixed", "value": 50}})
    wl = build_workload(scn, 0, ".")
    runs = [simulate_method(scn, parse_method(m), wl) for m in ("fp16", "streamingllm-512")]
    # after prefill a StreamingLLM request holds 512 tokens, so more of them decode at once
    assert max(runs[1].replicas[0].steps.batch) > max(runs[0].replicas[0].steps.batch)


def test_request_that_can_never_fit_is_rejected_not_hung():
    scn = scenario(workload={"num_requests": 6, "arrival": {"process": "poisson", "rate": 1.0},
                             "prompt": {"dist": "fixed", "value": 4000},
                             "output": {"dist": "fixed", "value": 500}})
    wl = build_workload(scn, 0, ".")
    run = simulate_method(scn, parse_method("fp16"), wl)
    assert run.log.rejected.all()
    assert "context window" in run.log.reject_reason[0]


def test_preemption_under_memory_pressure_still_completes_everything():
    scn = scenario(hardware="l4", workload={"num_requests": 80, "arrival": {"process": "offline"},
                                            "prompt": {"dist": "uniform", "low": 500, "high": 1500},
                                            "output": {"dist": "uniform", "low": 200, "high": 900}})
    wl = build_workload(scn, 1, ".")
    run = simulate_method(scn, parse_method("fp16"), wl)
    assert run.log.preemptions.sum() > 0
    check_invariants(run, wl)


@pytest.mark.parametrize("router", ["round_robin", "least_outstanding", "least_kv"])
def test_routers_spread_load(router):
    scn = scenario(replicas=3, router=router)
    wl = build_workload(scn, 0, ".")
    run = simulate_method(scn, parse_method("kivi-4"), wl)
    check_invariants(run, wl)
    assert len(set(run.log.replica.tolist())) == 3


def test_tensor_parallel_adds_memory_and_comm():
    scn = scenario(model="llama-2-13b", tp=[1, 2])
    m = parse_method("fp16")
    wl = build_workload(scn, 0, ".")
    r1, r2 = (simulate_method(scn, m, wl, tp=t) for t in (1, 2))
    assert r2.layout.num_blocks > 2 * r1.layout.num_blocks  # half the weights and half the heads per rank
    c1, c2 = make_cost_model(scn, m, 1), make_cost_model(scn, m, 2)
    big = StepBatch(np.array([4096]), np.array([0]), np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert c2.step_time(big) < c1.step_time(big)


methods_st = st.lists(st.sampled_from(["fp16", "kivi-2", "kivi-4", "gear-4", "streamingllm-512", "h2o-512",
                                       "snapkv-1024"]), min_size=1, max_size=2, unique=True)
arrival_st = st.one_of(
    st.builds(lambda r: {"process": "poisson", "rate": r}, st.floats(0.5, 50)),
    st.builds(lambda r, cv: {"process": "gamma", "rate": r, "cv": cv}, st.floats(0.5, 50), st.floats(0.2, 4)),
    st.builds(lambda c: {"process": "closed_loop", "concurrency": c}, st.integers(1, 64)),
    st.just({"process": "offline"}),
)


structure_st = st.one_of(
    st.just({}),
    st.builds(lambda g, t: {"shared_prefix": {"groups": g, "tokens": t}}, st.integers(1, 4), st.integers(1, 1200)),
    st.builds(lambda n, th: {"sessions": {"turns": n, "think_time_s": th}}, st.integers(2, 4), st.floats(0, 3)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(methods=methods_st, arrival=arrival_st, hw=st.sampled_from(["l4", "a6000"]),
       policy=st.sampled_from(["vllm-v1", "vllm-v0", "lmdeploy"]), caching=st.booleans(),
       bs=st.integers(1, 64), chunked=st.booleans(), replicas=st.integers(1, 3),
       plo=st.integers(1, 1500), pspan=st.integers(0, 1500), omax=st.integers(1, 600), seed=st.integers(0, 99),
       structure=structure_st, block=st.sampled_from([16, 32]), threshold=st.sampled_from([0, 256]),
       whole=st.booleans())
def test_property_every_request_accounted_and_memory_safe(methods, arrival, hw, policy, caching, bs, chunked,
                                                          replicas, plo, pspan, omax, seed, structure, block,
                                                          threshold, whole):
    if "sessions" in structure and arrival["process"] in ("closed_loop", "offline"):
        structure = {}
    chunked = chunked and policy != "lmdeploy"
    sched = {"policy": policy, "max_batch_size": bs, "chunked_prefill": chunked, "block_size": block,
             "max_batched_tokens": 512 if chunked else 4096, "eviction_blocks": "whole" if whole else "compacted"}
    if policy == "vllm-v1":
        sched.update(enable_prefix_caching=caching, long_prefill_token_threshold=threshold)
    scn = scenario(methods=methods, hardware=hw, replicas=replicas, scheduler=sched,
                   workload={"num_requests": 30, "arrival": arrival, **structure,
                             "prompt": {"dist": "uniform", "low": plo, "high": plo + pspan},
                             "output": {"dist": "uniform", "low": 1, "high": omax}})
    wl = build_workload(scn, seed, ".")
    for m in scn.method_list:
        run = simulate_method(scn, m, wl)
        check_invariants(run, wl)


def test_same_seed_same_summary_and_bad_scenarios_exit_2(tmp_path):
    scn_file = tmp_path / "s.yaml"
    scn_file.write_text("""
name: det
model: llama-2-7b
hardware: a6000
methods: [fp16, kivi-4, h2o-512]
workload:
  num_requests: 40
  arrival: {process: gamma, rate: 4.0, cv: 2.0}
  prompt: {dist: uniform, low: 100, high: 2000}
  output: {dist: lognormal, median: 100, sigma: 0.8, max: 1000}
""")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", str(scn_file), "--out", str(a)]) == 0
    assert main(["run", str(scn_file), "--out", str(b)]) == 0
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa == sb
    assert set(sa["methods"]) == {"fp16", "kivi-4", "h2o-512"}
    for k in ("requests_completed", "requests_rejected", "output_tokens_per_s", "ttft_s", "tpot_s", "e2e_s",
              "preemptions", "kv_peak_fraction"):
        assert k in sa["methods"]["fp16"]
    assert set(sa["methods"]["fp16"]["ttft_s"]) == {"mean", "p50", "p90", "p99"}
    assert (a / "report.html").stat().st_size > 10_000
    assert (a / "requests.parquet").exists()
    c = tmp_path / "c"
    assert main(["run", str(scn_file), "--out", str(c), "--seed", "7"]) == 0
    assert json.loads((c / "summary.json").read_text())["methods"] != sa["methods"]

    bad_cases = {
        "unknown_key.yaml": scn_file.read_text().replace("name: det", "name: det\nbogus: 1"),
        "bad_yaml.yaml": "model: [llama\n",
        "bad_model.yaml": scn_file.read_text().replace("llama-2-7b", "gpt-9"),
        "bad_method.yaml": scn_file.read_text().replace("h2o-512", "zip-4"),
        "too_big.yaml": scn_file.read_text().replace("llama-2-7b", "llama-2-70b"),
    }
    for name, text in bad_cases.items():
        f = tmp_path / name
        f.write_text(text)
        out = tmp_path / f"out_{name}"
        assert main(["run", str(f), "--out", str(out)]) == 2, name
        assert not out.exists(), name


def test_bad_scenario_errors_are_one_line_and_name_the_field(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("model: llama-2-7b\nhardware: a6000\nworkload:\n  num_requests: 5\n"
                 "  arrival: {process: poisson, rate: -1}\n  prompt: {dist: fixed, value: 10}\n"
                 "  output: {dist: fixed, value: 10}\n")
    assert main(["run", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "workload.arrival" in err and "rate" in err


def test_verbosity_scenario_runs_on_the_shipped_generations(tmp_path, capsys):
    # verbosity.min_prompts keeps its default (30): the committed dataset must be big enough.
    path = Path(__file__).parents[1] / "scenarios" / "verbosity.yaml"
    assert main(["run", str(path), "--set", "workload.num_requests=40", "--set", "methods=[fp16,kivi-2]",
                 "--out", str(tmp_path / "v")]) == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert s["verbosity"].startswith("inflation model fitted on shipped")
    assert s["methods"]["kivi-2"]["mean_output_tokens"] != s["methods"]["fp16"]["mean_output_tokens"]


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).parents[1] / "scenarios").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_scenarios_validate_and_run(path):
    from rkvsim.simulator.config import load_scenario
    from rkvsim.simulator.fleet import variants
    scn = load_scenario(path, {"workload.num_requests": 25})
    wl = build_workload(scn, scn.seed, path.parent)
    for label, m, tp in variants(scn):
        run = simulate_method(scn, m, wl, tp=tp, label=label)
        check_invariants(run, wl)
        assert np.isfinite(run.log.finish).sum() > 0


class _Doubling:
    """A stand-in inflation model: every compressed answer twice as long."""
    def for_method(self, method):
        return None if method.kind == "fp16" else method.label

    def ratios(self, label, base_tokens):
        return np.full(len(base_tokens), 2.0)


def test_verbosity_lengthens_compressed_answers_and_e2e():
    scn = scenario(methods=["fp16", "kivi-4"])
    wl = build_workload(scn, 0, ".")
    base = simulate_method(scn, parse_method("kivi-4"), wl)
    verbose = simulate_method(scn, parse_method("kivi-4"), wl, inflation=_Doubling())
    fp16 = simulate_method(scn, parse_method("fp16"), wl, inflation=_Doubling())
    assert np.array_equal(verbose.log.output, np.minimum(2 * wl.output, 4096 - wl.prompt))
    assert np.array_equal(fp16.log.output, wl.output)
    e2e = lambda r: np.nanmean(r.log.finish - r.log.arrival)  # noqa: E731
    assert e2e(verbose) > 1.3 * e2e(base)
    check_invariants(verbose, wl)


def test_verbosity_from_the_shipped_dataset(tmp_path, capsys):
    from rkvsim.simulator.verbosity import shipped_dataset
    if not any(shipped_dataset().glob("part-*.jsonl")):
        pytest.skip("no generation rows shipped")
    f = tmp_path / "s.yaml"
    body = ("model: llama-2-7b\nhardware: a6000\nmethods: [fp16, kivi-4, h2o-512]\nworkload:\n  num_requests: 20\n"
            "  arrival: {process: poisson, rate: 2}\n  prompt: {dist: fixed, value: 100}\n"
            "  output: {dist: fixed, value: 50}\n")
    f.write_text(body + "verbosity: {data: shipped, min_prompts: 100000}\n")
    assert main(["run", str(f), "--out", str(tmp_path / "a")]) == 2
    assert "verbosity.min_prompts" in capsys.readouterr().err
    f.write_text(body + "verbosity: {data: shipped, min_prompts: 1}\n")
    assert main(["run", str(f), "--out", str(tmp_path / "b")]) == 0
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["verbosity"].startswith("inflation model fitted on shipped")
    assert s["methods"]["fp16"]["mean_output_tokens"] == 50
    # Every request's 50 tokens mapped by the model fitted on the shipped rows, same seed.
    from rkvsim.calibration.lengths.inflation import fit_inflation, load_dataset
    m = fit_inflation(load_dataset(shipped_dataset()), seed=0)
    for method in ("kivi-4", "h2o-512"):
        assert s["methods"][method]["mean_output_tokens"] == round(50 * m.expected_ratio(method, 50))
    out = capsys.readouterr().out
    assert "out len" in out


def test_partial_prefills_that_block_each_other_are_broken_up():
    """Two partly prefilled requests hold every block and neither can grow: the replica must
    preempt the newer one instead of sleeping forever."""
    import simpy

    from rkvsim.simulator.kv_memory import kv_layout
    from rkvsim.simulator.records import RequestLog
    from rkvsim.simulator.replica import Replica
    scn = scenario(hardware="l4", scheduler={"policy": "vllm-v0", "chunked_prefill": True, "max_batched_tokens": 512})
    m = parse_method("fp16")
    sc = scn.scheduler
    lay = kv_layout(resolve_model("llama-2-7b"), resolve_hardware("l4"), m, 1, sc.block_size,
                    sc.gpu_memory_utilization, sc.max_batched_tokens, sc.max_batch_size)
    half = lay.num_blocks // 2
    total = half * lay.block_size + 1000  # each needs more than half the pool to finish
    log = RequestLog(np.array([total, total]), np.array([5, 5]))
    rep = Replica(simpy.Environment(), 0, lay, make_cost_model(scn, m, 1), sc, log, lambda _r: None)
    rep.prefilling = [[0, half * lay.block_size, total, half, 1], [1, half * lay.block_size, total, half, 2]]
    rep.blocks_used = 2 * half
    chunks, dec, _n = rep._plan_v0()
    assert [e[0] for e, _ in chunks] == [0] and dec is None
    assert list(rep.waiting) == [1] and log.preemptions[1] == 1
    assert rep.blocks_used == half + lay.blocks_for(half * lay.block_size + chunks[0][1]) - half
