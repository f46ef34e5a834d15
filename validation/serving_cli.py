"""`rkvsim validate-serving SCENARIO.yaml [--requests N] [--out DIR]` (argument parsing and printing).

Kept apart from serving.py so that `rkvsim --help` imports nothing heavy."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    v = sub.add_parser("validate-serving", help="replay a scenario on a real llama-server and compare with the simulation")
    v.add_argument("scenario", help="a scenario with scheduler kind slots, e.g. scenarios/llamacpp_q8_0.yaml")
    v.add_argument("--requests", type=int, help="number of requests (overrides workload.num_requests)")
    v.add_argument("--out", help="results folder (default: results/<name>-serving)")
    v.add_argument("--method", help="which of the scenario's KV types to run (default: the first)")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field, e.g. --set workload.arrival.rate=1.5")
    v.add_argument("--timeout-s", type=float, default=900.0, help="stop the replay after this many seconds")
    v.add_argument("--no-probe", action="store_true", help="no speed probes around the replay (simulate as profiled)")
    v.add_argument("--drift-max", type=float, default=2.0, metavar="PCT",
                   help="a cell whose before/after probes differ by more than this is unverifiable (default 2)")
    v.set_defaults(func=cmd_validate_serving)


def cmd_validate_serving(args) -> int:
    from rich.console import Console

    from rkvsim.profiler.device import ProfilerError
    from rkvsim.simulator.config import ScenarioError, load_scenario, parse_overrides
    from rkvsim.simulator.llamacpp_cost import EngineProfileError

    from rkvsim.profiler.llamacpp_server import ServerError
    from rkvsim.validation.serving import ValidationError, validate_serving

    err = Console(stderr=True)
    console = Console(width=None if sys.stdout.isatty() else 150)
    path = Path(args.scenario)
    try:
        overrides = parse_overrides(args.set)
        if args.requests is not None:
            if args.requests < 1:
                raise ScenarioError("--requests must be at least 1")
            overrides["workload.num_requests"] = args.requests
        scn = load_scenario(path, overrides)
        out = Path(args.out) if args.out else Path("results") / f"{scn.name}-serving"
        run = validate_serving(scn, path.resolve().parent, out, args.method, args.timeout_s,
                               say=lambda s: err.print(s, highlight=False, soft_wrap=True),
                               probe=not args.no_probe, drift_max_pct=args.drift_max)
    except (ScenarioError, ValidationError, ServerError, ProfilerError, EngineProfileError, ValueError,
            FileNotFoundError) as e:
        err.print(f"[red]error:[/red] {' '.join(str(e).split())}", highlight=False, soft_wrap=True)
        return 2
    console.print(comparison_table(run.result))
    r = run.result
    m, s = r["measured"], r["simulated"]
    if r["load"].startswith("process=closed_loop"):
        sat = "closed loop: no open queue"
    else:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f} s/s"  # noqa: E731
        verdict = "SATURATED: the queue grows" if s["saturated"] else "below capacity"
        sat = (f"simulator: {verdict} (queue growth {fmt(s['queue_growth_s_per_s'])}; measured "
               f"{fmt(m['queue_growth_s_per_s'])}, {'saturated' if m['saturated'] else 'not saturated'})")
    console.print(sat)
    p = r.get("probe")
    if p:
        verdict = "verifiable" if p["verifiable"] else f"UNVERIFIABLE (over {p['drift_max_pct']:g}%)"
        console.print(f"host speed vs profile: before {p['before']['decode']:.3f} / after {p['after']['decode']:.3f} "
                      f"(decode), {p['before']['prefill']:.3f} / {p['after']['prefill']:.3f} (prefill); "
                      f"drift {p['drift_pct']['max_abs']:.1f}%: {verdict}; simulated at the probed speed")
    console.print(f"measured {m['requests_completed']} requests ({m['requests_failed']} failed); "
                  f"simulated costs: {r['cost_source']}")
    console.print(f"results: {run.out / 'validation_serving.json'}   report: {run.out / 'validation_serving.html'}")
    return 0


def comparison_table(r: dict):
    from rich.table import Table

    m, s, e = r["measured"], r["simulated"], r["error_pct"]
    t = Table(title=f"{r['scenario']} · {r['method']} · {r['requests']} requests · {r['load']}")
    for c in ("figure", "measured", "simulated", "error"):
        t.add_column(c, justify="left" if c == "figure" else "right")
    f = lambda v, d=4: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    pct = lambda v: "–" if v is None else f"{v:+.1f}%"  # noqa: E731
    t.add_row("output tokens/s", f(m["output_tokens_per_s"], 1), f(s["output_tokens_per_s"], 1), pct(e["output_tokens_per_s"]))
    t.add_row("requests/s", f(m["requests_per_s"], 3), f(s["requests_per_s"], 3), pct(e["requests_per_s"]))
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        for st in ("mean", "p50", "p90", "p99"):
            t.add_row(f"{name} {st} (s)", f(m[key][st]), f(s[key][st]), pct(e[key][st]))
    return t
