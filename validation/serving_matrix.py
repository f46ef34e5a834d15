"""The validation matrix of a real llama-server: which replays, in what order, judged how.

Cells are loads (a closed loop at the server's slot count; Poisson and bursty Gamma arrivals
at fractions of the reference KV type's measured capacity). The same offered load, hence the
same workload, is replayed for every KV type, so a KV type's figures over the reference's are
the ratio a user asks for ("q8_0 against f16 on my load"). Replays run interleaved: every KV
type once, then every KV type again, so that host drift moves all of them alike and mostly
cancels from the ratios.

Judged (issue 16): the absolute errors of a cell count only where its probes agree within the
drift threshold (else the cell is unverifiable, neither a hit nor a miss): <= 5% on throughput
and mean/p90 E2E and <= 10% on p90 TTFT below saturation; at saturation the simulator must say
so and match the measured queue growth within QUEUE_TOL. Ratios: <= 5% below saturation.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

QUEUE_TOL = 0.25            # relative error allowed on the queue growth of a saturated cell
ABS_GOAL_PCT = 5.0          # throughput, mean and p90 E2E
TTFT_GOAL_PCT = 10.0        # p90 TTFT
RATIO_GOAL_PCT = 5.0
# (name, figure, statistic) of the ratios: statistic None = a throughput figure
RATIO_FIGURES = (("throughput", "output_tokens_per_s", None), ("E2E mean", "e2e_s", "mean"),
                 ("E2E p90", "e2e_s", "p90"), ("TTFT mean", "ttft_s", "mean"), ("TTFT p90", "ttft_s", "p90"))


@dataclass(frozen=True)
class Cell:
    name: str
    arrival: dict | None       # None: closed loop at the slot count
    fraction: float | None     # offered rate / the reference KV type's capacity
    rounds: int


def cells(loads: list[float], cv: float, rounds: int = 1, closed_rounds: int = 3) -> list[Cell]:
    out = [Cell("closed", None, None, closed_rounds)]
    out += [Cell(f"poisson-{x:g}", {"process": "poisson"}, x, rounds) for x in loads]
    out += [Cell(f"gamma{cv:g}-{x:g}", {"process": "gamma", "cv": cv}, x, rounds) for x in loads]
    return out


def schedule(cell: Cell, kvs: list[str]) -> list[tuple[int, str]]:
    """(round, KV type) in the order they run: interleaved, every KV type once per round."""
    return [(r, kv) for r in range(cell.rounds) for kv in kvs]


def figure(summary: dict, name: str, stat: str | None) -> float | None:
    v = summary[name] if stat is None else summary[name][stat]
    return None if v is None or not math.isfinite(v) else float(v)


def _gmean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else None


def verdict(res: dict) -> str:
    """met / missed / unverifiable for one replay's absolute errors."""
    probe = res.get("probe")
    if probe is not None and not probe["verifiable"]:
        return "unverifiable"
    m, s, e = res["measured"], res["simulated"], res["error_pct"]
    if not m["saturated"]:
        errs = [e["output_tokens_per_s"], e["e2e_s"]["mean"], e["e2e_s"]["p90"]]
        ok = all(x is not None and abs(x) <= ABS_GOAL_PCT for x in errs)
        ok = ok and e["ttft_s"]["p90"] is not None and abs(e["ttft_s"]["p90"]) <= TTFT_GOAL_PCT
    else:
        gm, gs = m["queue_growth_s_per_s"], s["queue_growth_s_per_s"]
        ok = bool(s["saturated"]) and gm is not None and gs is not None and abs(gs - gm) <= QUEUE_TOL * gm
    return "met" if ok else "missed"


def ratios(cell_results: dict[str, list[dict]], ref: str, sim_key: str = "simulated_as_profiled") -> list[dict]:
    """Per KV type other than `ref`: measured and simulated ratios to `ref` for each figure.

    A round's ratio pairs the KV type's replay with the reference's replay of the same round
    (they ran minutes apart); the cell's ratio is the geometric mean over rounds."""
    out = []
    base = cell_results.get(ref, [])
    for kv, runs in cell_results.items():
        if kv == ref:
            continue
        n = min(len(runs), len(base))
        if n == 0:
            continue
        below = not any(r["measured"]["saturated"] for r in runs[:n] + base[:n])
        row = {"kv": kv, "ref": ref, "rounds": n, "below_saturation": below, "figures": {}}
        for label, name, stat in RATIO_FIGURES:
            mr = [_safe_ratio(figure(runs[i]["measured"], name, stat), figure(base[i]["measured"], name, stat))
                  for i in range(n)]
            sr = [_safe_ratio(figure(runs[i][sim_key], name, stat), figure(base[i][sim_key], name, stat))
                  for i in range(n)]
            m, s = _gmean(mr), _gmean(sr)
            err = None if m is None or s is None else 100.0 * (s / m - 1.0)
            row["figures"][label] = {"measured": m, "simulated": s, "error_pct": err}
        errs = [f["error_pct"] for f in row["figures"].values()]
        row["goal_met"] = all(x is not None and abs(x) <= RATIO_GOAL_PCT for x in errs) if below else None
        out.append(row)
    return out


def _safe_ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def drift_floor(runs: list[dict]) -> dict:
    """The same cell replayed several times: spread of its mean TPOT and mean E2E (max / min - 1)."""
    out = {"replays": len(runs)}
    for key in ("tpot_s", "e2e_s"):
        xs = [r["measured"][key]["mean"] for r in runs if r["measured"][key]["mean"] is not None]
        out[f"{key}_mean"] = xs
        out[f"{key}_spread_pct"] = 100.0 * (max(xs) / min(xs) - 1.0) if len(xs) > 1 else None
    out["probe_drift_pct"] = [r["probe"]["drift_pct"]["max_abs"] for r in runs if r.get("probe")]
    out["probe_decode_speed"] = [r["probe"]["scale"]["decode"] for r in runs if r.get("probe")]
    return out
