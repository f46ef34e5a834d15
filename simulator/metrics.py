"""Per-method summary numbers from a run's records."""
from __future__ import annotations

import numpy as np

from rkvsim.simulator.records import ITL_EDGES, RequestLog

PCTS = (50, 90, 99)


def latency_stats(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    q = np.percentile(x, PCTS)
    return {"mean": float(x.mean()), **{f"p{p}": float(v) for p, v in zip(PCTS, q)}}


def hist_stats(hist: np.ndarray) -> dict:
    """Mean and percentiles from the log-binned ITL histogram (bin centres, 1% resolution)."""
    total = hist.sum()
    if total == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    edges = np.concatenate([[ITL_EDGES[0]], ITL_EDGES, [ITL_EDGES[-1]]])
    centres = np.sqrt(edges[:-1] * edges[1:])
    cum = np.cumsum(hist) / total
    out = {"mean": float((hist * centres).sum() / total)}
    for p in PCTS:
        out[f"p{p}"] = float(centres[np.searchsorted(cum, p / 100)])
    return out


def latency_columns(log) -> dict[str, np.ndarray]:
    """Per request: queueing, TTFT, TPOT and E2E seconds (NaN where not happened yet, and TPOT
    where fewer than two tokens are generated)."""
    done = np.isfinite(log.finish)
    out = np.where(done, log.output, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (log.finish - log.first_token) / (out - 1), np.nan)
    return {"queue_s": log.first_sched - log.arrival, "ttft_s": log.first_token - log.arrival, "tpot_s": tpot,
            "e2e_s": log.finish - log.arrival}


def per_request_columns(log: RequestLog) -> dict[str, np.ndarray]:
    lat = latency_columns(log)
    return {
        "request_id": np.arange(len(log.prompt)),
        "arrival_s": log.arrival,
        "prompt_tokens": log.prompt,
        "output_tokens": log.output,
        "queue_s": lat["queue_s"],
        "ttft_s": lat["ttft_s"],
        "tpot_s": lat["tpot_s"],
        "itl_max_s": log.itl_max,
        "e2e_s": lat["e2e_s"],
        "preemptions": log.preemptions,
        "rejected": log.rejected,
        "replica": log.replica,
        "cached_prompt_tokens": log.cached_prompt,
    }


def summarize(log: RequestLog, steps: list, num_blocks: int) -> dict:
    cols = per_request_columns(log)
    done = np.isfinite(log.finish)
    t0 = np.nanmin(log.arrival) if np.isfinite(log.arrival).any() else 0.0
    t1 = float(np.nanmax(log.finish)) if done.any() else t0
    span = max(t1 - t0, 1e-12)
    out_tokens = int(log.output[done].sum())
    batch_sizes = np.concatenate([np.frombuffer(s.batch, np.int64) if len(s) else np.zeros(0, np.int64) for s in steps])
    kv = [max(s.kv_fraction) for s in steps if len(s)]
    return {
        "requests_completed": int(done.sum()),
        "requests_rejected": int(log.rejected.sum()),
        "output_tokens_per_s": out_tokens / span if done.any() else 0.0,
        "requests_per_s": int(done.sum()) / span if done.any() else 0.0,
        "prefill_tokens_per_s": log.prefill_tokens / span if done.any() else 0.0,
        "makespan_s": span,
        "mean_output_tokens": float(log.output.mean()) if len(log.output) else 0.0,
        "ttft_s": latency_stats(cols["ttft_s"]),
        "tpot_s": latency_stats(cols["tpot_s"]),
        "e2e_s": latency_stats(cols["e2e_s"]),
        "queue_s": latency_stats(cols["queue_s"]),
        "itl_s": hist_stats(log.itl_hist),
        "preemptions": int(log.preemptions.sum()),
        "kv_peak_fraction": float(max(kv)) if kv else 0.0,
        "kv_blocks": int(num_blocks),
        "mean_batch_size": float(batch_sizes.mean()) if len(batch_sizes) else 0.0,
        "engine_steps": int(len(batch_sizes)),
    }
