"""Scheduler policies step by step: small hand-worked schedules from the upstream rules
(vllm/v1/core/sched/scheduler.py, LMDeploy's engine loop and paging scheduler, vLLM V0), prefix
caching on constructed prompts, exact compressed-KV blocks and per-policy step overheads."""
from __future__ import annotations

import math

import numpy as np
import pytest
import simpy

from rkvsim.models import kv_bytes, parse_method, resolve_hardware, resolve_model
from rkvsim.simulator.config import Scenario, ScenarioError, SchedulerConfig
from rkvsim.simulator.cost_model import RooflineCostModel, StepBatch
from rkvsim.simulator.kv_memory import KVLayout, kv_layout
from rkvsim.simulator.prefix_cache import BlockPool, block_keys
from rkvsim.simulator.records import RequestLog
from rkvsim.simulator.replica import Replica
from rkvsim.simulator.simulation import build_workload, make_cost_model, simulate_method


class Clock:
    """A cost model of one second per step that records what each step carried."""
    source = "test"

    def __init__(self):
        self.steps = []

    def step_time(self, b: StepBatch) -> float:
        self.steps.append((list(zip(b.prefill_new.tolist(), b.prefill_past.tolist())), len(b.decode_ctx)))
        return 1.0

    def breakdown(self, b):
        return {}


def run(policy, reqs, num_blocks=1000, block=4, budget=16, max_batch=8, content=None, method="fp16", **sched):
    """reqs: [(arrival s, prompt, output)]. Returns (steps [(prefill chunks [(new, past)], decodes)], log, replica)."""
    cfg = SchedulerConfig(policy=policy, max_batched_tokens=budget, max_batch_size=max_batch, block_size=block, **sched)
    m = parse_method(method) if isinstance(method, str) else method
    layout = KVLayout(m, block, 1.0, num_blocks, 0.0, float(num_blocks), 0.0, exact=True)
    log = RequestLog(np.array([p for _, p, _ in reqs]), np.array([o for _, _, o in reqs]))
    env = simpy.Environment()
    clock = Clock()
    rep = Replica(env, 0, layout, clock, cfg, log, lambda rid: None, content)

    def feed():
        for rid, (t, _, _) in enumerate(reqs):
            if t > env.now:
                yield env.timeout(t - env.now)
            log.arrival[rid] = env.now
            rep.submit(rid)
    env.process(feed())
    env.run()
    return clock.steps, log, rep


def test_v1_running_first_then_waiting_in_one_budget():
    # Budget 16: A (20-token prompt) takes 16; next step A's last 4 and B's whole prompt share the
    # budget; then both decode; B (2 tokens out) is done, A decodes alone.
    steps, log, _ = run("vllm-v1", [(0, 20, 3), (0, 12, 2)], budget=16)
    assert steps == [([(16, 0)], 0), ([(4, 16), (12, 0)], 0), ([], 2), ([], 1)]
    assert list(log.finish) == [4.0, 3.0]


def test_v0_prefill_only_steps_stall_decodes():
    # V0 without chunking: a step that can admit is prefill-only (A's decode waits for B's prefill).
    steps, _, _ = run("vllm-v0", [(0, 10, 3), (0.5, 6, 2)], budget=16)
    assert steps == [([(10, 0)], 0), ([(6, 0)], 0), ([], 2), ([], 1)]
    v1, _, _ = run("vllm-v1", [(0, 10, 3), (0.5, 6, 2)], budget=16)
    assert v1 == [([(10, 0)], 0), ([(6, 0)], 1), ([], 2)]     # v1 mixes B's prefill with A's decode


def test_v1_long_prefill_threshold_caps_a_chunk():
    steps, _, _ = run("vllm-v1", [(0, 10, 1)], budget=16, long_prefill_token_threshold=4)
    assert steps == [([(4, 0)], 0), ([(4, 4)], 0), ([(2, 8)], 0)]


