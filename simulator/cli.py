"""`rkvsim run`: simulate a scenario for each of its methods (mounted by rkvsim.cli.main)."""
from __future__ import annotations

import sys
from pathlib import Path


def cmd_run(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from rkvsim.simulator.config import ScenarioError, load_scenario, parse_overrides
    from rkvsim.simulator.kv_memory import DoesNotFitError
    from rkvsim.simulator.outputs import write_results
    from rkvsim.simulator.pipeline import run_scenario
    from rkvsim.simulator.table import method_table, trust_line

    # Piped output would otherwise be cut to 80 columns, squeezing the table unreadably.
    console = Console(width=None if sys.stdout.isatty() else 150)
    err = Console(stderr=True)
    path = Path(args.scenario)
    try:
        scn = load_scenario(path, parse_overrides(args.set))
        with Progress(transient=True, console=err) as prog:
            task = prog.add_task("simulating", total=None)

            def on_variant(v, i: int, n: int) -> None:
                prog.update(task, description=f"simulating {v.label}", completed=i, total=n)

            res = run_scenario(scn, args.seed, path.resolve().parent, on_variant=on_variant)
    except (ScenarioError, DoesNotFitError, ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    out = Path(args.out) if args.out else Path("results") / f"{scn.name}-seed{res.seed}"
    summary = res.summary()
    write_results(out, summary, res.runs, path.read_text())
    console.print(method_table(summary))
    if scn.arms:
        from rkvsim.simulator.routing_table import routing_table
        console.print(routing_table(summary))
    sch = summary.get("scheduler")
    if sch:
        on = [k for k in ("chunked_prefill", "enable_prefix_caching", "cuda_graphs") if sch[k]]
        console.print(f"scheduler: {sch['policy']} ({', '.join(on) or 'no chunking, no prefix cache, eager'}; "
                      f"{sch['max_batch_size']} seqs, {sch['max_batched_tokens']} tokens per step; "
                      f"KV blocks {sch['kv_blocks']})", highlight=False)
    console.print(f"costs: {summary['cost_source']}   simulated in {res.wall_s:.1f} s wall")
    line = trust_line(summary)
    if line:
        console.print(line, highlight=False, markup=False)
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
