"""Measured vs simulated serving figures: the same statistics from both sides, and their errors.

Both sides use simulator.metrics.latency_stats (mean, p50, p90, p99) on per-request arrays,
and the same throughput definition (completed output tokens over first arrival .. last
finish). Queue growth is the slope of a request's wait for a slot against its arrival time
(seconds of waiting gained per second): about 0 below capacity, (rate - capacity) / capacity
past it. Measured wait = TTFT - the server's own prompt time (timings.prompt_ms); simulated
wait = slot assignment - arrival.
"""
from __future__ import annotations

import numpy as np

from rkvsim.simulator.metrics import latency_stats

SATURATION_SLOPE = 0.1     # s of waiting per s of arrivals above which the queue is growing
LATENCIES = ("ttft_s", "tpot_s", "e2e_s")
STATS = ("mean", "p50", "p90", "p99")


def _queue_growth(arrival: np.ndarray, wait: np.ndarray) -> float | None:
    ok = np.isfinite(arrival) & np.isfinite(wait)
    if ok.sum() < 3 or np.ptp(arrival[ok]) <= 0:
        return None
    return float(np.polyfit(arrival[ok], wait[ok], 1)[0])


def summarize_columns(arrival, first_token, finish, output, wait, open_loop: bool) -> dict:
    arrival, first_token, finish = (np.asarray(x, np.float64) for x in (arrival, first_token, finish))
    output = np.asarray(output, np.int64)
    done = np.isfinite(finish)
    t0 = float(np.nanmin(arrival)) if np.isfinite(arrival).any() else 0.0
    span = max(float(np.nanmax(finish)) - t0, 1e-12) if done.any() else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(output > 1, (finish - first_token) / (output - 1), np.nan)
    growth = _queue_growth(arrival, np.asarray(wait, np.float64)) if open_loop else None
    n_arr = int(np.isfinite(arrival).sum())
    return {
        "requests_completed": int(done.sum()),
        "output_tokens_per_s": float(output[done].sum() / span) if done.any() else 0.0,
        "requests_per_s": float(done.sum() / span) if done.any() else 0.0,
        "offered_requests_per_s": (float((n_arr - 1) / np.ptp(arrival[np.isfinite(arrival)]))
                                   if open_loop and n_arr > 1 and np.ptp(arrival[np.isfinite(arrival)]) > 0 else None),
        "makespan_s": span,
        "ttft_s": latency_stats(first_token - arrival),
        "tpot_s": latency_stats(tpot),
        "e2e_s": latency_stats(finish - arrival),
        "wait_s": latency_stats(np.asarray(wait, np.float64)),
        "queue_growth_s_per_s": growth,
        "saturated": bool(growth is not None and growth > SATURATION_SLOPE),
    }


def measured_summary(ms: list, open_loop: bool) -> dict:
    ok = [m for m in ms if m.ok]
    arrival = np.array([m.sent for m in ok])
    first = np.array([m.first_token for m in ok])
    wait = first - arrival - np.array([m.prompt_ms / 1000 for m in ok])
    out = summarize_columns(arrival, first, [m.finish for m in ok], [m.output for m in ok], wait, open_loop)
    out["requests_failed"] = len(ms) - len(ok)
    gaps = np.concatenate([np.diff(m.token_times) for m in ok if len(m.token_times) > 1] or [np.zeros(0)])
    out["itl_s"] = latency_stats(gaps)
    return out


def simulated_summary(run, open_loop: bool) -> dict:
    log = run.log
    wait = log.first_sched - log.arrival
    out = summarize_columns(log.arrival, log.first_token, log.finish, log.output, wait, open_loop)
    out["requests_rejected"] = int(log.rejected.sum())
    out["reject_reasons"] = sorted(set(log.reject_reason.values()))
    return out


def error_pct(measured: dict, simulated: dict) -> dict:
    """(simulated - measured) / measured x 100 for throughput and every latency statistic."""
    def err(s, m):
        if s is None or m is None or not np.isfinite(m) or m == 0:
            return None
        return 100.0 * (s - m) / m
    out = {k: err(simulated[k], measured[k]) for k in ("output_tokens_per_s", "requests_per_s")}
    for lat in LATENCIES:
        out[lat] = {s: err(simulated[lat][s], measured[lat][s]) for s in STATS}
    return out
