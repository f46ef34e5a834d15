"""Real llama-server vs rkvsim over the loads that matter, every KV type interleaved.

    python bench/bench_serving.py [--kv f16,q8_0,q4_0] [--requests 30] [--out results/bench_serving]

The matrix (validation/serving_matrix.py says how it is judged):
  1. closed loop, concurrency = the server's slots, replayed --closed-rounds times per KV type
     (f16, q8_0, q4_0, f16, q8_0, q4_0, ...): the reference KV type's mean requests/s is the
     capacity the open loads are set from, and the spread of the replays is the drift floor;
  2. Poisson arrivals at --loads x that capacity, every KV type at the same offered rate;
  3. bursty Gamma arrivals (cv --cv) at the same rates.
Every replay is one `rkvsim validate-serving` run (same seed: the same requests everywhere),
bracketed by speed probes; a replay whose validation_serving.json exists is not run again,
so an interrupted bench resumes (`--resimulate`: simulate those replays again with the code
as it is). Prints the absolute errors with each replay's probe drift,
the ratio table (each KV type over the reference), the drift floor, and writes
bench_serving.json beside the replays.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kv", default="f16,q8_0,q4_0", help="KV types; the first is the reference of the ratios")
    ap.add_argument("--scenario", default=str(ROOT / "scenarios" / "llamacpp_{kv}.yaml"),
                    help="scenario file per KV type ({kv} is replaced)")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--loads", default="0.35,0.7,1.3", help="arrival rates as fractions of the reference's capacity")
    ap.add_argument("--cv", type=float, default=2.0, help="Gamma inter-arrival cv of the bursty cells")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every open-loop cell")
    ap.add_argument("--closed-rounds", type=int, default=3, help="interleaved rounds of the closed-loop cell")
    ap.add_argument("--drift-max", type=float, default=2.0, help="probe drift (%%) above which a replay is unverifiable")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_serving")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per replay")
    ap.add_argument("--only", default=None, help="comma-separated cell names to run (default: all)")
    ap.add_argument("--resimulate", action="store_true",
                    help="keep the measurements of replays already run; simulate them again with the current code "
                         "(and --profile), at the speed their probes measured")
    ap.add_argument("--profile", default=None, help="engine profile folder to simulate with (default: the shipped "
                    "or cached one measured on this machine with the scenario's settings)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario field")
    args = ap.parse_args(argv)

    from rich.console import Console

    from rkvsim.models.files import read_json, write_json
    from rkvsim.simulator.config import load_scenario, parse_overrides
    from rkvsim.validation.serving import RESULT_FILE, resimulate, validate_serving
    from rkvsim.validation.serving_matrix import cells, schedule
    from rkvsim.validation.serving_prompts import PromptBank

    console = Console(width=None if sys.stdout.isatty() else 200)
    say = lambda s: console.print(s, highlight=False, soft_wrap=True)  # noqa: E731
    kvs = [k for k in args.kv.split(",") if k]
    ref = kvs[0]
    loads = [float(x) for x in args.loads.split(",") if x]
    only = set(args.only.split(",")) if args.only else None
    base_over = parse_overrides(args.set)
    bank = PromptBank(tokenize=None)    # each run's server tokenizes; token ids cached across replays
    results: dict[str, dict[str, list[dict]]] = {}
    capacity: float | None = None
    for cell in cells(loads, args.cv, args.rounds, args.closed_rounds):
        for rnd, kv in schedule(cell, kvs):
            path = Path(args.scenario.format(kv=kv))
            n_par = load_scenario(path).scheduler.n_parallel
            over = dict(base_over)
            if cell.arrival is None:
                over["workload.arrival"] = {"process": "closed_loop", "concurrency": n_par, "think_time_s": 0.0}
            else:
                if capacity is None:
                    raise SystemExit("the closed-loop cell of the reference KV type must run first (it measures capacity)")
                over["workload.arrival"] = {**cell.arrival, "rate": round(cell.fraction * capacity, 4)}
            over["workload.num_requests"] = args.requests
            out = args.out / cell.name / kv / f"r{rnd}"
            res_path = out / RESULT_FILE
            if args.profile:
                over["profile"] = args.profile
            if res_path.is_file():
                res = read_json(res_path, "validate-serving result")
                if args.resimulate:
                    res = resimulate(load_scenario(path, over), path.parent, res, out,
                                     Path(args.profile) if args.profile else None)
            elif args.resimulate or (only is not None and cell.name not in only):
                continue
            else:
                scn = load_scenario(path, over)
                say(f"[bold]{cell.name} {kv} round {rnd + 1}/{cell.rounds}[/bold] ({time.strftime('%H:%M:%S')}, "
                    f"load average {os.getloadavg()[0]:.2f})")
                res = validate_serving(scn, path.parent, out, deadline_s=args.timeout_s, say=say, bank=bank,
                                       drift_max_pct=args.drift_max).result
            results.setdefault(cell.name, {}).setdefault(kv, []).append(res)
        if cell.arrival is None and results.get(cell.name, {}).get(ref):
            caps = [r["measured"]["requests_per_s"] for r in results[cell.name][ref]]
            capacity = sum(caps) / len(caps)
            say(f"{ref}: measured capacity {capacity:.3f} requests/s (closed loop, mean of {len(caps)} replays)")

    summary = summarize(results, ref, capacity)
    print_tables(console, summary)
    write_json(args.out / "bench_serving.json", {**summary, "requests": args.requests, "loads": loads, "cv": args.cv,
                                                 "kv_types": kvs, "drift_max_pct": args.drift_max}, indent=1)
    from rkvsim.validation.serving_matrix_report import write_report
    write_report(args.out / "bench_serving.html", summary)
    console.print(f"results: {args.out / 'bench_serving.json'}   report: {args.out / 'bench_serving.html'}")
    return 0


def summarize(results: dict, ref: str, capacity: float | None) -> dict:
    from rkvsim.validation.serving_matrix import drift_floor, ratios, verdict

    cells_out, ratio_rows = [], []
    for cell, by_kv in results.items():
        for kv, runs in by_kv.items():
            for i, r in enumerate(runs):
                p = r.get("probe") or {}
                cells_out.append({"cell": cell, "kv": kv, "round": i, "verdict": verdict(r),
                                  "probe_drift_pct": (p.get("drift_pct") or {}).get("max_abs"),
                                  "probe_speed": p.get("scale"), "measured": r["measured"],
                                  "simulated": r["simulated"], "error_pct": r["error_pct"],
                                  "error_pct_as_profiled": r.get("error_pct_as_profiled"),
                                  "loadavg_before": r["loadavg_before"], "requests": r["requests"]})
        for sim_key in ("simulated_as_profiled", "simulated"):
            for row in ratios(by_kv, ref, sim_key):
                ratio_rows.append({"cell": cell, "simulation": "as profiled" if sim_key != "simulated" else "probed",
                                   **row})
    floor = {kv: drift_floor(runs) for kv, runs in results.get("closed", {}).items()}
    return {"reference": ref, "capacity_requests_per_s": capacity, "cells": cells_out, "ratios": ratio_rows,
            "drift_floor": floor}


def print_tables(console, summary: dict) -> None:
    from rich.table import Table

    pct = lambda v: "–" if v is None else f"{v:+.1f}%"  # noqa: E731
    g = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    t = Table(title="llama-server (measured) vs rkvsim (simulated at the probed speed): error = (sim - meas) / meas")
    for c in ("cell", "kv", "rd", "offered req/s", "meas tok/s", "thpt err", "E2E mean", "E2E p90", "TTFT p90",
              "TPOT mean", "as profiled: thpt / E2E mean", "queue growth meas/sim", "sat meas/sim", "probe speed",
              "drift", "goal"):
        t.add_column(c, justify="left" if c in ("cell", "kv") else "right")
    for c in summary["cells"]:
        m, s, e, ep = c["measured"], c["simulated"], c["error_pct"], c["error_pct_as_profiled"] or {}
        sp = c["probe_speed"] or {}
        t.add_row(c["cell"], c["kv"], str(c["round"] + 1), g(m.get("offered_requests_per_s")),
                  f"{m['output_tokens_per_s']:.1f}", pct(e["output_tokens_per_s"]), pct(e["e2e_s"]["mean"]),
                  pct(e["e2e_s"]["p90"]), pct(e["ttft_s"]["p90"]), pct(e["tpot_s"]["mean"]),
                  f"{pct(ep.get('output_tokens_per_s'))} / {pct((ep.get('e2e_s') or {}).get('mean'))}",
                  f"{g(m['queue_growth_s_per_s'])}/{g(s['queue_growth_s_per_s'])}",
                  f"{'yes' if m['saturated'] else 'no'}/{'yes' if s['saturated'] else 'no'}",
                  g(sp.get("decode")), "–" if c["probe_drift_pct"] is None else f"{c['probe_drift_pct']:.1f}%",
                  c["verdict"])
    console.print(t)
    n = {v: sum(c["verdict"] == v for c in summary["cells"]) for v in ("met", "missed", "unverifiable")}
    console.print(f"absolute goal: met in {n['met']}, missed in {n['missed']}, unverifiable (probe drift over the "
                  f"threshold) in {n['unverifiable']} of {len(summary['cells'])} replays")

    r = Table(title=f"ratios to {summary['reference']}: measured vs simulated (error = sim / meas - 1)")
    for c in ("cell", "kv", "simulation", "rounds", "throughput", "E2E mean", "E2E p90", "TTFT mean", "TTFT p90", "goal"):
        r.add_column(c, justify="left" if c in ("cell", "kv", "simulation") else "right")
    for row in summary["ratios"]:
        f = row["figures"]
        cellf = lambda k: f"{g(f[k]['measured'])} / {g(f[k]['simulated'])} ({pct(f[k]['error_pct'])})"  # noqa: E731
        goal = "saturated" if row["goal_met"] is None else ("met" if row["goal_met"] else "missed")
        r.add_row(row["cell"], row["kv"], row["simulation"], str(row["rounds"]), *(cellf(k) for k in f), goal)
    console.print(r)
    for kv, d in summary["drift_floor"].items():
        console.print(f"drift floor {kv}: {d['replays']} closed-loop replays, mean TPOT spread "
                      f"{pct(d['tpot_s_spread_pct'])}, mean E2E spread {pct(d['e2e_s_spread_pct'])}, probe drift "
                      f"{', '.join(f'{x:.1f}%' for x in d['probe_drift_pct'])}, probe decode speed "
                      f"{', '.join(f'{x:.3f}' for x in d['probe_decode_speed'])}")


if __name__ == "__main__":
    sys.exit(main())
