"""`rkvsim lengths train|eval`: fit the length predictor on ShareGPT, score it on the
held-out conversations, and print the scores beside naive baselines.

The argparse definitions live in calibration/cli.py (so `rkvsim --help` never
imports scikit-learn); this module holds everything those subcommands do.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from rkvsim.calibration.lengths.data import TEST_FRACTION, load_sharegpt, rows_hash, same_prompt_reference, split
from rkvsim.calibration.lengths.eval import evaluate
from rkvsim.calibration.lengths.metrics import BUCKET_NAMES


def _console(stderr: bool = False):
    from rich.console import Console

    # Piped output would otherwise be cut to 80 columns.
    return Console(stderr=stderr, width=None if sys.stdout.isatty() else 130)


def _pct(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.1f}%"


def metrics_table(ev: dict, title: str):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("predictor")
    t.add_column("paper acc\n(clipped ≥0)", justify="right")
    t.add_column("paper acc\n(unclipped)", justify="right")
    t.add_column("median\nacc", justify="right")
    t.add_column("3-bucket\nacc", justify="right")
    t.add_column("Spearman", justify="right")
    for name, r in ev["results"].items():
        sp = r["spearman"]
        t.add_row(name, _pct(r["accuracy_clipped"]), _pct(r["accuracy_unclipped"]),
                  _pct(r["accuracy_median"]), _pct(r["bucket_accuracy"]),
                  "–" if sp is None or math.isnan(sp) else f"{sp:.3f}")
    return t


def confusion_table(cm, edges, title: str):
    from rich.table import Table

    lo, hi = edges
    names = [f"{BUCKET_NAMES[0]} <{lo:.0f}", f"{BUCKET_NAMES[1]} {lo:.0f}-{hi:.0f}",
             f"{BUCKET_NAMES[2]} ≥{hi:.0f}"]
    t = Table(title=title)
    t.add_column("true \\ predicted")
    for n in names:
        t.add_column(n, justify="right")
    for n, row in zip(names, cm):
        t.add_row(n, *(str(v) for v in row))
    return t


def _print_eval(con, ev: dict, n_test: int, where: str, reference: dict) -> None:
    con.print(metrics_table(ev, f"held-out ShareGPT prompts ({n_test} rows, {where})"))
    con.print(confusion_table(ev["results"]["model"]["confusion"], ev["bucket_edges"],
                              "model: true bucket (training terciles, tokens) vs predicted "
                              "(rank third of its prediction)"))
    c = reference
    con.print(f"same-prompt reference (about the best a prompt-only predictor can do): "
              f"{_pct(c['accuracy_clipped'])} - each reply's length predicted by the median of the "
              f"other replies to the very same prompt ({c['prompts']} prompts with 2+ different "
              f"replies, {c['rows']} rows); the model scores {_pct(c.get('model_accuracy_clipped'))} "
              f"on the held-out ones ({c['test_rows']} rows, where the reference is "
              f"{_pct(c['test_accuracy_clipped'])})", highlight=False)


def reference_summary(rows, test, test_pred) -> dict:
    """The same-prompt reference on all rows, and model vs reference on the held-out rows."""
    whole = same_prompt_reference(rows)
    held = same_prompt_reference(test, model_pred=test_pred)
    return {**whole, "test_rows": held["rows"], "test_accuracy_clipped": held["accuracy_clipped"],
            "model_accuracy_clipped": held.get("model_accuracy_clipped")}


def cmd_train(args) -> int:
    from rkvsim.calibration.lengths.predictor import LengthPredictor, save

    con, err = _console(), _console(stderr=True)
    t0 = time.perf_counter()
    with err.status("reading ShareGPT"):
        rows, info = load_sharegpt()
    train, test = split(rows, args.seed, TEST_FRACTION)
    err.print(f"{info['rows']} rows ({info['exact_copies_dropped']} exact copies dropped): "
              f"{len(train)} train / {len(test)} held out (split by conversation and prompt, "
              f"seed {args.seed})")
    with err.status(f"fitting ({args.features} features, {args.folds}-fold CV over losses)"):
        pred = LengthPredictor(features=args.features, seed=args.seed, cv_folds=args.folds)
        pred.fit(train.texts, train.lengths, groups=train.groups)
    with err.status("scoring held-out rows"):
        ev = evaluate(pred, train.texts, train.lengths, test.texts, test.lengths)
    reference = reference_summary(rows, test, pred.predict(test.texts))
    meta = {"data": {**info, "split_seed": args.seed, "test_fraction": TEST_FRACTION,
                     "n_train": len(train), "n_test": len(test),
                     "train_hash": rows_hash(train.texts, train.lengths),
                     "test_hash": rows_hash(test.texts, test.lengths)},
            "heldout": ev, "same_prompt_reference": reference}
    path = save(pred, args.out, meta)
    d = pred.describe()
    _print_eval(con, ev, len(test), f"{args.features} features", reference)
    for part in ("text_model", "length_only_model"):
        p = d[part]
        cv = ", ".join(f"{k} {v['accuracy_clipped']:.1f}%@×{v['scale']}" for k, v in p["cv"].items())
        con.print(f"{part}: loss {p['loss']} × {p['scale']}  (CV on train: {cv})")
    con.print(f"fit {d['fit_seconds']:.0f} s, total {time.perf_counter() - t0:.0f} s; "
              f"saved {path} (+ {path.with_suffix('.json').name})")
    return 0


def cmd_eval(args) -> int:
    from rkvsim.calibration.lengths.predictor import default_path, load

    con, err = _console(), _console(stderr=True)
    path = Path(args.model) if args.model else default_path(args.features)
    try:
        pred, side = load(path)
    except (FileNotFoundError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    data = side["data"]
    with err.status("reading ShareGPT"):
        rows, _ = load_sharegpt()
    train, test = split(rows, data["split_seed"], data["test_fraction"])
    if rows_hash(train.texts, train.lengths) != data["train_hash"]:
        # Another data version or token counter: the held-out rows are not the ones
        # the model was scored on at training time, and may overlap its training set.
        err.print("[yellow]warning:[/yellow] the ShareGPT rows differ from those this model "
                  "was trained on; these scores are not a clean held-out evaluation")
    with err.status("scoring held-out rows"):
        ev = evaluate(pred, train.texts, train.lengths, test.texts, test.lengths)
    _print_eval(con, ev, len(test), f"{side['features']} features, {path.name}",
                reference_summary(rows, test, pred.predict(test.texts)))
    return 0


def cli_main(args) -> int:
    """Dispatch for the subcommands defined here; a later `lengths` subcommand may set
    its own func in cli.py instead of coming through this table."""
    handlers = {"train": cmd_train, "eval": cmd_eval}
    if args.lengths_cmd not in handlers:
        raise SystemExit(f"rkvsim lengths {args.lengths_cmd}: no handler in {__name__}")
    return handlers[args.lengths_cmd](args)
