"""`rkvprof fit DIR` (fit step-cost predictors beside a profile) and `rkvprof install DIR`
(put a profile where simulations of its hardware find it)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def _one_line(fn):
    """A FitError (a profile that cannot be fitted or read) is one line and exit 2, as rkvprof's own."""
    from rkvsim.calibration.steps.fit import FitError
    from rkvsim.profiler.cli import one_line_errors
    return one_line_errors(fn, also=(FitError,))


def add_parser(sub) -> None:
    f = sub.add_parser("fit", help="fit per-operator step-cost predictors on a profile; k-fold held-out errors")
    f.add_argument("profile", type=Path, help="profile folder (rkvprof collect / import-vidur)")
    f.add_argument("--folds", type=int, default=5, help="k of the k-fold held-out scoring (default 5)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--candidates", default=None,
                   help="comma-separated subset of physics,physics+gbt,forest,xgboost (default: all available)")
    f.add_argument("--leave-one-model-out", action="store_true",
                   help="print, per operator, the error on each model held out of the fit (a profile of several "
                        "models, such as an imported GPU's; its dense operators are always scored that way)")
    f.set_defaults(func=_one_line(cmd_fit))
    i = sub.add_parser("install", help="copy a profile (and its fit) into the user store the simulator searches")
    i.add_argument("profile", type=Path)
    i.set_defaults(func=_one_line(cmd_install))


def cmd_fit(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from rkvsim.profiler.profile import load_profile

    from rkvsim.calibration.steps.fit import fit_folder, fit_profile, save_fit

    prof = load_profile(args.profile)
    only = tuple(s.strip() for s in args.candidates.split(",")) if args.candidates else None
    n_jobs = 0
    if "operators" in prof.tables:
        n_jobs += prof.tables["operators"]["op"].nunique()
    if "attention" in prof.tables:
        n_jobs += len(prof.tables["attention"].groupby(["method", "stage"]))
    with Progress(transient=True) as bar:
        task = bar.add_task("fitting operators", total=n_jobs)
        fit = fit_profile(prof, folds=args.folds, seed=args.seed, only=only,
                          progress=lambda fam, meth, op: bar.update(task, advance=1, description=f"{fam} {meth} {op}"))
    out = save_fit(fit, fit_folder(args.profile))
    con = Console()
    cands = sorted({k for f in fit.ops.values() for k in f.heldout})
    t = Table(title=f"{args.folds}-fold held-out error (mean |pred - meas| / meas, %) on {prof.origin}")
    for c in ("family", "method", "operator", "rows", *cands, "chosen"):
        t.add_column(c)
    for (fam, meth, op), f in sorted(fit.ops.items()):
        t.add_row(fam, meth, op, str(f.rows), *[f"{100 * f.heldout[c]:.2f}" if c in f.heldout else "-" for c in cands],
                  f"{f.chosen} ({100 * f.heldout[f.chosen]:.2f}%)")
    con.print(t)
    if args.leave_one_model_out:
        lomo = {k: f for k, f in fit.ops.items() if getattr(f, "heldout_models", None)}
        if not lomo:
            from rkvsim.calibration.steps.fit import FitError
            raise FitError(f"{args.profile} holds one model's rows; leave-one-model-out needs a profile of several "
                           "(rkvprof import-vidur of a GPU's compute/ folder)")
        con.print(leave_one_model_out_table(fit, prof.hardware))
    con.print(f"wrote {out}/step_fit.pkl and {out}/fit.json")
    return 0


def leave_one_model_out_table(fit, hardware: str):
    """Rich table, one row per (operator, held-out model): MAPE (%) of the shape-transfer fit, of the
    physics law trained on the other models, and the reproducibility floor (fit.twin_floor: the other
    models' measurements of the very same operator shape, where any exist, as the prediction)."""
    from rich.table import Table

    from rkvsim.calibration.steps.fit import ShapeBoost
    t = Table(title=f"{hardware}: leave-one-model-out error (mean |pred - meas| / meas, %)")
    for c in ("operator", "held-out model", "shape+gbt", "physics", "floor (rows)"):
        t.add_column(c, overflow="fold")     # folded, never cut: a model's name is the row's key
    for (_, _, op), f in sorted(fit.ops.items()):
        per = getattr(f, "heldout_models", None) or {}
        sh, ph = per.get(ShapeBoost.name, {}), per.get("physics", {})
        floor = getattr(f, "floor", None) or {}
        for m in sorted(sh):
            fl = f"{100 * floor[m][0]:.1f} ({floor[m][1]})" if m in floor else "-"
            t.add_row(op, m, f"{100 * sh[m]:.1f}", f"{100 * ph[m]:.1f}" if m in ph else "-", fl)
        if sh:
            t.add_row(op, "worst", f"{100 * max(sh.values()):.1f}", f"{100 * max(ph.values()):.1f}" if ph else "-",
                      f"{100 * max(e for e, _ in floor.values()):.1f}" if floor else "-", end_section=True)
    # A whole layer's dense time (the sum of its operators at each tokens x TP): what a step inherits.
    layer = getattr(fit, "layer_heldout", None) or {}
    sh, ph = layer.get(ShapeBoost.name, {}), layer.get("physics", {})
    for m in sorted(sh):
        t.add_row("layer (sum of ops)", m, f"{100 * sh[m]:.1f}", f"{100 * ph[m]:.1f}" if m in ph else "-", "-")
    if sh:
        t.add_row("layer (sum of ops)", "worst", f"{100 * max(sh.values()):.1f}",
                  f"{100 * max(ph.values()):.1f}" if ph else "-", "-")
    return t


def cmd_install(args) -> int:
    from rkvsim.profiler.profile import load_profile

    from rkvsim.calibration.steps.profiles import user_store
    from rkvsim.models.files import replace_dir

    prof = load_profile(args.profile)
    dest = user_store() / prof.hardware / prof.meta.get("model", "unknown")
    # Copied beside the destination, then swapped in: a reader never sees half a profile.
    replace_dir(dest, lambda tmp: shutil.copytree(args.profile, tmp, dirs_exist_ok=True))
    print(f"rkvprof: installed {args.profile} as {dest}; simulations on hardware {prof.hardware!r} now use it",
          file=sys.stdout)
    return 0
