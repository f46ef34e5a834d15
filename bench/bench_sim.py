"""Simulator speed and memory: N ShareGPT-length requests on one LLaMA-2-7B / A6000 replica.

    python bench/bench_sim.py --requests 1000000 --method fp16

Prints simulated requests per wall second, engine steps per second, SimPy events, how many
steps the event skipping covered, peak RSS and, with --compare N, the same workload's first N
requests simulated in both modes (step_by_step true and false): their wall times, the ratio,
and whether every per-request figure and step row is identical.
Goal (issue 18): 1,000,000 requests in <= 60 s on one core within 2 GB.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--method", default="fp16")
    ap.add_argument("--rate", type=float, default=12.0, help="Poisson arrivals per second")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default="vllm-v1", help="scheduler.policy (vllm-v1, vllm-v0, lmdeploy)")
    ap.add_argument("--no-prefix-caching", action="store_true", help="vllm-v1 without its prefix cache")
    ap.add_argument("--step-by-step", action="store_true", help="no event skipping (the reference mode)")
    ap.add_argument("--compare", type=int, default=0, metavar="N",
                    help="also simulate the first N requests in both modes and print the ratio")
    ap.add_argument("--phases", action="store_true",
                    help="time the simulator's phases (scheduler, run planning and applying, step costs, "
                         "finishing) in this run; the wrappers add their own time to the wall")
    args = ap.parse_args()

    from rkvsim.simulator.config import Scenario
    from rkvsim.simulator.pipeline import run_scenario
    from rkvsim.simulator.simulation import build_workload

    scn = Scenario.model_validate({
        "name": "bench", "model": "llama-2-7b", "hardware": "a6000", "methods": [args.method],
        "scheduler": {"policy": args.policy, "max_batch_size": args.max_batch, "max_batched_tokens": 8192,
                      **({"enable_prefix_caching": False} if args.no_prefix_caching else {})},
        "workload": {"num_requests": args.requests, "arrival": {"process": "poisson", "rate": args.rate},
                     "lengths": {"source": "sharegpt", "max_prompt": 2048, "max_output": 2048}},
        "step_by_step": args.step_by_step,
    })
    phases = instrument()[0] if args.phases else None
    t0 = time.perf_counter()
    wl = build_workload(scn, args.seed, ".")
    t1 = time.perf_counter()
    (run,) = run_scenario(scn, args.seed, workload=wl, inflation=None).runs
    t2 = time.perf_counter()
    steps = sum(len(r.steps) for r in run.replicas)
    covered = sum(r.run_steps for r in run.replicas)
    runs = sum(r.runs for r in run.replicas)
    passed = sum(r.passed for r in run.replicas)
    # engine events (a run is one, a step finished in passing none) + one arrival each
    events = steps - covered - passed + runs + args.requests
    done = int(np.isfinite(run.log.finish).sum())
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sim_s = float(np.nanmax(run.log.finish))
    print(f"policy            {args.policy}{' (no prefix caching)' if args.no_prefix_caching else ''}")
    print(f"requests          {args.requests:,} ({done:,} completed, {int(run.log.rejected.sum()):,} rejected)")
    print(f"workload build    {t1 - t0:.2f} s")
    print(f"simulation wall   {t2 - t1:.2f} s  ({sim_s:,.0f} simulated s, {steps:,} engine steps)")
    print(f"requests / wall s {args.requests / (t2 - t1):,.0f}")
    print(f"steps / wall s    {steps / (t2 - t1):,.0f}")
    print(f"skipping          {covered:,} of the steps in {runs:,} runs ({covered / max(runs, 1):.1f} steps per run), "
          f"{passed:,} finished in passing; {events:,} engine + arrival events")
    print(f"peak RSS          {rss_mb:,.0f} MB")
    if phases is not None:
        report_phases(phases, t2 - t1, args.requests)
    if args.compare:
        compare(scn, wl, args.compare, args.seed)


# (label, owner, attribute) that --phases times. An indented label is part of the one above it
# (called from inside it); the rest of the wall is SimPy, arrivals, the step log and metrics.
PHASES = [
    ("scheduler plan", "replica.Replica", "_plan_v1"),
    ("scheduler plan", "replica.Replica", "_plan_short"),
    ("scheduler plan", "replica.Replica", "_plan_v0"),
    ("scheduler plan", "replica.Replica", "_plan_lmdeploy"),
    ("  admission", "replica.Replica", "_admit_v1"),
    ("  admission", "replica.Replica", "_admit"),
    ("run planning", "replica", "plan_run"),
    ("  run costs", "calibrated.CalibratedCostModel", "decode_run"),
    ("run applying", "replica.Replica", "_apply_run"),
    ("decode step cost", "calibrated.CalibratedCostModel", "decode_step_held"),
    ("mixed step cost", "calibrated.CalibratedCostModel", "mixed_step_held"),
    ("finish decode step", "replica.Replica", "_finish_decode_step"),
    ("finish prefills", "replica.Replica", "_finish_prefills"),
]


def _timed(fn, slot: list):
    """fn, adding each call's seconds and count to slot [calls, seconds]."""
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            slot[1] += time.perf_counter() - t
            slot[0] += 1
    return wrapper


