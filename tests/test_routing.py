"""Mixed fleets and routers: schema, feasibility, the compression-aware and oracle routers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rkvsim.cli.main import rkvsim as rkvsim_main
from rkvsim.simulator.config import Scenario, ScenarioError, load_scenario
from rkvsim.simulator.simulation import build_workload, simulate_method
from rkvsim.simulator.fleet import LengthPredictions, plan_variants, predict_lengths
from rkvsim.simulator.simulation import simulate
from rkvsim.simulator.router import DecodeTable

ROOT = Path(__file__).resolve().parents[1]


def small_gpu_fleet(router: str, **over) -> dict:
    """LLaMA-2-7B on 24 GB GPUs at 64% utilization: an FP16 pool holds 2784 tokens, a KIVI-4 pool
    8944, so prompts of 2.5-3.5k tokens fit only the KIVI-4 replica."""
    d = {"name": "t", "model": "llama-2-7b", "hardware": "l4", "router": router,
         "methods": ["kivi-4"], "fleet": [{"method": "fp16", "replicas": 1}, {"replicas": 1}],
         "routing": {"length_predictor": "workload_mean"},
         "scheduler": {"max_batch_size": 16, "max_batched_tokens": 4096, "gpu_memory_utilization": 0.64},
         "workload": {"num_requests": 80, "arrival": {"process": "poisson", "rate": 1.0},
                      "prompt": {"dist": "uniform", "low": 100, "high": 3500},
                      "output": {"dist": "lognormal", "median": 64, "sigma": 0.5, "min": 8, "max": 200}}}
    d.update(over)
    return d


@pytest.mark.parametrize("router", ["compression_aware", "oracle", "least_kv", "round_robin", "least_outstanding"])
def test_router_never_picks_a_replica_that_cannot_hold_the_request(router):
    scn = Scenario.model_validate(small_gpu_fleet(router))
    wl = build_workload(scn, 0, ROOT)
    (v,) = plan_variants(scn)
    run = simulate(scn, v, wl)
    fp16_layout = run.replicas[0].layout
    assert run.replicas[0].layout.method.kind == "fp16" and run.replicas[1].layout.method.kind == "kivi"
    need = np.array([fp16_layout.blocks_for(int(p + o)) for p, o in zip(run.log.prompt, run.log.output)])
    too_big = need > fp16_layout.num_blocks
    assert too_big.sum() >= 10, "the workload must contain requests only the KIVI replica holds"
    assert not run.log.rejected.any()
    assert (run.log.replica[too_big] == 1).all(), "a request was sent to a replica that cannot hold it"
    assert (run.log.replica == 0).sum() > 0, "the FP16 replica should still serve the requests it holds"
    assert np.isfinite(run.log.finish).all()


def test_request_no_replica_holds_is_rejected_not_routed():
    d = small_gpu_fleet("compression_aware", fleet=[{"method": "fp16", "replicas": 2}], methods=["fp16"])
    d["workload"]["prompt"] = {"dist": "uniform", "low": 100, "high": 3500}
    scn = Scenario.model_validate(d)
    wl = build_workload(scn, 1, ROOT)
    run = simulate(scn, plan_variants(scn)[0], wl)
    lay = run.replicas[0].layout
    too_big = np.array([lay.blocks_for(int(p + o)) > lay.num_blocks for p, o in zip(wl.prompt, wl.output)])
    assert too_big.any()
    assert (run.log.rejected == too_big).all()
    assert (run.log.replica[too_big] == -1).all()


def test_homogeneous_fleet_matches_the_plain_engine():
    """A fleet of one configuration in two groups simulates as the same replicas in one group."""
    d = small_gpu_fleet("least_kv", hardware="a6000", methods=["kivi-4"], fleet=[{"replicas": 2}])
    d["scheduler"]["gpu_memory_utilization"] = 0.9
    scn = Scenario.model_validate(d)
    wl = build_workload(scn, 3, ROOT)
    v = plan_variants(scn)[0]
    fleet = simulate(scn, v, wl)
    plain = simulate_method(scn.model_copy(update={"replicas": 2}), v.method, wl)
    for col in ("arrival", "first_token", "finish", "replica"):
        np.testing.assert_array_equal(getattr(fleet.log, col), getattr(plain.log, col))


def _fake_replica(index: int, n_wait: int = 0, blocks_used: int = 0):
    from types import SimpleNamespace

    from rkvsim.simulator.replica import Replica
    lay = SimpleNamespace(blocks_for=lambda t: -(-t // 16), prefill_blocks=lambda t: -(-t // 16), num_blocks=1000)
    return SimpleNamespace(index=index, layout=lay, n_dec=0, waiting=list(range(n_wait)), prefilling=[],
                           cfg=SimpleNamespace(max_batch_size=64), log=SimpleNamespace(prompt=np.array([100, 100])),
                           D=np.zeros((6, 64), np.int64), CTX=Replica.CTX, RID=Replica.RID, GEN=Replica.GEN,
                           BLK=Replica.BLK, blocks_used=blocks_used, outstanding=n_wait, kv_fraction=blocks_used / 1000)


def _context(fits, prefill, length, decode_s):
    from rkvsim.simulator.router import RouteContext
    tables = [DecodeTable([0.0, 5.0], [0.0, 1e5], [[d, d], [d, d]]) for d in decode_s]
    return RouteContext(config_of=[0, 1], fits=np.array(fits), prefill_s=np.array(prefill), length=np.array(length),
                        mean_prefill_s=np.array(prefill).mean(axis=1), mean_blocks=np.array([7.0, 7.0]), decode=tables)


def test_compression_aware_uses_queue_prefill_and_length_over_decode_rate():
    from rkvsim.simulator.router import Router
    reps = [_fake_replica(0), _fake_replica(1)]
    # Replica 0: fast prefill (0.1 s), slow decode (20 ms/token); replica 1: slow prefill (1 s), fast
    # decode (5 ms/token). Request 0 answers in 10 tokens, request 1 in 1000.
    ctx = _context([[True, True], [True, True]], [[0.1, 0.1], [1.0, 1.0]], [[10.0, 1000.0], [10.0, 1000.0]],
                   [0.020, 0.005])
    r = Router(reps, "compression_aware", ctx)
    assert r.pick(0) is reps[0]          # short answer: 0.1 + 0.2 s beats 1.0 + 0.05 s
    assert r.pick(1) is reps[1]          # long answer: 1.0 + 5 s beats 0.1 + 20 s
    assert r.estimate_e2e(reps[1], 1) == pytest.approx(1.0 + 1000 * 0.005)
    # A queue on the fast-decoding replica: 10 prefills of 1 s each ahead of the long request.
    busy = [_fake_replica(0), _fake_replica(1, n_wait=10)]
    r = Router(busy, "compression_aware", ctx)
    assert r.estimate_e2e(busy[1], 1) == pytest.approx(10 * 1.0 + 1.0 + 1000 * 0.005)
    assert r.pick(1) is busy[1]          # 16 s still beats 20.1 s
    busy = [_fake_replica(0), _fake_replica(1, n_wait=20)]
    assert Router(busy, "compression_aware", ctx).pick(1) is busy[0]


def test_every_policy_skips_replicas_that_cannot_hold_and_returns_none_when_none_can():
    from rkvsim.simulator.router import Router
    reps = [_fake_replica(0), _fake_replica(1, n_wait=30, blocks_used=900)]
    # The idle replica 0 cannot hold request 1; nobody can hold request 0.
    ctx = _context([[False, False], [False, True]], [[0.1, 0.1], [0.1, 0.1]], [[10.0, 10.0], [10.0, 10.0]],
                   [0.01, 0.01])
    for policy in ("compression_aware", "oracle", "least_kv", "least_outstanding", "round_robin"):
        r = Router(reps, policy, ctx)
        assert r.pick(1) is reps[1], policy
        assert r.pick(0) is None, policy


def test_compression_aware_and_oracle_decide_every_request():
    scn = Scenario.model_validate(small_gpu_fleet("compression_aware", hardware="a6000",
                                                  scheduler={"max_batch_size": 64, "max_batched_tokens": 4096}))
    wl = build_workload(scn, 0, ROOT)
    v = plan_variants(scn)[0]
    const = simulate(scn, v, wl, predictions=LengthPredictions(np.full(len(wl.prompt), 64.0), "const"))
    oracle = simulate(scn, v.__class__(v.label, v.method, v.tp, "oracle", v.members), wl)
    assert const.route_decisions == len(wl.prompt) and oracle.route_decisions == len(wl.prompt)
    assert oracle.length_source == "true lengths (oracle)" and const.length_source == "const"
    for run in (const, oracle):
        assert set(np.unique(run.log.replica)) == {0, 1}
        assert np.isfinite(run.log.finish).all()


def test_decode_table_interpolates_between_grid_points():
    t = DecodeTable([0.0, float(np.log(4))], [100.0, 200.0], [[1.0, 2.0], [3.0, 4.0]])
    assert t(1, 100) == pytest.approx(1.0)
    assert t(4, 200) == pytest.approx(4.0)
    assert t(2, 150) == pytest.approx(2.5)        # log-midpoint in batch, midpoint in context
    assert t(1000, 10_000) == pytest.approx(4.0)  # clamped beyond the grid


def test_routing_paper_variants_and_labels():
    scn = load_scenario(ROOT / "scenarios" / "routing_paper.yaml")
    vs = plan_variants(scn)
    assert [v.label for v in vs[:3]] == ["kivi-4/baseline", "kivi-4/routed", "kivi-4/oracle"]
    assert len(vs) == 3 * len(scn.methods)
    base, routed, oracle = vs[:3]
    assert base.fleet_label == "4xkivi-4" and base.router == "least_kv"
    assert routed.fleet_label == "1xfp16+3xkivi-4" and routed.router == "compression_aware"
    assert oracle.router == "oracle" and base.gpus == routed.gpus == 4


def test_existing_scenarios_still_load_and_plan_as_before():
    for p in (ROOT / "scenarios").glob("*.yaml"):
        scn = load_scenario(p)
        if not (scn.fleet or scn.arms):
            assert [v.label for v in plan_variants(scn)] == [
                (m.label if len(scn.tp_list) == 1 else f"{m.label}@tp{tp}") for tp in scn.tp_list for m in scn.method_list]


@pytest.mark.parametrize("patch, field", [
    ({"fleet": [{"method": "kivi-3", "replicas": 1}]}, "kivi"),
    ({"fleet": [{"replicas": 0}]}, "fleet.0.replicas"),
    ({"fleet": [{"replicas": 1, "colour": "red"}]}, "fleet.0.colour"),
    ({"arms": [{"name": "a", "router": "fastest"}]}, "arms.0.router"),
    ({"arms": [{"name": "a"}, {"name": "a"}]}, "arms"),
    ({"router": "psychic"}, "router"),
])
def test_bad_fleet_or_router_names_the_field(tmp_path, patch, field):
    import yaml
    d = small_gpu_fleet("least_kv")
    d.update(patch)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        load_scenario(f)


def test_length_predictor_choices(tmp_path):
    scn = Scenario.model_validate(small_gpu_fleet("compression_aware"))
    wl = build_workload(scn, 0, ROOT)
    p = predict_lengths(scn, wl)
    assert p.source == "workload mean" and np.allclose(p.fp16, wl.output.mean())
    bad = Scenario.model_validate(small_gpu_fleet("compression_aware", routing={"length_predictor": str(tmp_path / "x.joblib")}))
    with pytest.raises(ValueError, match="routing.length_predictor"):
        predict_lengths(bad, wl)


def test_run_prints_baseline_routed_oracle(tmp_path, capsys):
    rc = rkvsim_main(["run", str(ROOT / "scenarios" / "routing_paper.yaml"), "--out", str(tmp_path / "o"),
                      "--set", "workload.num_requests=60", "--set", "methods=[kivi-4]",
                      "--set", "routing.length_predictor=workload_mean", "--set", "verbosity.data=null"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "baseline mean/p90" in out and "routed mean/p90" in out and "oracle mean/p90" in out
    import json
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert set(summary["methods"]) == {"kivi-4/baseline", "kivi-4/routed", "kivi-4/oracle"}
    assert summary["setups"]["kivi-4/routed"]["fleet"] == "1xfp16+3xkivi-4"
