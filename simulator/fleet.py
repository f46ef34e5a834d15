"""Which set-ups a scenario compares (a method at a TP degree, or a (router, fleet) arm of mixed
replicas), and the routing inputs computed before a simulation starts: per-request length
predictions and, per replica configuration, prefill seconds and a decode-step table.

A plain scenario (no `fleet:`, no `arms:`, a non-predictive router) is one set-up per method and
TP degree, each a single group of `replicas` identical replicas; simulator/simulation.py runs
every set-up through the same loop.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rkvsim.models import Method, method_from_entry
from rkvsim.simulator.config import Scenario
from rkvsim.simulator.cost_model import StepBatch
from rkvsim.simulator.fleet_schema import PREDICTIVE, Arm
from rkvsim.simulator.router import DecodeTable, RouteContext
from rkvsim.simulator.verbosity import method_ratios

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
    scheduler: dict | None = None  # the arm's scheduler changes (fleet_schema.Arm.scheduler)

    @property
    def gpus(self) -> int:
        return sum(m.replicas * m.tp for m in self.members)

    @property
    def fleet_label(self) -> str:
        return "+".join(f"{m.replicas}x{m.method.label}" + (f"@tp{m.tp}" if m.tp > 1 else "") for m in self.members)

    def describe(self) -> dict:
        return {"method": self.method.label, "tp": self.tp, "arm": self.arm or None, "router": self.router,
                "fleet": self.fleet_label, "gpus": self.gpus}


def variants(scn: Scenario) -> list[tuple[str, Method, int]]:
    """(label, method, tp) for every method at every TP degree the scenario compares."""
    tps = scn.tp_list
    return [(m.label if len(tps) == 1 else f"{m.label}@tp{tp}", m, tp) for tp in tps for m in scn.method_list]


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
                v = Variant("", m, tp, arm.router or scn.router, members, arm.name if named else "", arm.scheduler)
                base = m.label if (named or fleet is None) else v.fleet_label
                v.label = base + suffix(arm, tp)
                out.append(v)
        for arm in arms:
            fleet = arm.fleet or scn.fleet
            if fleet is not None and all(e.method is not None for e in fleet):
                members = [Member(method_from_entry(e.method), e.tp or tp, e.replicas) for e in fleet]
                v = Variant("", members[0].method, tp, arm.router or scn.router, members, arm.name if named else "",
                            arm.scheduler)
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


def predict_lengths(scn: Scenario, wl) -> LengthPredictions:
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


def route_context(v: Variant, wl, costs: list, layouts: list, outputs: list, keys: list, config_of: list[int],
                  fits: np.ndarray, scn: Scenario, sc, max_len: int, inflation,
                  predictions: LengthPredictions | None) -> tuple[RouteContext | None, str]:
    """What the router knows before the simulation starts, and where its lengths came from
    (`sc`: the set-up's scheduler, an arm's changes applied)."""
    if v.router not in PREDICTIVE:
        # Several configurations: the router filters by feasibility only.
        return (RouteContext(config_of, fits, None, None, None, None, None) if len(keys) > 1 else None), ""
    prompt = wl.prompt.astype(np.int64)
    if v.router == "oracle":
        believed = np.stack(outputs).astype(float)
        source = "true lengths (oracle)"
    else:
        predictions = predictions or predict_lengths(scn, wl)
        believed = np.stack([predictions.fp16 * method_ratios(method, predictions.fp16, inflation)
                             for method, _tp in keys])
        source = predictions.source
    prefill = np.stack([_prefill_seconds(c, prompt) for c in costs])
    ctx = RouteContext(
        config_of=config_of, fits=fits, prefill_s=prefill, length=believed,
        mean_prefill_s=prefill.mean(axis=1),
        mean_blocks=np.array([lay.prefill_blocks_vec(prompt).mean() for lay in layouts]),
        decode=[_decode_table(c, sc.max_batch_size, max_len) for c in costs])
    return ctx, source