def test_v1_preempts_the_tail_and_admits_nothing_in_that_step():
    # 5 blocks of 4 tokens. A and B (8-token prompts) take 2 blocks each. Their first decode
    # needs a third block each: one is free, so the tail of `running` (B) is preempted. C (a
    # 4-token prompt, 1 block) is waiting and would fit, but a step that preempted admits nobody;
    # in the next step B is at the head of the queue and does not fit, so C waits behind it.
    steps, log, _ = run("vllm-v1", [(0, 8, 6), (0, 8, 6), (0.5, 4, 1)], num_blocks=5, budget=16)
    # A alone then decodes until it finishes at t=6 (4 blocks by then); B (8 prompt + 1 generated
    # token, recomputed) and C are admitted together in the step after. B's blocks kept their keys
    # when freed, tail first: A's last growth evicted B's second block, its first is still cached,
    # so B recomputes 5 tokens after 4 cached ones (vLLM V1 frees, never forgets, a preempted cache).
    assert steps[0] == ([(8, 0), (8, 0)], 0)
    assert steps[1:6] == [([], 1)] * 5
    assert steps[6] == ([(5, 4), (4, 0)], 0)
    assert log.prefix_hit_tokens == 4
    assert log.preemptions.tolist() == [0, 1, 0]
    assert log.finish[0] == 6.0 and log.first_sched[2] == 6.0


def test_lmdeploy_tries_prefill_every_prefill_interval_steps():
    # prefill_interval 3: the counter is reset at a prefill attempt and counts down every step, so
    # B (arriving at 0.5) waits two decode steps of A, then a prefill-only step, then both decode.
    steps, _, _ = run("lmdeploy", [(0, 4, 6), (0.5, 4, 3)], budget=16, prefill_interval=3)
    assert steps[:5] == [([(4, 0)], 0), ([], 1), ([], 1), ([(4, 0)], 0), ([], 2)]
    # The count runs whether or not anyone waits: C arrives after A's counter ran out with nothing
    # waiting (an attempt at t=3 found no one and reset it), so C waits for the next attempt.
    steps, _, _ = run("lmdeploy", [(0, 4, 12), (3.5, 4, 2)], budget=16, prefill_interval=3)
    assert steps[:7] == [([(4, 0)], 0), ([], 1), ([], 1), ([], 1), ([], 1), ([], 1), ([(4, 0)], 0)]


def test_lmdeploy_admits_the_first_prompt_whatever_the_token_limit():
    steps, _, _ = run("lmdeploy", [(0, 40, 1), (0, 4, 1)], budget=16)
    assert steps[0] == ([(40, 0)], 0) and steps[1] == ([(4, 0)], 0)


# ---- prefix caching -------------------------------------------------------------------
def test_block_keys_equal_exactly_for_equal_prefixes():
    a = block_keys([(1, 8), (2, 3)], 2, 4)
    b = block_keys([(1, 8), (3, 5)], 3, 4)
    c = block_keys([(1, 6), (2, 5)], 2, 4)       # another segment 1 length is other text
    assert a == b[:2] and b[2] not in a
    assert c[0] != a[0] or c[1] != a[1]


def test_prefix_hit_skips_cached_blocks_and_keeps_the_last_token():
    segs = {0: [(100, 8), (0, 3)], 1: [(100, 8), (2, 3)], 2: [(100, 8), (4, 3)], 3: [(100, 8), (0, 3)]}
    content = lambda rid: segs[rid] + [((7, rid), 1)]  # noqa: E731
    # B arrives after A left: A's two system-prompt blocks are cached, B prefills its last 3 tokens.
    steps, log, rep = run("vllm-v1", [(0, 11, 1), (5, 11, 1)], content=content)
    assert steps == [([(11, 0)], 0), ([(3, 8)], 0)]
    assert log.cached_prompt.tolist() == [0, 8] and log.prefix_hit_tokens == 8 and log.prefix_query_tokens == 22
    rep.pool.check()
    # An identical prompt reuses at most all but its last token, in whole blocks: 8 of 11 here,
    # and 4 of 8 for a prompt that is exactly the two cached blocks.
    same = lambda rid: [(100, 8)] + [((7, rid), 1)]  # noqa: E731
    steps, log, _ = run("vllm-v1", [(0, 8, 1), (5, 8, 1)], content=same)
    assert steps == [([(8, 0)], 0), ([(4, 4)], 0)]


def test_prefix_cache_evicts_the_least_recently_freed_block():
    pool = BlockPool(3)
    a, = pool.allocate(1)
    pool.publish([a], [11])
    b, = pool.allocate(1)
    pool.publish([b], [22])
    pool.release([a])
    pool.release([b])               # free queue: [2 (never used), a, b]
    pool.allocate(2)                # takes block 2, then a: a's key is evicted
    assert pool.lookup([11]) == [] and pool.lookup([22]) == [b] and pool.evictions == 1
    pool.touch([b])                 # a hit takes b off the free queue
    assert pool.used == 3 and pool.ref[b] == 1
    with pytest.raises(AssertionError):
        pool.release([b, b])        # freed more often than referenced
    pool.ref[b] = 1
    pool.cached.pop(b, None)


