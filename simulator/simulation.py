"""One simulation: a workload, a router and replicas in one SimPy environment, per method."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simpy

from rkvsim.models import Method, resolve_hardware, resolve_model

from rkvsim.simulator.config import Scenario, ScenarioError
from rkvsim.simulator.cost_model import CostModel, RooflineCostModel
from rkvsim.simulator.kv_memory import KVLayout, kv_layout
from rkvsim.simulator.records import RequestLog
from rkvsim.simulator.replica import Replica
from rkvsim.simulator.router import Router
from rkvsim.simulator.verbosity import method_outputs
from rkvsim.simulator.workload import sample_arrivals, sample_lengths


@dataclass
class Workload:
    seed: int
    prompt: np.ndarray
    output: np.ndarray
    arrivals: np.ndarray | None      # None: closed loop
    concurrency: int = 0
    think_time_s: float = 0.0


@dataclass
class MethodRun:
    label: str
    method: Method
    tp: int
    layout: KVLayout
    log: RequestLog
    replicas: list[Replica]
    cost_source: str


def build_workload(scn: Scenario, seed: int, base_dir: Path) -> Workload:
    rng = np.random.default_rng(seed)
    prompt, output = sample_lengths(scn.workload, rng, base_dir)
    arrivals = sample_arrivals(scn.workload.arrival, len(prompt), rng)
    a = scn.workload.arrival
    return Workload(seed, prompt, output, arrivals, getattr(a, "concurrency", 0), getattr(a, "think_time_s", 0.0))


class Arrivals:
    """Feeds a workload's requests to dispatch(rid): at their arrival times (open loop), or
    `concurrency` at a time, the next one `think_time_s` after each finishes (closed loop).
    Replicas call on_done(rid) when a request leaves."""

    def __init__(self, env: simpy.Environment, wl: Workload):
        self.env, self.wl = env, wl
        self.pending = iter(range(len(wl.prompt)))
        self.dispatch = None
        self.closed = wl.arrivals is None

    def on_done(self, _rid: int) -> None:
        if not self.closed:
            return
        rid = next(self.pending, None)
        if rid is None:
            return
        # Always through an event (even with zero think time): a run of rejected requests
        # must not recurse through dispatch -> on_done -> dispatch.
        self.env.timeout(self.wl.think_time_s).callbacks.append(lambda _ev: self.dispatch(rid))

    def _open_loop(self, times: np.ndarray):
        env = self.env
        for rid, t in enumerate(times.tolist()):
            if t > env.now:
                yield env.timeout(t - env.now)
            self.dispatch(rid)

    def start(self, dispatch) -> None:
        self.dispatch = dispatch
        if self.closed:
            for _ in range(min(self.wl.concurrency, len(self.wl.prompt))):
                self.on_done(-1)
        else:
            self.env.process(self._open_loop(self.wl.arrivals))


def variants(scn: Scenario) -> list[tuple[str, Method, int]]:
    """(label, method, tp) for every method at every TP degree the scenario compares."""
    tps = scn.tp_list
    return [(m.label if len(tps) == 1 else f"{m.label}@tp{tp}", m, tp) for tp in tps for m in scn.method_list]


def make_cost_model(scn: Scenario, method: Method, tp: int) -> CostModel:
    if scn.scheduler.kind == "slots":
        from rkvsim.simulator.llamacpp_cost import engine_cost_model   # llama.cpp: its engine profile's costs
        return engine_cost_model(scn, method)
    model, hw = resolve_model(scn.model), resolve_hardware(scn.hardware)
    from rkvsim.calibration.steps.profiles import find_profile
    from rkvsim.simulator.calibrated import calibrated_cost_model
    from rkvsim.calibration.steps.fit import FitError
    try:
        folder = find_profile(hw, model, scn.profile)
        if folder is None:
            return RooflineCostModel(model, hw, method, tp)
        sc = scn.scheduler
        return calibrated_cost_model(folder, model, hw, method, tp, sc.max_batched_tokens, sc.max_batch_size,
                                     sc.max_model_len or model.max_position)
    except (FitError, LookupError) as e:
        raise ScenarioError(f"profile: {' '.join(str(e).split())}") from None


def simulate_method(scn: Scenario, method: Method, wl: Workload, tp: int | None = None,
                    cost: CostModel | None = None, label: str | None = None, inflation=None) -> MethodRun:
    model, hw = resolve_model(scn.model), resolve_hardware(scn.hardware)
    tp = tp or scn.tp_list[0]
    sc = scn.scheduler
    slots = sc.kind == "slots"   # a llama.cpp server: fixed slots (simulator/slots.py)
    if slots:
        from rkvsim.simulator.slots import SlotReplica, slot_layout
        layout = slot_layout(model, method, sc)
    else:
        layout = kv_layout(model, hw, method, tp, sc.block_size, sc.gpu_memory_utilization,
                           sc.max_batched_tokens, sc.max_batch_size)
    cost = cost or make_cost_model(scn, method, tp)
    max_len = sc.ctx_slot if slots else (sc.max_model_len or model.max_position)
    outputs = method_outputs(method, wl.prompt, wl.output, inflation, max_len)
    log = RequestLog(wl.prompt, outputs)
    env = simpy.Environment()
    feed = Arrivals(env, wl)
    replicas = [(SlotReplica if slots else Replica)(env, i, layout, cost, sc, log, feed.on_done)
                for i in range(scn.replicas)]
    router = Router(replicas, scn.router)

    def dispatch(rid: int) -> None:
        log.arrival[rid] = env.now
        p, o = int(log.prompt[rid]), int(log.output[rid])
        if p + o > max_len:
            log.reject(rid, f"prompt+output {p + o} exceeds the {max_len}-token context window")
        elif layout.blocks_for(p + o) > layout.num_blocks:
            log.reject(rid, f"needs {layout.blocks_for(p + o)} KV blocks, the replica has {layout.num_blocks}")
        else:
            router.pick().submit(rid)
            return
        feed.on_done(rid)

    feed.start(dispatch)
    env.run()
    return MethodRun(label or method.label, method, tp, layout, log, replicas, cost.source)
