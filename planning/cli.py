"""`rkvsim sweep` and `rkvsim plan`: argument parsing and printing; the work is in sweep.py/plan.py."""
from __future__ import annotations

import sys
from pathlib import Path


def _consoles():
    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() else 150), Console(stderr=True)


def _progress(err):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True)


def cmd_sweep(args) -> int:
    from rkvsim.simulator.config import ScenarioError

    from rkvsim.planning.backends import BackendError
    from rkvsim.planning.spec import load_sweep
    from rkvsim.planning.sweep import run_sweep

    console, err = _consoles()
    try:
        from rkvsim.simulator.config import parse_overrides
        sweep = load_sweep(args.sweep, parse_overrides(args.set))
        out = Path(args.out) if args.out else Path("results") / f"sweep-{sweep.name}"
        if args.address and args.backend != "ray":
            raise ScenarioError("--address: only with --backend ray")
        with _progress(err) as prog:
            res = run_sweep(sweep, out, args.backend, args.workers, args.address, prog)
    except (ScenarioError, BackendError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    ok = int((res.rows["status"] == "ok").sum()) if len(res.rows) else 0
    console.print(f"{len(sweep.points)} points x {len(sweep.seeds)} seeds: ran {res.ran}, resumed {res.skipped}, "
                  f"{len(res.rows)} rows ({ok} ok) in {res.wall_s:.1f} s wall ({args.backend})")
    for c in res.crossovers:
        console.print(f"  {c.sentence()}", highlight=False)
    console.print(f"rows: {out / 'rows.parquet'}   report: {res.report}")
    return 0


def add_sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="simulate a scenario over a grid or Latin hypercube of any of its fields")
    s.add_argument("sweep", help="sweep YAML, e.g. scenarios/sweeps/rate_crossover.yaml")
    s.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine; ray: Ray tasks")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray for the sweep)")
    s.add_argument("--workers", type=int, help="parallel workers / Ray CPUs (default: this machine's cores)")
    s.add_argument("--out", help="results folder (default: results/sweep-<name>); rerun to resume")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every point (on top of the sweep's own set:)")
    s.set_defaults(func=cmd_sweep)


def _plan_base(args):
    """The scenario as data with --set applied and verbosity switched on unless --no-verbosity."""
    import yaml

    from rkvsim.simulator.config import ScenarioError, load_scenario, parse_overrides, set_dotted
    from rkvsim.simulator.verbosity import load_inflation

    path = Path(args.scenario)
    overrides = parse_overrides(args.set)
    scn = load_scenario(path, overrides)  # validates, names the field on error
    base = yaml.safe_load(path.read_text())
    for k, v in overrides.items():
        set_dotted(base, k, v)
    base_dir = str(path.resolve().parent)
    if args.no_verbosity:
        base["verbosity"] = {"data": None}
        return base, base_dir, "off (--no-verbosity)"
    if scn.verbosity.data is None:
        # Compressed answers are longer; a capacity plan that ignored it would be optimistic.
        probe = scn.model_copy(update={"verbosity": scn.verbosity.model_copy(update={"data": "shipped", "min_prompts": 1})})
        n = load_inflation(probe, Path(base_dir)).info["n_prompts"]
        if n < 2:
            raise ScenarioError("verbosity: the shipped generation dataset is empty; pass --no-verbosity")
        base["verbosity"] = {"data": "shipped", "min_prompts": min(scn.verbosity.min_prompts, n)}
        return base, base_dir, f"inflation model fitted on the shipped generations ({n} prompts)"
    return base, base_dir, f"scenario's ({scn.verbosity.data})"


def cmd_plan(args) -> int:
    import json

    from rkvsim.simulator.config import ScenarioError

    from rkvsim.planning.plan import plan, to_json
    from rkvsim.planning.plan_report import plan_table, render
    from rkvsim.planning.quality import default_scores_dir
    from rkvsim.planning.slo import SLOError, parse_slos
    from rkvsim.models.files import write_json, write_text

    console, err = _consoles()
    try:
        slos = parse_slos(args.slo)
        try:
            tps = [int(x) for x in args.tp.split(",") if x.strip()]
        except ValueError:
            raise ScenarioError(f"--tp {args.tp!r}: give TP degrees as integers, e.g. 1,2,4") from None
        if not tps or min(tps) < 1:
            raise ScenarioError("--tp: give TP degrees >= 1, e.g. 1,2,4")
        if args.seeds < 1:
            raise ScenarioError("--seeds: at least 1")
        base, base_dir, verbosity = _plan_base(args)
        scores = Path(args.scores) if args.scores else default_scores_dir()
        if scores is not None and not scores.is_dir():
            raise ScenarioError(f"--scores {scores}: not a folder of LongBench score files")
        with _progress(err) as prog:
            res = plan(base, base_dir, args.rate, slos, tps, args.max_gpus, list(range(args.seeds)),
                       bisect_steps=args.bisect_steps, full_curve=args.full_curve, scores_dir=scores,
                       workers=args.workers, progress=prog, verbosity=verbosity,
                       early_stop=not args.no_early_stop)
    except (ScenarioError, SLOError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    data = to_json(res)
    data["negative_samples_source"] = str(scores) if scores else None
    name = Path(args.scenario).stem
    out = Path(args.out) if args.out else Path("results") / f"plan-{name}"
    write_json(out / "plan.json", data)
    write_text(out / "report.html", render(res, name))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    console.print(plan_table(res))
    early = f" ({res.stopped_early} of the rate bisection's stopped once their miss was decided)" \
        if res.stopped_early else ""
    console.print(f"verbosity: {res.verbosity}   costs: {res.cost_source}   {res.runs} simulations{early}")
    console.print(f"results: {out / 'plan.json'}   report: {out / 'report.html'}")
    return 0


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="fewest GPUs meeting an SLO at a rate, and the max rate there, per method")
    p.add_argument("scenario", help="scenario YAML with an open-loop arrival (poisson, gamma, constant)")
    p.add_argument("--rate", type=float, required=True, help="arrival rate to plan for, requests/s")
    p.add_argument("--slo", required=True, help="e.g. 'ttft_p99<=2s,e2e_p90<=30s' (metrics ttft tpot itl e2e queue)")
    p.add_argument("--max-gpus", type=int, default=8, help="largest replicas x TP to try")
    p.add_argument("--tp", default="1", help="TP degrees to try, e.g. 1,2,4")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (the spread is reported)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario field")
    p.add_argument("--no-verbosity", action="store_true", help="keep compressed answers as long as FP16's")
    p.add_argument("--scores", help="LongBench per-sample scores for negative-sample rates "
                                    "(default: ../shared/data/rethink-kv/longbench_scores when present)")
    p.add_argument("--bisect-steps", type=int, default=5, help="bisection steps for the max rate")
    p.add_argument("--full-curve", action="store_true", help="evaluate every GPU count up to --max-gpus")
    p.add_argument("--no-early-stop", action="store_true",
                   help="run every bisection simulation to its end (same answer; slower; for checking)")
    p.add_argument("--workers", type=int, help="parallel processes (default: this machine's cores)")
    p.add_argument("--out", help="results folder (default: results/plan-<scenario>)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_plan)


def add_parser(sub) -> None:
    add_sweep_parser(sub)
    add_plan_parser(sub)