def _shared_prefix_scenario(methods, caching=True, groups=2):
    return Scenario.model_validate({
        "name": "px", "model": "llama-3-8b", "hardware": "h100-sxm", "methods": methods,
        "scheduler": {"policy": "vllm-v1", "enable_prefix_caching": caching},
        "workload": {"num_requests": 60, "arrival": {"process": "poisson", "rate": 2.0},
                     "shared_prefix": {"groups": groups, "tokens": 1024},
                     "prompt": {"dist": "fixed", "value": 64}, "output": {"dist": "fixed", "value": 8}}})


def test_shared_prefix_hit_rate_per_method():
    scn = _shared_prefix_scenario(["fp16", "kivi-4", "h2o-512", "snapkv-1024", "fp8"])
    wl = build_workload(scn, 0, ".")
    hits = {}
    for m in scn.method_list:
        r = simulate_method(scn, m, wl)
        hits[m.label] = r.log.prefix_hit_tokens / r.log.prefix_query_tokens
        if m.label in ("fp16", "fp8"):
            # Every request after its group's first reuses the whole 1,024-token system prompt.
            first = {int(np.flatnonzero(wl.structure.prompt == wl.structure.prompt)[0])}
            n_groups = len({s[0][0] for s in wl.structure.prefix})
            assert r.log.prefix_hit_tokens == (60 - n_groups) * 1024, first
    # KIVI shares its quantized groups: the prompt minus the 128-token residual, in whole groups.
    assert 0 < hits["kivi-4"] <= hits["fp16"] and hits["fp8"] == hits["fp16"]
    assert hits["h2o-512"] == 0 and hits["snapkv-1024"] == 0


def test_caching_off_and_v0_give_no_prefix_figures():
    scn = _shared_prefix_scenario(["fp16"], caching=False)
    r = simulate_method(scn, parse_method("fp16"), build_workload(scn, 0, "."))
    assert r.replicas[0].pool is None and r.log.prefix_hit_tokens == 0


def test_sessions_resend_history_and_wait_for_the_previous_reply():
    scn = Scenario.model_validate({
        "name": "ss", "model": "llama-3-8b", "hardware": "h100-sxm", "methods": ["fp16"],
        "workload": {"num_requests": 6, "arrival": {"process": "constant", "rate": 0.5},
                     "sessions": {"turns": 3, "think_time_s": 2.0},
                     "prompt": {"dist": "fixed", "value": 50}, "output": {"dist": "fixed", "value": 20}}})
    wl = build_workload(scn, 0, ".")
    assert wl.prompt.tolist() == [50, 120, 190, 50, 120, 190]
    r = simulate_method(scn, parse_method("fp16"), wl)
    log = r.log
    for rid in (1, 2, 4, 5):
        assert log.arrival[rid] == pytest.approx(log.finish[rid - 1] + 2.0)
    # The next turn finds the previous prompt and reply cached (whole 16-token blocks, < its length).
    assert log.cached_prompt[1] == 64 and log.cached_prompt[2] == 128


# ---- blocks of compressed caches -------------------------------------------------------
def test_kivi_holds_its_actual_bytes_not_the_worst_case_residual():
    model, hw = resolve_model("llama-2-7b"), resolve_hardware("a6000")
    m = parse_method("kivi-4")
    old = kv_layout(model, hw, m, 1, 16, 0.9, 8192, 256)
    new = kv_layout(model, hw, m, 1, 16, 0.9, 8192, 256, exact=True)
    true = kv_bytes(model, m, 64, 64)
    assert old.blocks_for(64) * old.block_bytes / true > 1.9           # the old reservation: ~2x
    held = new.prefill_blocks(64) * new.block_bytes
    assert true <= held < true + new.block_bytes                        # exact, to one block
    # Long caches: the two differ by the worst-case residual the old rule reserved (128 fp16 tokens).
    assert 0 < old.blocks_for(3200) - new.decode_blocks(3000, 3200) <= 5


