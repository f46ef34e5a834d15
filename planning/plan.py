"""`rkvsim plan`: per method, the fewest GPUs (replicas x TP) that meet every SLO at a rate, and
the highest rate that configuration sustains (bisection on the arrival rate), over seeds.

Seed noise is handled by stating it, not hiding it: a configuration's verdict is the share of
seeds in which it meets every SLO; the answer is the fewest GPUs with a configuration meeting
them in every seed, stated beside the best share one GPU count below ("3 would meet the SLO
in 40% of seeds") and each seed's own fewest. One more GPU count past the answer is checked,
and a drop there is reported as non-monotone rather than silently ignored.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from rkvsim.simulator.config import Scenario, ScenarioError
from rkvsim.simulator.slo_stop import BOUNDED, MissRule

from rkvsim.planning.backends import default_workers, local_pool, run_local
from rkvsim.planning.quality import negative_rate
from rkvsim.planning.slo import SLO, meets, slack
from rkvsim.planning.spec import build_scenario

OPEN_LOOP = ("poisson", "gamma", "constant")


@dataclass(frozen=True)
class Config:
    tp: int
    replicas: int

    @property
    def gpus(self) -> int:
        return self.tp * self.replicas

    def __str__(self) -> str:
        return f"{self.replicas} x TP{self.tp}"


@dataclass
class MethodPlan:
    method: str
    curve: list[dict] = field(default_factory=list)     # per evaluated config: gpus, tp, replicas, share, slack
    answer: dict | None = None
    below: dict | None = None                            # the smaller config meeting it in most seeds
    per_seed_gpus: list = field(default_factory=list)   # each seed's own fewest GPUs (None: none met)
    max_rate: dict | None = None
    negatives: dict | None = None
    notes: list[str] = field(default_factory=list)

    def sentence(self) -> str:
        if self.answer is None:
            top = max((c["gpus"] for c in self.curve), default=0)
            return f"no configuration up to {top} GPUs meets every SLO in every seed"
        a = self.answer
        s = f"{a['gpus']} GPUs ({a['config']})"
        b = self.below
        if b is None:
            s += "; no smaller configuration exists" if a["gpus"] == min(c["gpus"] for c in self.curve) else ""
        elif b["share"] > 0:
            s += f"; {b['gpus']} would meet the SLO in {b['share']:.0%} of seeds ({b['config']})"
        else:
            s += f"; {b['gpus']} met it in no seed"
        return s


@dataclass
class PlanResult:
    rate: float
    slos: list[SLO]
    seeds: list[int]
    methods: list[MethodPlan]
    verbosity: str
    cost_source: str
    runs: int
    stopped_early: int = 0     # simulations stopped once their miss was decided (the bisection's)


def configs_for(tps: list[int], max_gpus: int) -> list[Config]:
    return sorted((Config(tp, r) for tp in tps for r in range(1, max_gpus // tp + 1)), key=lambda c: (c.gpus, c.tp))


class Evaluator:
    """Runs (method, config, rate, seed) simulations in parallel, each once."""

    def __init__(self, base: dict, base_dir: str, workers: int, progress=None, early_stop: bool = True):
        self.base, self.base_dir, self.workers, self.progress = base, base_dir, workers, progress
        self.early_stop = early_stop
        self.pool = None          # worker processes kept across rounds (close() ends them)
        self.cache: dict[tuple, dict] = {}
        self.scale_requests_from: tuple[int, float] | None = None
        self.task = progress.add_task("planning", total=0) if progress is not None else None

    def overrides(self, method, cfg: Config, rate: float) -> dict:
        o = {"methods": [method], "tp": cfg.tp, "replicas": cfg.replicas, "fleet": None, "arms": None,
             "workload.arrival.rate": rate}
        if self.scale_requests_from:
            # The same arrival window at every rate: a fixed request count at a higher rate would
            # be a shorter burst that any fleet drains, not a load it sustains.
            n0, r0 = self.scale_requests_from
            o["workload.num_requests"] = max(1, round(n0 * rate / r0))
        return o

    def run(self, jobs: list[tuple], verdict_only: list[SLO] | None = None) -> dict[tuple, dict]:
        """jobs: (method entry, Config, rate, seed) -> the row of that simulation. With
        `verdict_only`, a simulation stops once it is certain to miss one of those objectives
        (simulator/slo_stop.py): its row is then a miss with no metrics, so only jobs whose
        verdict alone is used (the rate bisection) may pass it."""
        todo = [j for j in dict.fromkeys(jobs) if j not in self.cache]
        if self.progress is not None and todo:
            self.progress.update(self.task, total=self.progress.tasks[self.task].total + len(todo))
        rules = miss_rules(verdict_only) if verdict_only and self.early_stop else None
        calls = [(str(i), (self.base, self.base_dir, self.overrides(_hashable_back(j[0]), j[1], j[2]), j[3], 0, "",
                           rules)) for i, j in enumerate(todo)]

        def on_done(tid: str, rows: list) -> None:
            self.cache[todo[int(tid)]] = rows[0]
            if self.progress is not None:
                self.progress.advance(self.task)

        if self.workers > 1 and self.pool is None and calls:
            self.pool = local_pool(self.workers)
        run_local(calls, on_done, self.workers, self.pool)
        return {j: self.cache[j] for j in jobs}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def miss_rules(slos: list[SLO]) -> list[MissRule]:
    """The objectives whose miss can be decided part-way through a run (not the ITL histogram's)."""
    out = []
    for s in slos:
        column, stat = s.column.rsplit("_", 1)
        if column in BOUNDED:
            out.append(MissRule(column, stat, s.limit_s))
    return out


def _hashable(entry):
    return entry if isinstance(entry, str) else tuple(sorted(entry.items()))


def _hashable_back(h):
    return h if isinstance(h, str) else dict(h)


def check_plannable(scn: Scenario) -> None:
    if scn.workload.arrival.process not in OPEN_LOOP:
        raise ScenarioError(f"workload.arrival: plan varies the arrival rate, so it needs process "
                            f"{' / '.join(OPEN_LOOP)}, not {scn.workload.arrival.process}")


def plan(base: dict, base_dir: str, rate: float, slos: list[SLO], tps: list[int], max_gpus: int,
         seeds: list[int], bisect_steps: int = 5, max_doublings: int = 3, full_curve: bool = False,
         scores_dir=None, workers: int | None = None, progress=None, verbosity: str = "",
         early_stop: bool = True) -> PlanResult:
    scn = build_scenario(base, {})
    check_plannable(scn)
    if rate <= 0:
        raise ScenarioError("--rate: give a positive arrival rate in requests/s")
    configs = configs_for(tps, max_gpus)
    if not configs:
        raise ScenarioError(f"--max-gpus {max_gpus}: no configuration with TP in {tps} fits; raise it")
    ev = Evaluator(base, base_dir, workers or default_workers(), progress, early_stop)
    try:
        ev.scale_requests_from = (scn.workload.num_requests, rate)
        entries = {m.label: _hashable(e) for m, e in zip(scn.method_list, scn.methods)}
        plans = {lb: MethodPlan(lb) for lb in entries}
        counts = sorted({c.gpus for c in configs})
        searching = set(entries)
        extra = {}   # method -> the one GPU count checked past its answer
        for g in counts:
            active = [lb for lb in entries if lb in searching or extra.get(lb) == g or (full_curve and lb in plans)]
            if not active:
                if not searching and all(e <= g for e in extra.values()):
                    break
                continue
            at_g = [c for c in configs if c.gpus == g]
            rows = ev.run([(entries[lb], c, rate, s) for lb in active for c in at_g for s in seeds])
            for lb in active:
                mp = plans[lb]
                for c in at_g:
                    rs = [rows[(entries[lb], c, rate, s)] for s in seeds]
                    ok = [meets(r, slos) for r in rs]
                    mp.curve.append({"gpus": g, "tp": c.tp, "replicas": c.replicas, "config": str(c),
                                     "share": sum(ok) / len(ok), "met": ok,
                                     "slack": statistics.fmean(min(slack(r, slos), 1e9) for r in rs),
                                     **{s.name: _mean([s.value(r) for r in rs]) for s in slos}})
                best = max((x for x in mp.curve if x["gpus"] == g), key=lambda x: (x["share"], -x["slack"]))
                if lb in searching and best["share"] == 1.0:
                    mp.answer = best
                    prev = [x for x in mp.curve if x["gpus"] < g]
                    if prev:
                        # The smaller configuration closest to meeting it: highest share, then fewest GPUs.
                        mp.below = max(prev, key=lambda x: (x["share"], -x["gpus"], -x["slack"]))
                    searching.discard(lb)
                    # Monotone check: one more replica of the answer's shape must meet it too.
                    if g + best["tp"] <= max_gpus:
                        extra[lb] = g + best["tp"]
                elif mp.answer is not None and g > mp.answer["gpus"]:
                    same = [x for x in mp.curve if x["gpus"] == g and x["tp"] == mp.answer["tp"]]
                    if same and same[0]["share"] < 1.0:
                        mp.notes.append(f"non-monotone within seed noise: {same[0]['config']} met the SLO in "
                                        f"{same[0]['share']:.0%} of seeds, {mp.answer['config']} in all")
        for mp in plans.values():
            mp.per_seed_gpus = [min((x["gpus"] for x in mp.curve if x["met"][i]), default=None) for i in range(len(seeds))]
        _max_rates(ev, plans, entries, rate, slos, seeds, bisect_steps, max_doublings)
        for lb, mp in plans.items():
            mp.negatives = negative_rate(scn.method_list[list(entries).index(lb)], scores_dir)
        sources = sorted({r.get("cost_source", "") for r in ev.cache.values() if r.get("cost_source")})
        stopped = sum(str(r.get("status", "")).startswith("stopped") for r in ev.cache.values())
        return PlanResult(rate, slos, seeds, list(plans.values()), verbosity, ", ".join(sources), len(ev.cache), stopped)
    finally:
        ev.close()


def _mean(v: list[float]) -> float | None:
    v = [x for x in v if math.isfinite(x)]
    return statistics.fmean(v) if v else None


def _max_rates(ev: Evaluator, plans: dict, entries: dict, rate: float, slos, seeds, steps: int, doublings: int):
    """Per method at its answer configuration and per seed: double the rate until the SLO breaks,
    then bisect between the last rate met and the first one missed. The request count scales with
    the rate (Evaluator.overrides), so every rate is judged over the same arrival window."""
    state = {}
    for lb, mp in plans.items():
        if mp.answer is not None:
            cfg = Config(mp.answer["tp"], mp.answer["replicas"])
            for i, s in enumerate(seeds):
                state[(lb, s)] = [cfg, rate, None]           # config, lo (met), hi (missed)
    for _ in range(doublings):
        jobs = {k: (entries[k[0]], v[0], v[1] * 2, k[1]) for k, v in state.items() if v[2] is None}
        if not jobs:
            break
        rows = ev.run(list(jobs.values()), verdict_only=slos)
        for k, j in jobs.items():
            if meets(rows[j], slos):
                state[k][1] = j[2]
            else:
                state[k][2] = j[2]
    for _ in range(steps):
        jobs = {k: (entries[k[0]], v[0], (v[1] + v[2]) / 2, k[1]) for k, v in state.items() if v[2] is not None}
        if not jobs:
            break
        rows = ev.run(list(jobs.values()), verdict_only=slos)
        for k, j in jobs.items():
            state[k][1 if meets(rows[j], slos) else 2] = j[2]
    for lb, mp in plans.items():
        per = [(state[(lb, s)][1], state[(lb, s)][2] is None) for s in seeds if (lb, s) in state]
        if per:
            vals = [v for v, _ in per]
            missed = [state[(lb, s)][2] for s in seeds if (lb, s) in state]
            mp.max_rate = {"config": mp.answer["config"], "per_seed": vals, "median": statistics.median(vals),
                           "min": min(vals), "max": max(vals), "lower_bound": any(b for _, b in per),
                           "missed_at": missed}


def to_json(res: PlanResult) -> dict:
    return {"schema_version": 1, "rate": res.rate, "slo": [str(s) for s in res.slos], "seeds": res.seeds,
            "verbosity": res.verbosity, "cost_source": res.cost_source, "simulations": res.runs,
            "simulations_stopped_early": res.stopped_early,
            "methods": {mp.method: {"answer": mp.answer and {k: v for k, v in mp.answer.items() if k != "met"},
                                    "statement": mp.sentence(), "below": mp.below and {k: v for k, v in mp.below.items() if k != "met"},
                                    "per_seed_gpus": mp.per_seed_gpus, "max_rate": mp.max_rate,
                                    "negative_samples": mp.negatives, "notes": mp.notes,
                                    "curve": mp.curve} for mp in res.methods}}
