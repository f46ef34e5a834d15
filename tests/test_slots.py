"""The llama.cpp slot scheduler (simulator/slots.py), its scenario schema, the engine cost
model fitted from an engine profile (simulator/llamacpp_cost.py) and llama.cpp's KV bytes."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from rkvsim.models import kv_bytes, kv_bytes_per_token, parse_method, resolve_model
from rkvsim.profiler.schema import ENGINE_STEPS, SCHEMA_VERSION
from rkvsim.simulator.config import Scenario, ScenarioError, load_scenario
from rkvsim.simulator.cost_model import StepBatch
from rkvsim.simulator.simulation import build_workload, simulate_method
from rkvsim.simulator.llamacpp_cost import LlamaCppCostModel, read_engine_profile

E = np.zeros(0, np.int64)


# ---- a synthetic engine profile from a known cost law --------------------------------------
def true_cost(tokens: float, a_dec: float, a_pre: float) -> float:
    # dense part: weight-read floor then linear in tokens; attention linear in keys attended
    return 0.004 + 0.0012 * tokens + 2e-7 * a_dec + 5e-9 * a_pre


def bench_prefill_cost(pl: int, pp: int, n_batch: int, n_ubatch: int, streams: int) -> float:
    """The bench's prefill of pl prompts of pp tokens under true_cost, cut as llama.cpp cuts it:
    n_batch-token calls, then (one KV stream per sequence) equal shares of n_ubatch per ubatch."""
    from rkvsim.simulator.ubatch import split, split_simple
    done, total = {j: 0 for j in range(pl)}, 0.0
    for view in split_simple([(j, pp) for j in range(pl)], n_batch):
        for u in split(view, n_ubatch, streams):
            a = sum(n * done[s] + n * (n + 1) / 2 for s, n in u)
            for s, n in u:
                done[s] += n
            total += true_cost(sum(n for _, n in u), 0, a)
    return total


def write_profile(folder, kv_types=("f16", "q8_0"), pps=(64, 256, 1024), pls=(1, 2, 4, 8), tg=32, n_batch=2048):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for kv in kv_types:
        scale = 1.0 if kv == "f16" else 1.1
        for pp in pps:
            for pl in pls:
                steps = max(1, -(-pl * pp // n_batch))
                t_pre = bench_prefill_cost(pl, pp, n_batch, 512, max(pls)) * scale
                t_dec = true_cost(pl, pl * (pp + (tg + 1) / 2), 0) * scale
                for stage, t, st in (("prefill", t_pre, steps), ("decode", t_dec, tg)):
                    rows.append({"schema_version": SCHEMA_VERSION, "engine": "llamacpp", "method": kv, "stage": stage,
                                 "batch_size": pl, "prompt_tokens": pp, "gen_tokens": tg, "steps": st,
                                 "n_batch": n_batch, "n_ubatch": 512, "threads": 2, "time_s_median": t,
                                 "time_s_p10": t, "time_s_p90": t, "time_s_mean": t, "time_s_std": 0.0,
                                 "time_s_min": t, "time_s_max": t, "repeats": 1, "source": "synthetic"})
    with open(folder / "engine_steps.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ENGINE_STEPS.columns)
        w.writeheader()
        w.writerows(rows)
    meta = {"source": "rkvprof-engine", "schema_version": SCHEMA_VERSION, "status": "complete", "hardware": "cpu",
            "finished": "2026-11-23T00:00:00+00:00", "llamacpp_commit": "0c1e57098bba", "threads": 2,
            "cpu": "test cpu", "kv_types": list(kv_types)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return write_profile(tmp_path_factory.mktemp("engine-profile"))


def slots_scenario(profile, **kw) -> Scenario:
    sched = {"kind": "slots", "n_parallel": 4, "ctx_size": 8192, "n_batch": 512, "n_ubatch": 512}
    sched.update(kw.pop("scheduler", {}))
    base = {"name": "s", "model": "smollm2-135m", "hardware": "cpu", "methods": ["f16"], "profile": str(profile),
            "scheduler": sched,
            "workload": {"num_requests": 40, "arrival": {"process": "poisson", "rate": 20.0},
                         "prompt": {"dist": "uniform", "low": 10, "high": 900},
                         "output": {"dist": "uniform", "low": 1, "high": 80}}}
    base.update(kw)
    return Scenario.model_validate(base)


class Recorder:
    """Wraps a cost model and keeps every batch it was asked about."""

    def __init__(self, inner):
        self.inner, self.source, self.batches = inner, inner.source, []

    def step_time(self, b: StepBatch) -> float:
        self.batches.append(b)
        return self.inner.step_time(b)

    def breakdown(self, b):
        return self.inner.breakdown(b)


def run(scn, method="f16", record=False):
    wl = build_workload(scn, scn.seed, ".")
    from rkvsim.simulator.simulation import make_cost_model
    m = parse_method(method)
    cost = make_cost_model(scn, m, 1)
    rec = Recorder(cost) if record else None
    return simulate_method(scn, m, wl, cost=rec or cost), wl, rec


# ---- the slot scheduler ---------------------------------------------------------------------
def test_never_more_active_sequences_than_slots_and_all_finish(profile):
    r, wl, rec = run(slots_scenario(profile), record=True)
    rep = r.replicas[0]
    assert rep.max_active == 4                      # overloaded: every slot was used ...
    for b in rec.batches:                           # ... and never more
        assert len(b.decode_ctx) + len(b.prefill_new) <= 4
    log = r.log
    assert np.isfinite(log.finish).all() and not log.rejected.any()
    assert np.array_equal(log.generated, log.output)
    assert rep.active == 0 and rep.cells_used == 0 and rep.cells_reserved == 0 and not rep.waiting


def test_step_composition_decodes_first_then_prompt_chunks_up_to_n_batch(profile):
    scn = slots_scenario(profile, scheduler={"n_batch": 256, "n_ubatch": 256})
    r, wl, rec = run(scn, record=True)
    chunked = 0
    for b in rec.batches:
        total = len(b.decode_ctx) + int(b.prefill_new.sum())
        assert total <= 256
        if len(b.prefill_new):
            # A prompt is cut only where the batch is full.
            if not b.prefill_done.all():
                chunked += 1
                assert total == 256
    assert chunked > 0                              # prompts up to 900 tokens needed chunking
    # Time is the cost model's: the run's steps sum to the replica's busy time.
    assert np.isclose(sum(rec.inner.step_time(b) for b in rec.batches), sum(r.replicas[0].steps.dt))


def test_queue_is_fifo(profile):
    scn = slots_scenario(profile, workload={"num_requests": 30, "arrival": {"process": "offline"},
                                            "prompt": {"dist": "uniform", "low": 10, "high": 300},
                                            "output": {"dist": "uniform", "low": 1, "high": 60}})
    r, wl, _ = run(scn)
    sched = r.log.first_sched
    assert np.all(np.diff(sched) >= 0), "a later request got a slot before an earlier one"
    assert np.all(sched[:4] == 0) and np.all(sched[4:] > 0)


def test_request_that_cannot_fit_its_slot_is_rejected_and_reported(profile):
    # ctx 2048 over 4 slots: 512 tokens per slot.
    scn = slots_scenario(profile, scheduler={"ctx_size": 2048},
                         workload={"num_requests": 30, "arrival": {"process": "poisson", "rate": 5.0},
                                   "prompt": {"dist": "uniform", "low": 100, "high": 700},
                                   "output": {"dist": "fixed", "value": 20}})
    r, wl, _ = run(scn)
    log = r.log
    too_long = (wl.prompt + wl.output) > 512
    assert too_long.any() and (~too_long).any()
    assert np.array_equal(log.rejected, too_long)
    assert all("512-token context" in log.reject_reason[i] for i in np.flatnonzero(too_long))
    assert np.isfinite(log.finish[~too_long]).all()


def test_unified_kv_waits_for_cells_instead_of_overfilling(profile):
    scn = slots_scenario(profile, scheduler={"ctx_size": 1200, "kv_unified": True},
                         workload={"num_requests": 20, "arrival": {"process": "offline"},
                                   "prompt": {"dist": "fixed", "value": 300},
                                   "output": {"dist": "fixed", "value": 100}})
    r, wl, _ = run(scn)
    rep = r.replicas[0]
    assert rep.max_active == 3                      # 3 x 400 cells fit in 1200, a 4th does not
    assert np.isfinite(r.log.finish).all()


def test_single_request_latency_is_sum_of_engine_steps(profile):
    scn = slots_scenario(profile, workload={"num_requests": 1, "arrival": {"process": "offline"},
                                            "prompt": {"dist": "fixed", "value": 700},
                                            "output": {"dist": "fixed", "value": 5}})
    r, wl, _ = run(scn)
    cost = LlamaCppCostModel(*read_engine_profile(profile), parse_method("f16"))
    # n_batch 512: the prompt takes two steps (512 + 188), then 4 decode steps.
    t = cost.step_time(StepBatch(np.array([512]), np.array([0]), E, E, np.array([False])))
    t += cost.step_time(StepBatch(np.array([188]), np.array([512]), E, E, np.array([True])))
    ttft = t
    for g in range(1, 5):
        t += cost.step_time(StepBatch(E, E, np.array([700 + g]), np.array([700])))
    assert np.isclose(r.log.first_token[0], ttft) and np.isclose(r.log.finish[0], t)


def test_same_seed_same_numbers(profile):
    a, _, _ = run(slots_scenario(profile, seed=3))
    b, _, _ = run(slots_scenario(profile, seed=3))
    assert np.array_equal(a.log.finish, b.log.finish) and np.array_equal(a.log.first_token, b.log.first_token)


def test_closed_loop_keeps_concurrency(profile):
    scn = slots_scenario(profile, workload={"num_requests": 25, "arrival": {"process": "closed_loop", "concurrency": 3},
                                            "prompt": {"dist": "fixed", "value": 50},
                                            "output": {"dist": "fixed", "value": 10}})
    r, _, _ = run(scn)
    assert r.replicas[0].max_active == 3 and np.isfinite(r.log.finish).all()


# ---- scenario schema ---------------------------------------------------------------------------
def test_shipped_llamacpp_scenarios_load_and_old_ones_stay_paged():
    for kv in ("f16", "q8_0", "q4_0"):
        s = load_scenario(f"scenarios/llamacpp_{kv}.yaml")
        assert s.scheduler.kind == "slots" and s.method_list[0].kind == kv
    assert load_scenario("scenarios/heavy_kv.yaml").scheduler.kind == "paged"


@pytest.mark.parametrize("change, field", [
    ({"methods": ["fp16"]}, "methods"),
    ({"scheduler": {"kind": "slots", "n_parallel": 4, "ctx_size": 32}}, "ctx_size"),
    ({"scheduler": {"kind": "slots", "n_batch": 64, "n_ubatch": 128}}, "n_ubatch"),
    ({"scheduler": {"kind": "slots", "slots": 4}}, "slots"),
])
def test_bad_slots_scenarios_name_the_field(tmp_path, change, field):
    import yaml
    base = {"name": "s", "model": "smollm2-135m", "hardware": "cpu", "methods": ["q8_0"],
            "scheduler": {"kind": "slots"},
            "workload": {"num_requests": 5, "arrival": {"process": "poisson", "rate": 1.0},
                         "prompt": {"dist": "fixed", "value": 10}, "output": {"dist": "fixed", "value": 10}}}
    base.update(change)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(ScenarioError, match=field) as e:
        load_scenario(p)
    assert "\n" not in str(e.value)


def test_missing_engine_profile_is_one_clear_error(tmp_path, capsys):
    from rkvsim.cli.main import rkvsim as main
    import yaml
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "s", "model": "smollm2-135m", "hardware": "cpu", "methods": ["q8_0"],
                                 "profile": str(tmp_path / "nowhere"), "scheduler": {"kind": "slots"},
                                 "workload": {"num_requests": 5, "arrival": {"process": "poisson", "rate": 1.0},
                                              "prompt": {"dist": "fixed", "value": 10},
                                              "output": {"dist": "fixed", "value": 10}}}))
    # One line naming the field and the fix, exit 2, nothing written (was a traceback before the
    # run pipeline caught it).
    assert main(["run", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "profile:" in err and "rkvprof collect --engine llamacpp" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ---- engine cost model -------------------------------------------------------------------------
def test_llamacpp_cost_model_recovers_the_measured_law_and_interpolates_linearly(profile):
    meta, rows = read_engine_profile(profile)
    cm = LlamaCppCostModel(meta, rows, parse_method("f16"))
    assert cm.fit_error["max_abs_rel"] < 1e-6
    assert cm.source.startswith("profile:cpu@2026-11-23") and "llama.cpp" in cm.source
    # Mixed steps the bench never ran: decodes in slots 0..n_dec-1 + a chunk on a past in the
    # next slot. llama.cpp computes one token of every sequence together, then the rest of the
    # chunk alone, n_ubatch (512) tokens at a time.
    for n_dec, chunk, past in ((3, 100, 0), (5, 37, 400), (1, 1500, 300)):
        ctx = np.arange(200, 200 + n_dec, dtype=np.int64)
        b = StepBatch(np.array([chunk]), np.array([past]), ctx, ctx - 10, np.array([True]))
        want = true_cost(n_dec + 1, float(ctx.sum()), past + 1)
        done, rest = past + 1, chunk - 1
        while rest:
            n = min(rest, 512)
            want += true_cost(n, 0, n * done + n * (n + 1) / 2)
            done, rest = done + n, rest - n
        assert cm.step_time(b) == pytest.approx(want, rel=1e-6)
        assert len(cm.ubatches(b)) == 1 + -(-(chunk - 1) // 512)
    # Slots that are not neighbours cost a ubatch each: decodes in slots 0, 1 and 3.
    ctx = np.full(3, 300, np.int64)
    split = StepBatch(E, E, ctx, ctx, decode_seq=np.array([0, 1, 3]))
    assert cm.step_time(split) == pytest.approx(true_cost(2, 600, 0) + true_cost(1, 300, 0), rel=1e-6)
    assert cm.step_time(StepBatch(E, E, ctx, ctx, decode_seq=np.array([1, 2, 3]))) == pytest.approx(
        true_cost(3, 900, 0), rel=1e-6)
    # Between measured batch sizes the cost is linear, not the nearest neighbour's.
    t = [cm.step_time(StepBatch(E, E, np.full(n, 500, np.int64), np.full(n, 400, np.int64))) for n in (4, 5, 6, 8)]
    assert t[0] < t[1] < t[2] < t[3] and t[2] - t[1] == pytest.approx(t[1] - t[0], rel=1e-6)
    # A slower KV type is slower everywhere.
    q8 = LlamaCppCostModel(meta, rows, parse_method("q8_0"))
    b = StepBatch(E, E, np.full(4, 800, np.int64), np.full(4, 700, np.int64))
    assert q8.step_time(b) == pytest.approx(1.1 * cm.step_time(b), rel=1e-6)


def test_llamacpp_cost_model_refuses_a_kv_type_it_has_no_rows_for(profile):
    meta, rows = read_engine_profile(profile)
    with pytest.raises(ValueError, match="q4_0"):
        LlamaCppCostModel(meta, rows, parse_method("q4_0"))


# ---- llama.cpp KV bytes ----------------------------------------------------------------------
def test_llamacpp_kv_bytes_follow_ggml_blocks():
    m = resolve_model("smollm2-135m")
    per_head_token = {"f16": 2 * m.head_dim * 2, "q8_0": 2 * m.head_dim // 32 * 34, "q4_0": 2 * m.head_dim // 32 * 18}
    for kv, b in per_head_token.items():
        meth = parse_method(kv)
        assert meth.label == kv
        assert kv_bytes_per_token(m, meth) == m.num_layers * m.num_kv_heads * b
        assert kv_bytes(m, meth, 100, 150) == 150 * m.num_layers * m.num_kv_heads * b
    assert kv_bytes_per_token(m, parse_method("q8_0")) / kv_bytes_per_token(m, parse_method("f16")) == 34 / 64


# ---- how llama.cpp cuts a batch into ubatches (worked by hand from llama-batch.cpp) ---------
def test_ubatch_split_follows_llama_cpp():
    from rkvsim.simulator.ubatch import split
    # Decodes of slots 0, 1, 3: 3 does not follow 1, so it waits for a second ubatch.
    assert split([(0, 1), (1, 1), (3, 1)], 512, 4) == [[(0, 1), (1, 1)], [(3, 1)]]
    # A prompt in slot 3 beside decodes in 0..2: one token of each, then the prompt's rest.
    assert split([(0, 1), (1, 1), (2, 1), (3, 300)], 512, 4) == [[(0, 1), (1, 1), (2, 1), (3, 1)], [(3, 299)]]
    # Decodes 0, 1, 3 then a prompt in slot 2: 2 joins 0 and 1 (ids in a row), 3 goes alone.
    assert split([(0, 1), (1, 1), (3, 1), (2, 40)], 512, 4) == [[(0, 1), (1, 1), (2, 1)], [(3, 1)], [(2, 39)]]
    # The bench's prefill of 3 x 512 tokens: equal shares of 512 // 3 = 170, then the remainder.
    assert split([(0, 512), (1, 512), (2, 512)], 512, 3) == [[(0, 170), (1, 170), (2, 170)]] * 3 + [[(0, 2), (1, 2), (2, 2)]]
    # One KV stream (unified): runs of n_ubatch tokens whatever the sequences.
    assert split([(0, 1), (2, 1), (1, 700)], 512, 1) == [[(0, 1), (2, 1), (1, 510)], [(1, 190)]]


def test_slot_choice_is_the_servers_lru(profile):
    # Warmed server: slots last used in order 0, 1, 2, 3, so an idle server fills 0 first;
    # afterwards the slot freed longest ago is taken.
    scn = slots_scenario(profile, workload={"num_requests": 6, "arrival": {"process": "poisson", "rate": 0.01},
                                            "prompt": {"dist": "fixed", "value": 20},
                                            "output": {"dist": "fixed", "value": 3}})
    _, _, rec = run(scn, record=True)
    firsts = [b.prefill_seq.tolist() for b in rec.batches if len(b.prefill_new)]
    # Requests far apart: each finds every slot free and takes the least recently used one.
    assert firsts == [[0], [1], [2], [3], [0], [1]]