def test_eviction_caps_admission_and_windows_free_whole_blocks():
    model, hw = resolve_model("llama-2-7b"), resolve_hardware("a6000")
    m = parse_method("streamingllm-512")
    whole = kv_layout(model, hw, m, 1, 16, 0.9, 8192, 256, exact=True)
    packed = kv_layout(model, hw, m, 1, 16, 0.9, 8192, 256, exact=True, whole_windows=False)
    old = kv_layout(model, hw, m, 1, 16, 0.9, 8192, 256)
    p, o = np.array([600]), np.array([50_000])
    assert old.peak_blocks_vec(p, o)[0] == math.ceil(50_600 / 16)       # v0: admitted like FP16
    assert whole.peak_blocks_vec(p, o)[0] <= 4 + 28 + 1 + 1            # sink + window (+1 unaligned)
    # At 1,000 tokens: blocks 34..62 hold the 448-token window, plus the 4 sink blocks.
    assert whole.decode_blocks(600, 1000) == 33 and packed.decode_blocks(600, 1000) == 32


def test_mistral_sliding_window_caps_its_own_kv():
    model, hw = resolve_model("mistral-7b"), resolve_hardware("a100-80g")
    lay = kv_layout(model, hw, parse_method("fp16"), 1, 16, 0.9, 8192, 256, exact=True)
    assert lay.decode_blocks(100, 20_000) <= 4096 // 16 + 1 < 20_000 // 16


# ---- step overheads by policy ----------------------------------------------------------
def _overhead_scn(policy):
    return Scenario.model_validate({
        # profile: roofline: the roofline's own overhead terms are under test (h100-sxm ships a profile).
        "name": "ov", "model": "llama-3-8b", "hardware": "h100-sxm", "profile": "roofline", "methods": ["fp16"],
        "scheduler": {"policy": policy},
        "workload": {"num_requests": 2, "arrival": {"process": "poisson", "rate": 1.0},
                     "prompt": {"dist": "fixed", "value": 100}, "output": {"dist": "fixed", "value": 10}}})


def test_v1_decodes_under_cuda_graphs_with_measured_cpu_time():
    m = parse_method("fp16")
    v0, v1 = (make_cost_model(_overhead_scn(p), m, 1) for p in ("vllm-v0", "vllm-v1"))
    assert v0.source == "roofline-prior (uncalibrated)"
    assert v1.source.startswith("roofline-prior (uncalibrated); graphs:decode+piecewise cpu:measured(vidur a100")
    e = np.zeros(0, np.int64)
    dec = StepBatch(e, e, np.full(32, 1000, np.int64), np.full(32, 900, np.int64))
    b0, b1 = v0.breakdown(dec), v1.breakdown(dec)
    assert b0["qkv_proj"] - b1["qkv_proj"] == pytest.approx(32 * 5e-6, rel=1e-6)   # one launch per layer gone
    assert sum(b1.values()) == pytest.approx(v1.step_time(dec))
    from rkvsim.calibration.steps.cpu_overheads import lookup
    fixed, per_seq, _ = lookup("h100-sxm", 1, "v1")
    assert b1["step_overhead"] == pytest.approx(fixed + 32 * per_seq)
    # A mixed step is piecewise: dense graphed, attention launched.
    mix = StepBatch(np.array([64]), np.array([0]), np.full(32, 1000, np.int64), np.full(32, 900, np.int64))
    bm = v1.breakdown(mix)
    assert bm["qkv_proj"] == pytest.approx(b1["qkv_proj"] * 0 + v1._dense(96, True)[1][2])


def test_bad_policy_settings_name_the_field():
    base = {"name": "b", "model": "llama-2-7b", "hardware": "a6000", "methods": ["fp16"],
            "workload": {"num_requests": 2, "arrival": {"process": "poisson", "rate": 1.0},
                         "prompt": {"dist": "fixed", "value": 10}, "output": {"dist": "fixed", "value": 10}}}
    for sched, field in (({"policy": "vllm-v2"}, "policy"), ({"policy": "lmdeploy", "chunked_prefill": True}, "chunked"),
                         ({"policy": "vllm-v0", "enable_prefix_caching": True}, "enable_prefix_caching")):
        with pytest.raises(Exception, match=field):
            Scenario.model_validate({**base, "scheduler": sched})
    with pytest.raises(Exception, match="sessions"):
        Scenario.model_validate({**base, "workload": {**base["workload"], "arrival": {"process": "offline"},
                                                      "sessions": {"turns": 2}}})
    with pytest.raises(Exception, match="arms.0.scheduler"):
        Scenario.model_validate({**base, "arms": [{"name": "x", "scheduler": {"policy": "nope"}}]})