def instrument():
    """Wrap each of PHASES in a timer (before any replica or cost model is built, which bind
    their methods at construction). Returns ({label: [calls, seconds]}, filled as the run goes,
    and a function that puts the originals back)."""
    import importlib

    acc: dict[str, list] = {}
    originals = []
    for label, owner, attr in PHASES:
        mod, _, cls = owner.partition(".")
        target = importlib.import_module(f"rkvsim.simulator.{mod}")
        if cls:
            target = getattr(target, cls)
        if attr in vars(target):
            originals.append((target, attr, vars(target)[attr]))
            setattr(target, attr, _timed(getattr(target, attr), acc.setdefault(label, [0, 0.0])))

    def undo() -> None:
        for target, attr, fn in reversed(originals):
            setattr(target, attr, fn)
    return acc, undo


def _timer_cost(calls: int = 100_000) -> float:
    """Seconds a timed call adds to a bare one (the wrapper around a function that does nothing)."""
    def bare():
        return None
    timed = _timed(bare, [0, 0.0])
    t = time.perf_counter()
    for _ in range(calls):
        bare()
    t_bare = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(calls):
        timed()
    return max(time.perf_counter() - t - t_bare, 0.0) / calls


def report_phases(acc: dict, wall: float, requests: int) -> None:
    print(f"phases            (a timer adds about {_timer_cost() * 1e6:.2f} us per call to the wall)")
    top = 0.0
    for label, (calls, secs) in acc.items():
        if not calls:
            continue
        top += 0.0 if label.startswith(" ") else secs
        print(f"  {label:<20} {calls:>11,} calls {secs:8.2f} s {secs / calls * 1e6:8.1f} us/call "
              f"{secs / requests * 1e6:7.1f} us/request {100 * secs / wall:5.1f}%")
    rest = wall - top
    print(f"  {'rest (SimPy, log)':<20} {'':>17} {rest:8.2f} s {'':>16} {rest / requests * 1e6:7.1f} us/request "
          f"{100 * rest / wall:5.1f}%")


def compare(scn, wl, n: int, seed: int) -> None:
    """Both modes on the first n requests of the same workload: wall times, ratio, identity."""
    from dataclasses import replace

    from rkvsim.simulator.pipeline import run_scenario

    sub = replace(wl, prompt=wl.prompt[:n], output=wl.output[:n], arrivals=wl.arrivals[:n])
    out = {}
    for step in (True, False):
        s = scn.model_copy(update={"step_by_step": step,
                                   "workload": scn.workload.model_copy(update={"num_requests": n})})
        t0 = time.perf_counter()
        (r,) = run_scenario(s, seed, workload=sub, inflation=None).runs
        out[step] = (time.perf_counter() - t0, r)
    (ta, a), (tb, b) = out[True], out[False]
    same = all(np.array_equal(getattr(a.log, f), getattr(b.log, f), equal_nan=True)
               for f in ("first_token", "finish", "itl_max")) and np.array_equal(a.log.itl_hist, b.log.itl_hist) \
        and all(getattr(x.steps, f) == getattr(y.steps, f) for x, y in zip(a.replicas, b.replicas)
                for f in ("t_end", "dt", "batch", "kv_fraction"))
    print(f"compare ({n:,} req) step-by-step {ta:.2f} s, skipping {tb:.2f} s: x{ta / tb:.2f} faster; "
          f"identical results: {same}")


if __name__ == "__main__":
    main()
