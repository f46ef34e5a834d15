"""The schedulers' cheap invariants (asserts where nano-vllm puts them) fire on the bugs they
guard against: a leaked block, a request completed twice, a slot released twice."""
from __future__ import annotations

import numpy as np
import pytest

from rkvsim.models import parse_method
from rkvsim.simulator.config import Scenario
from rkvsim.simulator.replica import Replica
from rkvsim.simulator.simulation import build_workload, simulate_method

# Heavy KV on one A6000: requests queue for blocks and decodes get preempted.
HEAVY = {
    "name": "inv", "model": "llama-2-7b", "hardware": "a6000", "methods": ["fp16"],
    "scheduler": {"max_batch_size": 64, "max_batched_tokens": 4096},
    "workload": {"num_requests": 120, "arrival": {"process": "poisson", "rate": 50.0},
                 "prompt": {"dist": "uniform", "low": 2000, "high": 3500},
                 "output": {"dist": "uniform", "low": 200, "high": 500}},
}


def heavy(**sched) -> tuple[Scenario, object]:
    d = {**HEAVY, "scheduler": {**HEAVY["scheduler"], **sched}}
    scn = Scenario.model_validate(d)
    return scn, build_workload(scn, 0, ".")


@pytest.mark.parametrize("chunked", [False, True])
def test_a_correct_run_keeps_every_invariant_and_preempts(chunked):
    scn, wl = heavy(chunked_prefill=chunked)
    run = simulate_method(scn, parse_method("fp16"), wl)
    assert int(run.log.preemptions.sum()) > 0          # the asserts on the preemption paths ran
    assert all(r.blocks_used == 0 for r in run.replicas)   # everything freed at the end


def test_a_leaked_block_is_caught(monkeypatch):
    real = Replica._finish_prefills

    def leaky(self, now):
        real(self, now)
        self.blocks_used += 1      # a block taken at prefill and never given back

    monkeypatch.setattr(Replica, "_finish_prefills", leaky)
    scn, wl = heavy()
    with pytest.raises(AssertionError, match="blocks_used .* != blocks held"):
        simulate_method(scn, parse_method("fp16"), wl)


def test_a_request_completed_twice_is_caught(monkeypatch):
    real = Replica._complete

    def twice(self, rid, gen, now):
        real(self, rid, gen, now)
        self.outstanding += 1
        real(self, rid, gen, now)

    monkeypatch.setattr(Replica, "_complete", twice)
    scn, wl = heavy()
    with pytest.raises(AssertionError, match="completed twice"):
        simulate_method(scn, parse_method("fp16"), wl)


def test_a_slot_released_twice_is_caught(monkeypatch):
    from rkvsim.simulator.slots import SlotReplica

    real = SlotReplica._release

    def twice(self, s, now):
        rid = s.rid
        real(self, s, now)
        s.rid = rid
        self.outstanding += 1
        real(self, s, now)

    monkeypatch.setattr(SlotReplica, "_release", twice)
    scn = Scenario.model_validate({
        "name": "inv-slots", "model": "smollm2-135m", "hardware": "cpu", "methods": ["f16"],
        "scheduler": {"kind": "slots", "n_parallel": 2, "ctx_size": 4096},
        "workload": {"num_requests": 6, "arrival": {"process": "poisson", "rate": 2.0},
                     "prompt": {"dist": "uniform", "low": 50, "high": 200},
                     "output": {"dist": "uniform", "low": 5, "high": 30}},
    })
    wl = build_workload(scn, 0, ".")
    with pytest.raises(AssertionError, match="released twice"):
        simulate_method(scn, parse_method("f16"), wl)


@pytest.mark.parametrize("policy,chunked,step_by_step", [
    ("vllm-v1", True, True), ("vllm-v1", False, False), ("vllm-v0", False, True), ("vllm-v0", True, False),
    ("lmdeploy", False, True), ("lmdeploy", False, False)])
def test_the_shared_token_time_and_the_bound_on_tokens_left_hold_at_every_step(monkeypatch, policy, chunked, step_by_step):
    """Replica._last_at (every decode column's last token came then), _rem_lb (no column has
    fewer tokens left) and _ctx_sum (the columns' contexts) are what a step trusts instead of
    reading the columns: checked against the columns before every step is finished and after
    every run is applied, under preemption, chunked prefill whose budget leaves decodes out (v1's
    small token budget) and each policy's prefill-only steps."""
    checked = {"last": 0, "bound": 0, "blocks": 0}

    def check(self, planned=0):
        self._flush()                    # the lazy steps written out (what every reader does first)
        n = self.n_dec
        if self._cross:                  # (the first `planned` columns hold the step in progress's blocks)
            ahead = (np.arange(n) < planned).astype(np.int64)
            assert (self.D[self.BLK, :n] == self.layout.decode_blocks_vec(
                self.D[self.PLEN, :n], self.D[self.CTX, :n] + ahead)).all(), "a column's blocks are off"
            checked["blocks"] += 1
        assert self._ctx_sum == int(self.D[self.CTX, :n].sum()), "the contexts' running sum is off"
        if not n:
            return
        if self._last_at is not None:
            assert (self.F[self.LAST, :n] == self._last_at).all(), "a column's last token time differs"
            checked["last"] += 1
        left = self.D[self.OUT, :n] - self.D[self.GEN, :n]
        assert self._rem_lb <= int(left.min()), f"bound {self._rem_lb} above the fewest tokens left {left.min()}"
        checked["bound"] += 1

    for name in ("_finish_decode_step", "_apply_run"):
        real = getattr(Replica, name)

        def wrapped(self, *a, _real=real, _name=name):
            if _name == "_finish_decode_step":
                check(self, a[0])
            _real(self, *a)
            check(self)
        monkeypatch.setattr(Replica, name, wrapped)
    # A token budget below the batch (v1) schedules only part of the decodes in some steps.
    small = policy == "vllm-v1" and chunked
    scn, wl = heavy(policy=policy, chunked_prefill=chunked, **({"max_batched_tokens": 48} if small else {}))
    scn = scn.model_copy(update={"step_by_step": step_by_step})
    run = simulate_method(scn, parse_method("kivi-4" if chunked else "fp16"), wl)
    assert int(run.log.preemptions.sum()) > 0 or policy == "lmdeploy" or small
    assert checked["last"] > 100 and checked["bound"] > 100
    assert checked["blocks"] > 100 or not (policy == "vllm-v1" and not chunked), "FP16 under v1 is lazy: checked"


def test_a_repeated_gap_bins_as_its_copies():
    from rkvsim.simulator.records import RequestLog
    a, b = RequestLog(np.zeros(1), np.zeros(1)), RequestLog(np.zeros(1), np.zeros(1))
    gaps = [0.0123, 1e-6, 0.5, 0.0123, 3.0e4]
    for g, c in zip(gaps, [3, 1, 7, 2, 5]):
        a.add_itl_repeated(g, c)
        b.add_itls(np.full(c, g))
    assert np.array_equal(a.itl_hist, b.itl_hist) and int(a.itl_hist.sum()) == 18
