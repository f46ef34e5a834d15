"""The schedulers' cheap invariants (asserts where nano-vllm puts them) fire on the bugs they
guard against: a leaked block, a request completed twice, a slot released twice."""
from __future__ import annotations

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
