"""Mixed fleets and routing experiments: which (router, fleet) set-ups a scenario compares, and
simulating one of them.

A plain scenario (no `fleet:`, no `arms:`, a non-predictive router) runs through
engine.simulate_method unchanged, so its numbers are those of `rkvsim run` before fleets
existed. Otherwise each replica gets its own layout, cost model (always from
engine.make_cost_model, so calibrated costs flow in) and output lengths (per method, with the
scenario's verbosity), and the router sees per-request predictions computed up front.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simpy

from rkvsim.models import Method, resolve_hardware, resolve_model

from rkvsim.models import method_from_entry
from rkvsim.simulator.config import Scenario
from rkvsim.simulator.cost_model import StepBatch
from rkvsim.simulator.simulation import Arrivals, MethodRun, Workload, make_cost_model, simulate_method, variants
from rkvsim.simulator.fleet_schema import PREDICTIVE, Arm
from rkvsim.simulator.kv_memory import kv_layout
from rkvsim.simulator.records import RequestLog
from rkvsim.simulator.replica import Replica
from rkvsim.simulator.router import DecodeTable, RouteContext, Router
from rkvsim.simulator.verbosity import method_outputs, method_ratios

_EMPTY = np.zeros(0, np.int64)


@dataclass(frozen=True)
class Member:
    """A group of identical replicas."""
    method: Method
    tp: int
    replicas: int


@dataclass
class Variant:
    label: str
    method: Method                 # the method being compared (the first group's for a fixed fleet)
    tp: int
    router: str
    members: list[Member]
    arm: str = ""

    @property
    def gpus(self) -> int:
        return sum(m.replicas * m.tp for m in self.members)

    @property
    def fleet_label(self) -> str:
        return "+".join(f"{m.replicas}x{m.method.label}" + (f"@tp{m.tp}" if m.tp > 1 else "") for m in self.members)

    def describe(self) -> dict:
        return {"method": self.method.label, "tp": self.tp, "arm": self.arm or None, "router": self.router,
                "fleet": self.fleet_label, "gpus": self.gpus}


def uses_fleets(scn: Scenario) -> bool:
    return bool(scn.fleet or scn.arms or scn.router in PREDICTIVE)


def plan_variants(scn: Scenario) -> list[Variant]:
    """Every (method, TP, arm) set-up the scenario compares, labelled for the results table."""
    tps = scn.tp_list
    if not uses_fleets(scn):
        return [Variant(lb, m, tp, scn.router, [Member(m, tp, scn.replicas)]) for lb, m, tp in variants(scn)]
    arms = scn.arms or [Arm(name="_", router=None, fleet=None)]
    named = scn.arms is not None
    out: list[Variant] = []

    def suffix(arm: Arm, tp: int) -> str:
        return (f"/{arm.name}" if named else "") + (f"@tp{tp}" if len(tps) > 1 else "")

    for tp in tps:
        for m in scn.method_list:
            for arm in arms:
                fleet = arm.fleet or scn.fleet
                if fleet is not None and all(e.method is not None for e in fleet):
                    continue  # a fixed fleet does not depend on the compared method: once per tp below
                members = ([Member(m, tp, scn.replicas)] if fleet is None else
                           [Member(m if e.method is None else method_from_entry(e.method), e.tp or tp, e.replicas)
                            for e in fleet])
                v = Variant("", m, tp, arm.router or scn.router, members, arm.name if named else "")
                base = m.label if (named or fleet is None) else v.fleet_label
                v.label = base + suffix(arm, tp)
                out.append(v)
        for arm in arms:
            fleet = arm.fleet or scn.fleet
            if fleet is not None and all(e.method is not None for e in fleet):
                members = [Member(method_from_entry(e.method), e.tp or tp, e.replicas) for e in fleet]
                v = Variant("", members[0].method, tp, arm.router or scn.router, members, arm.name if named else "")
                v.label = (arm.name if named else v.fleet_label) + (f"@tp{tp}" if len(tps) > 1 else "")
                out.append(v)
    labels = [v.label for v in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"arms: set-ups {dup} would share a label; give the arms distinct names")
    return out


# ---------------------------------------------------------------- predicted lengths

@dataclass
class LengthPredictions:
    fp16: np.ndarray          # predicted uncompressed response tokens per request
    source: str               # what predicted them, for the results


def predict_lengths(scn: Scenario, wl: Workload) -> LengthPredictions:
    """Uncompressed response length per request, predicted from its prompt size alone (the
    workload holds token counts, not texts), for all requests at once before simulating."""
    choice = scn.routing.length_predictor
    if choice != "workload_mean":
        from rkvsim.calibration.lengths import predictor as lp
        path = lp.default_path() if choice == "default" else Path(choice)
        try:
            pred, side = _load_predictor(str(path), path.stat().st_mtime_ns if path.is_file() else 0)
            out = pred.predict([int(p) for p in wl.prompt])
            return LengthPredictions(out, f"length predictor {path.name} (length-only model, "
                                          f"{side.get('n_train', '?')} ShareGPT rows)")
        except (FileNotFoundError, ImportError, ValueError) as e:   # ValueError: another schema
            if choice != "default":
                raise ValueError(f"routing.length_predictor: {e}; fit one with rkvsim lengths train "
                                 "or set routing.length_predictor: workload_mean") from None
            reason = "no trained length predictor" if isinstance(e, FileNotFoundError) else f"cannot load it ({e})"
            return LengthPredictions(np.full(len(wl.output), float(wl.output.mean())),
                                     f"workload mean ({reason}; run rkvsim lengths train)")
    return LengthPredictions(np.full(len(wl.output), float(wl.output.mean())), "workload mean")


@functools.lru_cache(maxsize=4)
def _load_predictor(path: str, _mtime: int):
    """Loaded once per process (a sweep predicts for thousands of workloads); keyed on mtime so
    that a retrained artifact is picked up."""
    from rkvsim.calibration.lengths import predictor as lp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a scikit-learn version note; the sidecar records it
        return lp.load(path)


# ---------------------------------------------------------------- simulation

@dataclass
class FleetRun(MethodRun):
    variant: Variant | None = None
    route_decisions: int = 0
    length_source: str = ""
    configs: list = field(default_factory=list)


def simulate_variant(scn: Scenario, v: Variant, wl: Workload, inflation=None,
                     predictions: LengthPredictions | None = None) -> MethodRun:
    """One set-up on one workload. Plain set-ups go through engine.simulate_method."""
    if len(v.members) == 1 and v.router not in PREDICTIVE:
        m = v.members[0]
        plain = scn.model_copy(update={"replicas": m.replicas, "router": v.router})
        return simulate_method(plain, m.method, wl, tp=m.tp, label=v.label, inflation=inflation)
    return simulate_fleet(scn, v, wl, inflation, predictions)


def _decode_table(cost, max_batch: int, max_len: int) -> DecodeTable:
    bs = sorted({int(b) for b in np.unique(np.geomspace(1, max_batch, 9).round())} | {1, max_batch})
    if len(bs) == 1:
        bs = [1, 2]
    cs = sorted({int(c) for c in np.geomspace(16, max(max_len, 32), 10).round()})
    rows = []
    for b in bs:
        row = []
        for c in cs:
            ctxv = np.full(b, c, np.int64)
            row.append(cost.step_time(StepBatch(_EMPTY, _EMPTY, ctxv, ctxv)))
        rows.append(row)
    return DecodeTable([float(np.log(b)) for b in bs], [float(c) for c in cs], rows)


def _prefill_seconds(cost, prompt: np.ndarray) -> np.ndarray:
    uniq, inv = np.unique(prompt, return_inverse=True)
    t = np.array([cost.step_time(StepBatch(np.array([p], np.int64), np.zeros(1, np.int64), _EMPTY, _EMPTY))
                  for p in uniq.tolist()])
    return t[inv]


def simulate_fleet(scn: Scenario, v: Variant, wl: Workload, inflation=None,
                   predictions: LengthPredictions | None = None) -> FleetRun:
    model, hw = resolve_model(scn.model), resolve_hardware(scn.hardware)
    sc = scn.scheduler
    max_len = sc.max_model_len or model.max_position
    prompt = wl.prompt.astype(np.int64)
    # One configuration per distinct (method, tp): layout, cost model, output lengths.
    keys = list(dict.fromkeys((m.method, m.tp) for m in v.members))
    layouts, costs, outputs = [], [], []
    for method, tp in keys:
        layouts.append(kv_layout(model, hw, method, tp, sc.block_size, sc.gpu_memory_utilization,
                                 sc.max_batched_tokens, sc.max_batch_size))
        costs.append(make_cost_model(scn, method, tp))
        outputs.append(np.asarray(method_outputs(method, wl.prompt, wl.output, inflation, max_len), np.int64))
    config_of = [keys.index((m.method, m.tp)) for m in v.members for _ in range(m.replicas)]
    # The same admission rule as engine.simulate_method, per configuration.
    fits = np.stack([(prompt + o <= max_len) & (lay.blocks_for_vec(prompt + o) <= lay.num_blocks)
                     for lay, o in zip(layouts, outputs)])
    ctx = None
    length_source = ""
    if v.router in PREDICTIVE:
        if v.router == "oracle":
            believed = np.stack(outputs).astype(float)
            length_source = "true lengths (oracle)"
        else:
            predictions = predictions or predict_lengths(scn, wl)
            believed = np.stack([predictions.fp16 * method_ratios(method, predictions.fp16, inflation)
                                 for method, _tp in keys])
            length_source = predictions.source
        prefill = np.stack([_prefill_seconds(c, prompt) for c in costs])
        ctx = RouteContext(
            config_of=config_of, fits=fits, prefill_s=prefill, length=believed,
            mean_prefill_s=prefill.mean(axis=1),
            mean_blocks=np.array([lay.blocks_for_vec(prompt).mean() for lay in layouts]),
            decode=[_decode_table(c, sc.max_batch_size, max_len) for c in costs])
    compared = next((i for i, (m, _t) in enumerate(keys) if m == v.method), 0)
    log = RequestLog(wl.prompt, outputs[compared])
    env = simpy.Environment()
    feed = Arrivals(env, wl)
    on_done = feed.on_done
    replicas = [Replica(env, i, layouts[c], costs[c], sc, log, on_done) for i, c in enumerate(config_of)]
    router = Router(replicas, v.router, ctx)
    # Without a context the router would not filter: give it one with feasibility only.
    if ctx is None and len(keys) > 1:
        router.ctx = RouteContext(config_of, fits, None, None, None, None, None)

    def dispatch(rid: int) -> None:
        log.arrival[rid] = env.now
        r = router.pick(rid) if len(keys) > 1 or ctx is not None else router.pick()
        if r is not None and not fits[config_of[r.index], rid]:
            r = None  # a single-configuration fleet whose pool cannot hold the request
        if r is None:
            p, o = int(prompt[rid]), int(outputs[compared][rid])
            lay = layouts[compared]
            if p + o > max_len:
                log.reject(rid, f"prompt+output {p + o} exceeds the {max_len}-token context window")
            else:
                log.reject(rid, f"needs {lay.blocks_for(p + o)} KV blocks, no replica of the fleet holds that many")
            on_done(rid)
            return
        log.output[rid] = outputs[config_of[r.index]][rid]
        r.submit(rid)

    feed.start(dispatch)
    env.run()
    sources = sorted({c.source for c in costs})
    return FleetRun(v.label, v.method, v.tp, layouts[compared], log, replicas, "; ".join(sources),
                    variant=v, route_decisions=router.estimates, length_source=length_source,
                    configs=[f"{m.label}@tp{t}" for m, t in keys])
