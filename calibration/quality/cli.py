"""`rkvsim negatives`: the handler behind the subcommand (its flags are declared in calibration/cli.py)."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from rkvsim.calibration.quality.negatives import (
    OTHER_TYPE, TYPE_ORDER, NegativeCounts, ScoresNotFoundError, count_negatives, load_scores, threshold_curve,
)

EXIT_USAGE = 2


class UsageError(Exception):
    """A one-line message for stderr, and exit code 2."""


def _pairs(items: list[str], flag: str, example: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise UsageError(f"{flag} {item!r}: write it as {example}")
        if name in out:
            raise UsageError(f"{flag} {name!r} is given twice")
        out[name] = value
    return out


def _load(directory: Path, prefix: str, flag: str):
    try:
        return load_scores(directory, prefix)
    except ScoresNotFoundError as e:
        avail = ", ".join(e.available) or "none"
        raise UsageError(f"{flag}: no files {prefix}_{{task}}_eval.json in {directory}; "
                         f"available prefixes: {avail}") from None
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{flag}: {e}") from None


def _inputs(args):
    directory = Path(args.scores)
    if not directory.is_dir():
        raise UsageError(f"--scores {directory}: no such folder")
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold {args.threshold}: must be within [0, 1], e.g. 0.1 for a 10% drop")
    prefixes = _pairs(args.methods or [], "--method", "NAME=PREFIX, e.g. kivi=kivi_Meta-Llama-3-8B-instruct_...")
    if not prefixes:
        raise UsageError("--method: give at least one NAME=PREFIX")
    sets = {name: [m.strip() for m in v.split(",") if m.strip()]
            for name, v in _pairs(args.sets or [], "--set", "NAME=a,b with a, b --method names").items()}
    baseline = _load(directory, args.baseline, f"--baseline {args.baseline}")
    methods = {name: _load(directory, p, f"--method {name}={p}") for name, p in prefixes.items()}
    return baseline, methods, sets


def cli_main(args) -> int:
    try:
        baseline, methods, sets = _inputs(args)
        with warnings.catch_warnings():
            # The notes come back in the result; print them once, our way, below.
            warnings.simplefilter("ignore")
            res = count_negatives(baseline, methods, sets, args.threshold, args.compat)
            strict = count_negatives(baseline, methods, sets, args.threshold, "strict") \
                if args.compat == "paper" else res
            curve = threshold_curve(baseline, methods, sets, compat=args.compat) if args.plot else None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # bad --set members, clashing names
        print(f"error: --set: {e}", file=sys.stderr)
        return EXIT_USAGE
    for note in res.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if curve is not None:
        from rkvsim.calibration.quality.report import write_curve_html
        write_curve_html(args.plot, curve, marked=args.threshold)
    if args.json:
        print(json.dumps(to_json(res, strict), indent=2))
    else:
        _print_tables(res, strict, args.plot)
    return 0


def to_json(res: NegativeCounts, strict: NegativeCounts | None = None) -> dict:
    out = {
        "threshold": res.threshold, "mode": res.mode, "counts": res.counts,
        "by_task": res.by_task, "by_type": res.by_type,
        "benign": res.benign, "benign_by_task": res.benign_by_task,
        "skipped_tasks": res.skipped,
    }
    if res.mode == "paper":
        out["decomposition"] = _decomposition(res, strict)
    return out


def _decomposition(res: NegativeCounts, strict: NegativeCounts | None) -> dict:
    rows = {}
    for name, d in res.decomposition().items():
        rows[name] = {"paper": d["count"], "passage_count_doubled": d["passage_count_doubled"],
                      "zero_ties": d["zero_ties"], "strict": d["strict"]}
        if strict is not None:
            # Recounted independently: the reconciliation is checked, not assumed.
            rows[name]["strict_recount"] = strict.counts[name]
    return rows


def _print_tables(res: NegativeCounts, strict: NegativeCounts | None, plot) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output would otherwise be cut to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 150)
    types = [t for t in (*TYPE_ORDER, OTHER_TYPE) if any(t in bt for bt in res.by_type.values())]
    t = Table(title=f"Negative samples at threshold {res.threshold:g} ({res.mode} counting)")
    t.add_column("method / set")
    for col in (*types, "total", "% of benign"):
        t.add_column(col, justify="right")
    for name, n in res.counts.items():
        share = f"{100 * n / res.benign:.1f}%" if res.benign else "-"
        t.add_row(name, *(str(res.by_type[name].get(ty, 0)) for ty in types), str(n), share)
    console.print(t)
    tasks = len(res.benign_by_task) + (1 if res.mode == "paper" and "passage_count" in res.benign_by_task else 0)
    console.print(f"benign samples: {res.benign} over {tasks} task entries"
                  + (" (passage_count listed twice)" if res.mode == "paper" else ""))
    for name, skipped in res.skipped.items():
        console.print(f"{name}: tasks left out: {', '.join(skipped)}")
    if res.mode == "paper":
        d = Table(title="paper count - passage_count counted twice - 0-vs-0 ties = strict count")
        for col in ("method / set", "paper", "- passage_count 2nd copy", "- 0-vs-0 ties", "= strict",
                    "strict recount"):
            d.add_column(col, justify="left" if col == "method / set" else "right")
        for name, row in _decomposition(res, strict).items():
            ok = row.get("strict_recount") == row["strict"]
            d.add_row(name, str(row["paper"]), str(row["passage_count_doubled"]), str(row["zero_ties"]),
                      str(row["strict"]), f"{row.get('strict_recount', '-')}" + (" ok" if ok else " MISMATCH"))
        console.print(d)
    if plot:
        console.print(f"curve: {plot}")
