"""The simulation loop: a workload, a router and replicas in one SimPy environment, for one
set-up (a method, or a mixed fleet) at a time."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simpy

from rkvsim.models import Method, resolve_hardware, resolve_model

from rkvsim.simulator.config import Scenario, ScenarioError
from rkvsim.simulator.policies import POLICIES, scheduler_with
from rkvsim.simulator.content import Structure, build_structure, content_of
from rkvsim.simulator.cost_model import CostModel, RooflineCostModel, StepOverheads
from rkvsim.simulator.kv_memory import KVLayout, kv_layout
from rkvsim.simulator.records import RequestLog
from rkvsim.simulator.replica import Replica
from rkvsim.simulator.fleet import LengthPredictions, Member, Variant, route_context
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
    structure: Structure | None = None   # shared prefixes / sessions (simulator/content.py)


@dataclass
class MethodRun:
    """What one set-up's simulation leaves: its request log, replicas (with their step series)
    and where its costs came from."""
    label: str
    method: Method
    tp: int
    layout: KVLayout
    log: RequestLog
    replicas: list[Replica]
    cost_source: str
    variant: Variant | None = None
    route_decisions: int = 0      # predictive routing decisions made
    length_source: str = ""       # what the router believed response lengths to be
    configs: list = field(default_factory=list)
    stopped: str | None = None    # why the run stopped early (an objective's miss was decided)


def build_workload(scn: Scenario, seed: int, base_dir: Path) -> Workload:
    rng = np.random.default_rng(seed)
    prompt, output = sample_lengths(scn.workload, rng, base_dir)
    arrivals = sample_arrivals(scn.workload.arrival, len(prompt), rng)
    a = scn.workload.arrival
    think = getattr(a, "think_time_s", 0.0)
    st = build_structure(scn.workload, prompt, output, rng)
    if st is not None:
        prompt = st.prompt
        if scn.workload.sessions is not None:
            think = scn.workload.sessions.think_time_s
    return Workload(seed, prompt, output, arrivals, getattr(a, "concurrency", 0), think, st)


class Arrivals:
    """Feeds a workload's requests to dispatch(rid): at their arrival times (open loop), or
    `concurrency` at a time, the next one `think_time_s` after each finishes (closed loop).
    Replicas call on_done(rid) when a request leaves."""

    def __init__(self, env: simpy.Environment, wl: Workload):
        self.env, self.wl = env, wl
        self.pending = iter(range(len(wl.prompt)))
        self.dispatch = None
        self.closed = wl.arrivals is None
        self._times: list[float] = []     # open-loop arrival times, and the index of the next one
        self._i = 0
        # Sessions: a turn is sent think_time_s after its previous turn left (simulator/content.py).
        st = wl.structure
        self.child = None
        if st is not None and (st.parent >= 0).any():
            self.child = np.full(len(wl.prompt), -1, np.int64)
            has = st.parent >= 0
            self.child[st.parent[has]] = np.flatnonzero(has)

    def on_done(self, rid: int) -> None:
        if self.child is not None:
            if rid >= 0 and self.child[rid] >= 0:
                nxt = int(self.child[rid])
                self.env.timeout(self.wl.think_time_s).callbacks.append(lambda _ev: self.dispatch(nxt))
            return
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
        rids = range(len(times)) if self.child is None else np.flatnonzero(self.wl.structure.parent < 0).tolist()
        # Sessions: the arrival process gives the first turns, in order (the first len(heads) times).
        self._times = times.tolist()
        for i, (rid, t) in enumerate(zip(rids, self._times)):
            self._i = i
            if t > env.now:
                yield env.timeout(t - env.now)
            self.dispatch(rid)
        self._i = len(self._times)

    def time_ahead(self, k: int = 1) -> float:
        """The k-th next open-loop arrival (a run need not reach past it); inf past the last one
        or in a closed loop."""
        j = self._i + max(k, 1) - 1
        return self._times[j] if j < len(self._times) else float("inf")

    def start(self, dispatch) -> None:
        self.dispatch = dispatch
        if self.closed:
            for _ in range(min(self.wl.concurrency, len(self.wl.prompt))):
                self.on_done(-1)
        else:
            self.env.process(self._open_loop(self.wl.arrivals))


def step_overheads(sc, hardware: str, tp: int) -> StepOverheads | None:
    """What the policy's engine adds to each step (CUDA graphs, CPU time), or None for the
    prior's eager launches and constant CPU time (vllm-v0's numbers)."""
    if not sc.cuda_graphs and sc.cpu_overhead == "prior":
        return None
    d = POLICIES[sc.policy]
    if not sc.cuda_graphs:
        graphs, capture = "none", 0
    elif d.graphs == "decode+piecewise":
        # vllm/config/vllm.py: capture sizes up to min(2 * max_num_seqs, 512) tokens, at most the budget.
        graphs, capture = d.graphs, min(2 * sc.max_batch_size, 512, sc.max_batched_tokens)
    else:
        graphs, capture = d.graphs, sc.max_batch_size    # decode-only batches up to the largest captured
    cpu, src, trust = None, "prior", None
    if sc.cpu_overhead == "measured":
        from rkvsim.calibration.steps.cpu_overheads import line, lookup
        from rkvsim.calibration.steps.trust import cpu_trust
        hit = lookup(hardware, tp, d.cpu_table)
        if hit is not None:
            cpu, src = hit[:2], hit[2]
            trust = cpu_trust(*line(hardware, tp, d.cpu_table), d.cpu_table)
    return StepOverheads(graphs, capture, cpu, src, trust)


def make_cost_model(scn: Scenario, method: Method, tp: int, sc=None) -> CostModel:
    if scn.scheduler.kind == "slots":
        from rkvsim.simulator.llamacpp_cost import llamacpp_cost_model   # llama.cpp: its engine profile's costs
        return llamacpp_cost_model(scn, method)
    model, hw = resolve_model(scn.model), resolve_hardware(scn.hardware)
    from rkvsim.calibration.steps.profiles import FORCE_PRIOR, find_gpu_donor, find_profile
    from rkvsim.simulator.calibrated import calibrated_cost_model
    from rkvsim.calibration.steps.fit import FitError
    from rkvsim.calibration.steps.comm import lookup as comm_lookup
    sc = sc or scn.scheduler
    ov = step_overheads(sc, hw.name, tp)
    comm = comm_lookup(hw.network, tp) if tp > 1 else None
    try:
        folder = find_profile(hw, model, scn.profile)
        if folder is None and scn.profile != FORCE_PRIOR:
            folder = find_gpu_donor(hw)     # a GPU nobody profiled: the nearest profiled one, carried
        if folder is None:
            return RooflineCostModel(model, hw, method, tp, overheads=ov, comm=comm)
        return calibrated_cost_model(folder, model, hw, method, tp, sc.max_batched_tokens, sc.max_batch_size,
                                     sc.max_model_len or model.max_position, overheads=ov, comm=comm)
    except (FitError, LookupError) as e:
        raise ScenarioError(f"profile: {' '.join(str(e).split())}") from None


def simulate(scn: Scenario, v: Variant, wl: Workload, inflation=None, predictions: LengthPredictions | None = None,
             cost: CostModel | None = None, stop_on_miss: list | None = None) -> MethodRun:
    """One set-up on one workload: the simulation loop every run goes through.

    Each distinct (method, tp) of the set-up is one replica configuration with its own KV layout,
    cost model and output lengths (the method's verbosity). A request goes to a replica whose
    KV pool and context window hold it (the router picks among those); one no replica can hold
    is rejected, counted and never queued. `cost` replaces the cost model of a single-
    configuration set-up (tests inject recorders). `stop_on_miss` (MissRule list,
    simulator/slo_stop.py): stop as soon as one of them is certain to be missed, with
    MethodRun.stopped saying why (a plan's bisection needs only the verdict); paged replicas of
    one configuration only, elsewhere it runs to the end."""
    model, hw = resolve_model(scn.model), resolve_hardware(scn.hardware)
    sc = scheduler_with(scn.scheduler, v.scheduler, hw)
    slots = sc.kind == "slots"   # a llama.cpp server: fixed slots (simulator/slots.py)
    if slots:
        from rkvsim.simulator.slots import SlotReplica, slot_layout
    max_len = sc.ctx_slot if slots else (sc.max_model_len or model.max_position)
    keys = list(dict.fromkeys((m.method, m.tp) for m in v.members))
    assert cost is None or len(keys) == 1, "an injected cost model serves one configuration"
    layouts, costs, outputs = [], [], []
    for method, tp in keys:
        layouts.append(slot_layout(model, method, sc) if slots else
                       kv_layout(model, hw, method, tp, sc.block_size, sc.gpu_memory_utilization,
                                 sc.max_batched_tokens, sc.max_batch_size, exact=sc.kv_blocks == "exact",
                                 whole_windows=sc.eviction_blocks == "whole"))
        costs.append(cost or make_cost_model(scn, method, tp, sc))
        outputs.append(np.asarray(method_outputs(method, wl.prompt, wl.output, inflation, max_len), np.int64))
    config_of = [keys.index((m.method, m.tp)) for m in v.members for _ in range(m.replicas)]
    prompt = wl.prompt.astype(np.int64)
    # Admission: the context window and the whole KV pool of that configuration.
    too_long = np.stack([prompt + o > max_len for o in outputs])
    fits = np.stack([~tl & (lay.peak_blocks_vec(prompt, o) <= lay.num_blocks)
                     for tl, lay, o in zip(too_long, layouts, outputs)])
    feasible = fits.any(axis=0)
    ctx, length_source = route_context(v, wl, costs, layouts, outputs, keys, config_of, fits, scn, sc, max_len,
                                       inflation, predictions)
    compared = next((i for i, (m, _t) in enumerate(keys) if m == v.method), 0)
    log = RequestLog(wl.prompt, outputs[compared])
    env = simpy.Environment()
    feed = Arrivals(env, wl)
    if slots:
        replicas = [SlotReplica(env, i, layouts[c], costs[c], sc, log, feed.on_done) for i, c in enumerate(config_of)]
    else:
        # Prefix caching keys blocks by what the prompts are made of; a reply as this
        # configuration generates it (its verbosity) is its own text.
        contents = [content_of(wl.structure, o) if wl.structure is not None else None for o in outputs]
        replicas = [Replica(env, i, layouts[c], costs[c], sc, log, feed.on_done, contents[c])
                    for i, c in enumerate(config_of)]
    # Event skipping (simulator/decode_run.py): a finished request changes nothing outside its
    # replica unless it triggers the next arrival (closed loop, sessions).
    for r in replicas:
        if not slots:
            r.skip = r.skip and not scn.step_by_step
            r.quiet = not feed.closed and feed.child is None
            r.horizon = feed
            # Behind a router a replica's run is cut only by a request sent to it: size its run
            # to about its share of the arrivals (the arrival len(replicas) ahead).
            r.spread = len(replicas)
    runners = [] if slots else replicas
    reads_state = len(replicas) > 1 and v.router != "round_robin"
    # Routers that read only load let a replica count a run's growth instead of applying its steps.
    load_reads = {"least_kv": "kv", "least_outstanding": "outstanding"}.get(v.router)
    router = Router(replicas, v.router, ctx)
    lay0 = layouts[compared]

    def reject(rid: int) -> None:
        p, o = int(log.prompt[rid]), int(log.output[rid])
        if too_long[compared, rid]:
            log.reject(rid, f"prompt+output {p + o} exceeds the {max_len}-token context window")
        elif len(keys) == 1 and len(v.members) == 1:
            log.reject(rid, f"needs {lay0.peak_blocks(p, o)} KV blocks, the replica has {lay0.num_blocks}")
        else:
            log.reject(rid, f"needs {lay0.peak_blocks(p, o)} KV blocks, no replica of the fleet holds that many")
        feed.on_done(rid)

    def dispatch(rid: int) -> None:
        log.arrival[rid] = env.now
        if not feasible[rid]:
            reject(rid)
            return
        if reads_state:               # replicas inside a run catch up to now before the router reads them
            for rep in runners:       # (a router that reads the columns: lazy steps written out too)
                if rep._run is not None or load_reads is None:
                    rep.sync(load_reads)
        r = router.pick(rid) if ctx is not None else router.pick()
        assert r is not None and fits[config_of[r.index], rid], "the router sent a request where it cannot fit"
        if len(keys) > 1:
            log.output[rid] = outputs[config_of[r.index]][rid]
        r.submit(rid)

    feed.start(dispatch)
    stopped = None
    if stop_on_miss and not slots and len(keys) == 1:
        from rkvsim.simulator.slo_stop import watch
        done = env.event()
        env.process(watch(env, log, replicas, stop_on_miss, done))
        stopped = env.run(until=done)
    else:
        env.run()
    return MethodRun(v.label, v.method, v.tp, layouts[compared], log, replicas, "; ".join(sorted({c.source for c in costs})),
                     variant=v, route_decisions=router.estimates, length_source=length_source,
                     configs=[f"{m.label}@tp{t}" for m, t in keys], stopped=stopped)


def simulate_method(scn: Scenario, method: Method, wl: Workload, tp: int | None = None,
                    cost: CostModel | None = None, label: str | None = None, inflation=None) -> MethodRun:
    """`simulate` of one method on `scn.replicas` identical replicas behind the scenario's router."""
    tp = tp or scn.tp_list[0]
    v = Variant(label or method.label, method, tp, scn.router, [Member(method, tp, scn.replicas)])
    return simulate(scn, v, wl, inflation=inflation, cost=cost)
