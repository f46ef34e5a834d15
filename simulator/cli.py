"""`rkvsim run`: simulate a scenario for each of its methods (mounted by rkvsim.cli.main)."""
from __future__ import annotations

import sys
import time
from pathlib import Path


def cmd_run(args) -> int:
    from rich.console import Console

    from rkvsim.simulator.config import ScenarioError, load_scenario, parse_overrides
    from rkvsim.simulator.simulation import build_workload
    from rkvsim.simulator.fleet import plan_variants, predict_lengths, simulate_variant, uses_fleets
    from rkvsim.simulator.kv_memory import DoesNotFitError
    from rkvsim.simulator.verbosity import load_inflation
    from rkvsim.simulator.outputs import build_summary, write_results
    from rkvsim.simulator.table import method_table

    # Piped output would otherwise be cut to 80 columns, squeezing the table unreadably.
    console = Console(width=None if sys.stdout.isatty() else 150)
    err = Console(stderr=True)
    path = Path(args.scenario)
    try:
        scn = load_scenario(path, parse_overrides(args.set))
        seed = scn.seed if args.seed is None else args.seed
        wl = build_workload(scn, seed, path.resolve().parent)
        inflation = load_inflation(scn, path.resolve().parent)
        todo = plan_variants(scn)
        preds = predict_lengths(scn, wl) if any(v.router == "compression_aware" for v in todo) else None
    except (ScenarioError, ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    out = Path(args.out) if args.out else Path("results") / f"{scn.name}-seed{seed}"
    runs = []
    t0 = time.perf_counter()
    from rich.progress import Progress
    with Progress(transient=True, console=err) as prog:
        task = prog.add_task("simulating", total=len(todo))
        for v in todo:
            prog.update(task, description=f"simulating {v.label}")
            try:
                runs.append(simulate_variant(scn, v, wl, inflation=inflation, predictions=preds))
            except (DoesNotFitError, ScenarioError) as e:
                err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
                return 2
            prog.advance(task)
    wall = time.perf_counter() - t0
    extra = {"model": scn.model, "hardware": scn.hardware, "tp": scn.tp, "replicas": scn.replicas,
             "router": scn.router, "num_requests": int(len(wl.prompt)),
             "verbosity": "none" if inflation is None else
             f"inflation model fitted on {scn.verbosity.data} ({inflation.info['n_prompts']} prompts)"}
    if uses_fleets(scn):
        extra["setups"] = {v.label: v.describe() for v in todo}
        extra["length_predictions"] = preds.source if preds else None
    summary = build_summary(scn.name, seed, runs, extra)
    write_results(out, summary, runs, path.read_text())
    console.print(method_table(summary))
    if scn.arms:
        from rkvsim.simulator.routing_table import routing_table
        console.print(routing_table(summary))
    console.print(f"costs: {summary['cost_source']}   simulated in {wall:.1f} s wall")
    console.print(f"results: {out}/summary.json   report: {out / 'report.html'}")
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="simulate a scenario for each of its methods")
    r.add_argument("scenario", help="scenario YAML, e.g. scenarios/heavy_kv.yaml")
    r.add_argument("--out", help="results folder (default: results/<name>-seed<seed>)")
    r.add_argument("--seed", type=int, help="overrides the scenario's seed")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field by dotted path, e.g. --set workload.arrival.rate=8")
    r.set_defaults(func=cmd_run)
