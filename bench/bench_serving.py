"""Real llama-server vs rkvsim over the loads that matter, per KV type.

    python bench/bench_serving.py [--kv f16,q8_0,q4_0] [--requests 40] [--out results/bench_serving]

For each KV type (scenario scenarios/llamacpp_<kv>.yaml):
  1. closed loop, concurrency = the server's slots: every slot busy, nobody queued. Its
     measured requests/s is the server's capacity on this workload;
  2. Poisson arrivals at --loads x capacity (default 0.3 light, 0.7, 1.3 past saturation);
  3. bursty Gamma arrivals (cv --cv) at the same rates.
Every cell is one `rkvsim validate-serving` run (same seed: same requests in every cell) and
is skipped when its validation_serving.json exists, so an interrupted bench resumes. The table
gives measured throughput and the simulator's error on throughput, mean and p90 E2E and p90
TTFT, and whether measurement and simulation see a growing queue. Goals (issue 7): <= 5% on
throughput and mean/p90 E2E and <= 10% on p90 TTFT below saturation; at saturation the
simulator must say so and match the queue growth (here: within 25%).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUEUE_TOL = 0.25   # relative error allowed on the queue growth rate of a saturated cell


def cell_list(loads: list[float], cv: float) -> list[tuple[str, dict | None, float | None]]:
    cells = [("closed", None, None)]
    cells += [(f"poisson-{x:g}", {"process": "poisson"}, x) for x in loads]
    cells += [(f"gamma{cv:g}-{x:g}", {"process": "gamma", "cv": cv}, x) for x in loads]
    return cells


def resimulate(scn, base_dir: Path, res: dict, res_path: Path) -> dict:
    """The cell's measured side as it was; its simulated side and errors from the code as it is."""
    from rkvsim.models.files import write_json
    from rkvsim.models.methods import parse_method
    from rkvsim.simulator.pipeline import run_scenario
    from rkvsim.validation.serving import engine_profile_for
    from rkvsim.validation.serving_compare import error_pct, simulated_summary
    from rkvsim.profiler.engine_build import find_engine
    scn = scn.model_copy(update={"profile": str(engine_profile_for(scn, find_engine()))})
    (run,) = run_scenario(scn, scn.seed, base_dir, inflation=None, labels=[parse_method(res["method"]).label]).runs
    sim = simulated_summary(run, res["measured"].get("offered_requests_per_s") is not None)
    res = {**res, "simulated": sim, "error_pct": error_pct(res["measured"], sim), "cost_source": run.cost_source,
           "engine_profile": scn.profile, "resimulated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(res_path, res, sort_keys=True, default=str)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kv", default="f16,q8_0,q4_0")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--loads", default="0.3,0.7,1.3", help="arrival rates as fractions of the measured capacity")
    ap.add_argument("--cv", type=float, default=2.0, help="Gamma inter-arrival cv of the bursty cells")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_serving")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per cell")
    ap.add_argument("--only", default=None, help="comma-separated cell names to run (default: all)")
    ap.add_argument("--profile", default=None, help="engine profile folder to simulate with (default: the "
                    "shipped or cached one measured on this machine with the scenario's settings)")
    ap.add_argument("--resimulate", action="store_true",
                    help="keep the measurements of cells already run; simulate them again with the current "
                         "simulator and engine profile (to compare cost models on the same measurements)")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from rkvsim.models.files import read_json
    from rkvsim.simulator.config import load_scenario
    from rkvsim.validation.serving import RESULT_FILE, validate_serving

    console = Console(width=None if sys.stdout.isatty() else 170)
    say = lambda s: console.print(s, highlight=False, soft_wrap=True)  # noqa: E731
    loads = [float(x) for x in args.loads.split(",") if x]
    only = set(args.only.split(",")) if args.only else None
    results: dict[str, dict[str, dict]] = {}
    from rkvsim.validation.serving_prompts import PromptBank
    bank = PromptBank(tokenize=None)   # each run's server tokenizes; token ids cached across cells
    for kv in [k for k in args.kv.split(",") if k]:
        path = ROOT / "scenarios" / f"llamacpp_{kv}.yaml"
        n_par = load_scenario(path).scheduler.n_parallel
        capacity = None
        for name, arrival, frac in cell_list(loads, args.cv):
            out = args.out / kv / name
            if arrival is None:
                over = {"workload.arrival": {"process": "closed_loop", "concurrency": n_par, "think_time_s": 0.0}}
            else:
                if capacity is None:
                    raise SystemExit(f"{kv}: the closed-loop cell must run first (it measures capacity)")
                over = {"workload.arrival": {**arrival, "rate": round(frac * capacity, 4)}}
            over["workload.num_requests"] = args.requests
            if args.profile:
                over["profile"] = args.profile
            res_path = out / RESULT_FILE
            if res_path.is_file():
                res = read_json(res_path, "validate-serving result")
                if args.resimulate:
                    res = resimulate(load_scenario(path, over), path.parent, res, res_path)
            elif args.resimulate or (only is not None and name not in only):
                continue
            else:
                scn = load_scenario(path, over)
                say(f"[bold]{kv} {name}[/bold] ({time.strftime('%H:%M:%S')}, load average {os.getloadavg()[0]:.2f})")
                run = validate_serving(scn, path.parent, out, deadline_s=args.timeout_s, say=say, bank=bank)
                res = run.result
            if arrival is None:
                capacity = res["measured"]["requests_per_s"]
            results.setdefault(kv, {})[name] = res
        if capacity is not None:
            say(f"{kv}: measured capacity {capacity:.3f} requests/s (closed loop, {n_par} slots)")

    table = Table(title="llama-server (measured) vs rkvsim (simulated): error = (sim - meas) / meas")
    for c in ("kv", "load", "offered req/s", "meas tok/s", "thpt err", "E2E mean err", "E2E p90 err",
              "TTFT p90 err", "TPOT mean err", "queue growth meas/sim", "saturated meas/sim", "goal", "load avg"):
        table.add_column(c, justify="left" if c in ("kv", "load") else "right")
    pct = lambda v: "–" if v is None else f"{v:+.1f}%"  # noqa: E731
    summary = []
    for kv, cells in results.items():
        for name, r in cells.items():
            m, s, e = r["measured"], r["simulated"], r["error_pct"]
            below = not m["saturated"]
            errs = [e["output_tokens_per_s"], e["e2e_s"]["mean"], e["e2e_s"]["p90"]]
            if below:
                ok = all(x is not None and abs(x) <= 5 for x in errs) and abs(e["ttft_s"]["p90"] or 1e9) <= 10
            else:
                # Saturated: the simulator must say so and match the queue growth (within QUEUE_TOL).
                gm, gs = m["queue_growth_s_per_s"], s["queue_growth_s_per_s"]
                ok = bool(s["saturated"]) and gm is not None and gs is not None and abs(gs - gm) <= QUEUE_TOL * gm
            g = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
            table.add_row(kv, name, g(m.get("offered_requests_per_s")), f"{m['output_tokens_per_s']:.1f}",
                          pct(e["output_tokens_per_s"]), pct(e["e2e_s"]["mean"]), pct(e["e2e_s"]["p90"]),
                          pct(e["ttft_s"]["p90"]), pct(e["tpot_s"]["mean"]),
                          f"{g(m['queue_growth_s_per_s'])}/{g(s['queue_growth_s_per_s'])}",
                          f"{'yes' if m['saturated'] else 'no'}/{'yes' if s['saturated'] else 'no'}",
                          "met" if ok else "missed", f"{r['loadavg_before'][0]:.1f}")
            summary.append({"kv": kv, "cell": name, "goal_met": ok, "measured": m, "simulated": s, "error_pct": e,
                            "loadavg_before": r["loadavg_before"], "requests": r["requests"]})
    console.print(table)
    met = sum(x["goal_met"] for x in summary)
    console.print(f"goal met in {met} of {len(summary)} cells")
    from rkvsim.models.files import write_json
    write_json(args.out / "bench_serving.json", {"cells": summary, "requests": args.requests, "loads": loads,
                                                 "cv": args.cv}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