def test_v1_preemption_credits_only_blocks_no_one_else_holds():
    # Three requests share an 8-token prefix (2 blocks) and hold one private block each: the pool
    # (5 blocks) is full. All three need a fourth block; preempting C frees only its private block
    # (the shared ones stay referenced), so B must go too before A can grow.
    segs = lambda rid: [(100, 8), (2 * rid, 2), (2 * rid + 1, 10)]  # noqa: E731
    steps, log, rep = run("vllm-v1", [(0, 10, 10)] * 3, num_blocks=5, content=segs)
    assert np.isfinite(log.finish).all() and log.preemptions.tolist()[0] == 0 and log.preemptions[1:].min() >= 1
    rep.pool.check()


def test_preempted_requests_return_to_the_queue_in_admission_order():
    # A decodes, B is a partial prefill behind it, C a decode admitted last: when all must go,
    # the queue holds them earliest admitted first, whatever their state.
    r = Replica.__new__(Replica)
    import collections
    r.D, r.F = np.zeros((7, 4), np.int64), np.zeros((2, 4))
    r.pool, r.blocks_used, r.layout = None, 6, KVLayout(parse_method("fp16"), 4, 1.0, 10, 0.0, 10.0, 0.0, exact=True)
    r.log = RequestLog(np.array([8, 8, 8]), np.array([5, 5, 5]))
    r.waiting = collections.deque([9])
    r.D[:, 0] = (8, 1, 0, 8, 5, 2, 1)
    r.D[:, 1] = (8, 1, 2, 8, 5, 2, 3)
    r.n_dec = 2
    r.prefilling = [[1, 4, 8, 2, 2]]
    victims = [(3, 0, 1), (2, 1, 0), (1, 0, 0)]
    r._preempt_v1(victims, np.array([True, True]), {0})
    assert list(r.waiting) == [0, 1, 2, 9] and r.n_dec == 0 and not r.prefilling and r.blocks_used == 0


def test_a_request_that_can_never_be_recomputed_is_rejected_not_parked():
    # SnapKV keeps 4 prompt tokens, so B (60-token prompt) is admitted for its 15-block peak; once
    # preempted, recomputing its whole context needs more blocks than the replica has. It is
    # rejected with the reason, and the replica does not stall.
    from rkvsim.models import default_method
    m = default_method("snapkv", budget=4, window=4)
    steps, log, rep = run("vllm-v1", [(0, 4, 70), (5, 60, 36)], num_blocks=20, budget=64, method=m)
    assert np.isfinite(log.finish[0]) and log.rejected[1] and log.generated[1] == 33
    assert log.reject_reason[1] == "needs 24 KV blocks to (re)compute its 93-token context, the replica has 20"
    assert not rep.waiting and rep.n_dec == 0 and rep.blocks_used == 0


@pytest.mark.parametrize("label", ["kivi-4", "kivi-2", "gear-4", "gear-8", "streamingllm-512", "h2o-512", "snapkv-1024",
                                   "fp16", "fp8"])
def test_peak_blocks_is_the_true_maximum_over_a_requests_life(label):
    model, hw = resolve_model("llama-2-7b"), resolve_hardware("a6000")
    lay = kv_layout(model, hw, parse_method(label), 1, 16, 0.9, 8192, 256, exact=True)
    rng = np.random.default_rng(0)
    for p, o in [(100, 60), (1, 1), (50, 3), *zip(rng.integers(1, 2000, 15).tolist(), rng.integers(1, 600, 15).tolist())]:
        true = max([lay.prefill_blocks(p)] + [lay.decode_blocks(p, c) for c in range(p, p + o + 1)])
        assert lay.peak_blocks(p, o) == true, (p, o)


def test_v1_watermark_holds_admission_back_while_others_run():
    # 10 blocks of 4 tokens. A (8 tokens, 2 blocks) runs; B (28 tokens, 7 blocks) arrives next.
    # Without a watermark B is admitted at once (2 + 7 <= 10); with 20% (2 blocks) kept free it
    # waits until A has left, because admission while others run must leave the watermark.
    reqs = [(0, 8, 4), (0.5, 28, 1)]
    _, plain, _ = run("vllm-v1", reqs, num_blocks=10, budget=32)
    _, marked, _ = run("vllm-v1", reqs, num_blocks=10, budget=32, watermark=0.2)
    assert plain.first_sched[1] == 1.0
    assert marked.first_sched[1] == marked.finish[0] == 4.0
