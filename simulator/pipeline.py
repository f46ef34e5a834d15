"""One way to run a scenario: `run_scenario` builds the workload (or takes one), fits the length
inflation, lists the set-ups, predicts lengths where a router needs them, simulates every set-up
through simulation.simulate and summarises. `rkvsim run`, the sweep and plan tasks,
validate-serving and the benches all call it, so none of them can drift from another."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rkvsim.models import BASELINE
from rkvsim.simulator.config import Scenario
from rkvsim.simulator.fleet import LengthPredictions, Variant, plan_variants, predict_lengths, uses_fleets
from rkvsim.simulator.kv_memory import DoesNotFitError
from rkvsim.simulator.outputs import build_summary
from rkvsim.simulator.simulation import MethodRun, Workload, build_workload, simulate
from rkvsim.simulator.verbosity import load_inflation

LOAD = "load"   # inflation=LOAD: fit it from the scenario's `verbosity:` (None when off)


@dataclass
class ScenarioRun:
    scenario: Scenario
    seed: int
    workload: Workload
    inflation: object
    variants: list[Variant]
    runs: list[MethodRun]
    predictions: LengthPredictions | None = None
    does_not_fit: dict[str, str] = field(default_factory=dict)   # label -> why (keep_going=True)
    wall_s: float = 0.0

    def extra(self) -> dict:
        """The scenario-level fields of summary.json."""
        scn, inflation = self.scenario, self.inflation
        verbosity = "none" if inflation is None else \
            f"inflation model fitted on {scn.verbosity.data} ({inflation.info['n_prompts']} prompts)"
        if inflation is not None:
            missing = sorted({v.method.kind for v in self.variants
                              if v.method.family != BASELINE and not inflation.has_kind(v.method.kind)})
            if missing:
                verbosity += f"; no generations of {', '.join(missing)}: FP16's lengths"
        out = {"model": scn.model, "hardware": scn.hardware, "tp": scn.tp, "replicas": scn.replicas,
               "router": scn.router, "num_requests": int(len(self.workload.prompt)), "verbosity": verbosity}
        if uses_fleets(scn):
            out["setups"] = {v.label: v.describe() for v in self.variants}
            out["length_predictions"] = self.predictions.source if self.predictions else None
        return out

    def summary(self) -> dict:
        return build_summary(self.scenario.name, self.seed, self.runs, self.extra())


def run_scenario(scn: Scenario, seed: int | None = None, base_dir: Path | str = ".", *,
                 workload: Workload | None = None, inflation=LOAD, labels: list[str] | None = None,
                 keep_going: bool = False, on_variant: Callable[[Variant, int, int], None] | None = None,
                 stop_on_miss: list | None = None) -> ScenarioRun:
    """Simulate every set-up of `scn` (or those whose labels are listed) on one workload.

    A set-up whose model does not fit raises DoesNotFitError, or with keep_going is recorded in
    `does_not_fit` and skipped (a sweep reports it as a row). `on_variant(v, i, n)` is called
    before the i-th of n set-ups (progress). `stop_on_miss`: simulation.simulate's (a run
    stopped early says so in MethodRun.stopped; only its verdict is meaningful)."""
    base_dir = Path(base_dir)
    seed = scn.seed if seed is None else seed
    wl = workload if workload is not None else build_workload(scn, seed, base_dir)
    if inflation == LOAD:
        inflation = load_inflation(scn, base_dir)
    todo = plan_variants(scn)
    if labels is not None:
        todo = [v for v in todo if v.label in labels]
    preds = predict_lengths(scn, wl) if any(v.router == "compression_aware" for v in todo) else None
    res = ScenarioRun(scn, seed, wl, inflation, todo, [], preds)
    t0 = time.perf_counter()
    for i, v in enumerate(todo):
        if on_variant:
            on_variant(v, i, len(todo))
        try:
            res.runs.append(simulate(scn, v, wl, inflation=inflation, predictions=preds, stop_on_miss=stop_on_miss))
        except DoesNotFitError as e:
            if not keep_going:
                raise
            res.does_not_fit[v.label] = str(e)
    res.wall_s = time.perf_counter() - t0
    return res
