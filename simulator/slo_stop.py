"""Stopping a simulation once it is certain to miss an objective.

A capacity plan's rate bisection needs only each simulation's verdict, and the simulations that
miss (a queue that grows without bound) are the longest. Part-way through a run every request's
latency has a lower bound: its value once it finished; otherwise the time it has already spent
(it cannot finish, or get its first token, before now); zero before it arrives. The mean and
numpy's linearly interpolated percentiles never decrease when any input grows, so a statistic
of the lower bounds above the limit means the finished run's statistic is above it too: the
verdict "missed" is decided, and the rest of the run would only confirm it. A rejected request
decides it as well (a set-up that rejects requests meets no objective; planning/slo.py).

Only objectives with such a bound are watched (TTFT, TPOT, E2E, queueing; not the inter-token
histogram). The watch only reads: a replica inside a skipped run (simulator/decode_run.py) has
applied its steps up to some time, and no request of it can finish before that, so the bounds
use the earliest such time (Replica.settled) instead of now. A run that is not stopped is therefore
the run without the watch, number for number.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rkvsim.simulator.metrics import latency_columns

BOUNDED = ("ttft_s", "tpot_s", "e2e_s", "queue_s")
STATS = ("mean", "p50", "p90", "p99")
# The bound must beat the limit by more than numpy's rounding of an interpolated percentile.
MARGIN = 1e-9


@dataclass(frozen=True)
class MissRule:
    """An objective whose verdict is all the caller needs: `column` (ttft_s, tpot_s, e2e_s,
    queue_s) at `stat` (mean, p50, p90, p99) at most `limit_s`."""
    column: str
    stat: str
    limit_s: float

    def __post_init__(self):
        assert self.column in BOUNDED and self.stat in STATS and self.limit_s > 0, self


def lower_bounds(log, column: str, now: float) -> np.ndarray:
    """Per request, the least value `column` can still take, for the requests the finished
    run's statistic will count (metrics.latency_columns: TPOT only where output > 1)."""
    final = latency_columns(log)[column]
    if column == "tpot_s":
        started = np.isfinite(log.first_token)
        so_far = np.where(started, (now - np.where(started, log.first_token, 0.0)) / np.maximum(log.output - 1, 1), 0.0)
        return np.where(np.isfinite(final), final, so_far)[log.output > 1]
    arrived = np.isfinite(log.arrival)
    return np.where(np.isfinite(final), final, np.where(arrived, now - np.where(arrived, log.arrival, 0.0), 0.0))


def decided_miss(log, rules: list[MissRule], now: float) -> str | None:
    """Why the run is certain to miss an objective by now, or None while it may still meet them."""
    if log.rejected.any():
        return "a request was rejected"
    for r in rules:
        x = lower_bounds(log, r.column, now)
        if not len(x):
            continue
        v = float(x.mean()) if r.stat == "mean" else float(np.percentile(x, float(r.stat[1:])))
        if v > r.limit_s * (1 + MARGIN):
            return f"{r.column[:-2]}_{r.stat} >= {v:.4g} s > {r.limit_s:g} s by t={now:.4g} s"
    return None


def check_interval(rules: list[MissRule]) -> float:
    """Simulated seconds between checks: often enough to stop soon after the verdict is decided,
    rarely enough that checking costs little beside the steps (a check reads every request)."""
    return max(min(r.limit_s for r in rules) / 2, 0.5)


def watch(env, log, replicas, rules: list[MissRule], stop) -> object:
    """SimPy process: every check_interval, check the log as settled by then; `stop`
    succeeds with the reason once a miss is decided, or with None once every request left or
    nothing else is scheduled (what ends a run without the watch)."""
    dt = check_interval(rules)
    n = len(log.prompt)
    while True:
        yield env.timeout(dt)
        for rep in replicas:        # runs applied up to now, so that their finished requests count
            rep.sync()
        why = decided_miss(log, rules, min([env.now] + [rep.settled() for rep in replicas]))
        if why is not None:
            stop.succeed(why)
            return
        if env.peek() == float("inf") or int(np.isfinite(log.finish).sum()) + int(log.rejected.sum()) == n:
            stop.succeed(None)
            return
