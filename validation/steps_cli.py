"""`rkvsim validate --profile DIR --measured CSV [--out DIR2]`: tables, JSON, CSV and a parity plot."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


MODES = (
    ("engine_kfold", "calibrated + per-method engine terms, 5-fold over step shapes (held out)"),
    ("engine_lomo", "calibrated + shared engine terms, leave-one-method-out (held out)"),
    ("operators", "calibrated operators only (no measured rows used)"),
    ("operators_prior", "calibrated operators + the prior's step overheads (a simulation without fitted engine terms)"),
    ("roofline", "roofline prior (uncalibrated)"),
)


def add_parser(sub) -> None:
    v = sub.add_parser("validate", help="score step-throughput forecasts against measured engine throughput")
    v.add_argument("--profile", required=True, help="profile folder (rkvprof collect / import-vidur), fitted or not")
    v.add_argument("--measured", required=True, help="CSV: model,method,bsz,prompt_len,stage,thr")
    v.add_argument("--out", default=None, help="output folder (default results/validate-<profile folder name>)")
    v.add_argument("--budget", type=int, default=512,
                   help="eviction budget (tokens) for H2O/StreamingLLM/SnapKV rows (default 512, the paper's)")
    v.add_argument("--hardware", default=None,
                   help="the GPU the measured rows come from, when not the profile's: the profile's operators are "
                        "carried there by the datasheet roofline (what a simulation on a GPU nobody profiled uses)")
    v.add_argument("--folds", type=int, default=5, help="k of the k-fold over step shapes (default 5)")
    v.add_argument("--install-engine", action="store_true",
                   help="also save the engine terms fitted on ALL rows beside the profile's fit, so "
                        "simulations on this hardware use them")
    v.set_defaults(func=cmd_validate)


def cmd_validate(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from rkvsim.validation.steps import (ValidationError, fit_engine_terms, heldout_kfold_shapes,
                                         heldout_leave_one_method_out, operator_seconds, read_measured, score_table)

    from rkvsim.models.files import write_bytes
    from rkvsim.calibration.steps.profiles import fit_for
    from rkvsim.calibration.steps.fit import FitError, fit_folder
    from rkvsim.models import resolve_hardware
    from rkvsim.profiler.device import ProfilerError
    from rkvsim.profiler.profile import load_profile

    from rkvsim.models.files import UnreadableFile

    con = Console(width=None if sys.stdout.isatty() else 120)
    try:
        prof = load_profile(args.profile)
        try:
            hw = resolve_hardware(args.hardware or prof.hardware)
        except KeyError as e:
            raise ValidationError(f"--hardware: {e.args[0]}") from None
        if args.install_engine and hw.name != prof.hardware:
            raise ValidationError(f"--install-engine: the engine terms would be fitted on {hw.name} rows but saved "
                                  f"beside a {prof.hardware} profile; drop --hardware or --install-engine")
        df = read_measured(args.measured)
        fit_for(Path(args.profile))     # fits (and caches) once if `rkvprof fit` was not run
        p = operator_seconds(df, Path(args.profile), hw, args.budget)
    except (ValidationError, ProfilerError, FitError, LookupError, UnreadableFile) as e:
        print(f"rkvsim validate: {e}", file=sys.stderr)
        return 2
    stage, bsz = df["stage"].to_numpy(), df["bsz"].to_numpy()
    work = np.where(stage == "prefill", df["bsz"] * df["prompt_len"], df["bsz"]).astype(float)
    seconds = {
        "engine_kfold": heldout_kfold_shapes(p, df, folds=args.folds),
        "engine_lomo": heldout_leave_one_method_out(p, df),
        "operators": p.ops_s,
        "operators_prior": p.ops_s + _prior_overheads(hw, bsz),
        "roofline": p.roofline_s,
    }
    pred = {k: work / np.maximum(v, 1e-12) for k, v in seconds.items()}
    scores = {k: score_table(df, v) for k, v in pred.items()}

    final = fit_engine_terms(p, bsz, stage, per_method=True, source=f"fitted on {Path(args.measured).name}",
                             fitted_on=[Path(args.measured).name, f"{len(df)} rows, all methods"])
    out = Path(args.out or Path("results") / f"validate-{Path(args.profile).resolve().name}")
    out.mkdir(parents=True, exist_ok=True)

    primary = scores["engine_kfold"]
    doc = {
        "methods": primary["methods"], "overall": primary["overall"],
        "overall_prefill": primary["overall_prefill"], "overall_decoding": primary["overall_decoding"],
        "metric": "100 * mean(1 - |predicted - measured| / measured) of step throughput",
        "primary": MODES[0][1],
        "fitted_on": (f"engine terms fitted on the measured rows of the other {args.folds - 1} of {args.folds} folds of "
                      "step shapes (stage, bsz, prompt_len) for each row scored, every method of a shape held out "
                      "together; operator predictors fitted on the profile only, never on measured rows"),
        "profile": str(Path(args.profile).resolve()), "hardware": hw.name,
        "cost_source": prof.origin if hw.name == prof.hardware else f"{prof.origin} carried to {hw.name}",
        "measured": str(Path(args.measured).resolve()), "rows": int(len(df)), "budget": args.budget,
        "modes": {k: {"description": d, **scores[k]} for k, d in MODES},
        "engine_terms_all_rows": final.to_json(),
    }
    write_bytes(out / "validation.json", json.dumps(doc, indent=1).encode())
    table = df.copy()
    table["rkvsim_method"] = p.labels
    table["measured_step_s"] = p.meas_s
    for k, _ in MODES:
        table[f"pred_thr_{k}"] = pred[k]
    write_bytes(out / "predictions.csv", table.to_csv(index=False).encode())
    write_bytes(out / "parity.html", _parity_html(table, scores).encode())
    if args.install_engine:
        dest = fit_folder(Path(args.profile))
        dest.mkdir(parents=True, exist_ok=True)
        from rkvsim.simulator.calibrated import ENGINE_FILE
        write_bytes(dest / ENGINE_FILE, json.dumps(final.to_json(), indent=1).encode())

    for k, desc in MODES:
        t = Table(title=f"{desc}")
        for c in ("method", "accuracy %", "prefill %", "decoding %", "rows"):
            t.add_column(c, justify="right" if c != "method" else "left")
        for m, r in scores[k]["methods"].items():
            t.add_row(m, f"{r['accuracy']:.1f}", _fmt(r["prefill"]), _fmt(r["decoding"]), str(r["rows"]))
        s = scores[k]
        t.add_row("overall", f"{s['overall']:.1f}", _fmt(s["overall_prefill"]), _fmt(s["overall_decoding"]),
                  str(len(df)), style="bold")
        con.print(t)
    t = Table(title="engine terms fitted on all rows" + (" (installed beside the profile)" if args.install_engine else ""))
    for c in ("method", "stage", "dense scale", "attention scale", "fixed ms", "per-seq ms"):
        t.add_column(c)
    rows = [("shared", "prefill", final.prefill), ("shared", "decoding", final.decode)]
    for lab, d in sorted(final.per_method.items()):
        rows += [(lab, "prefill", d["prefill"]), (lab, "decoding", d["decode"])]
    for lab, st, x in rows:
        t.add_row(lab, st, f"{x.scale:.3f}", f"{x.attn_scale:.3f}", f"{x.fixed_s * 1e3:.2f}", f"{x.per_seq_s * 1e3:.3f}")
    con.print(t)
    con.print(f"wrote {out / 'validation.json'}, {out / 'predictions.csv'}, {out / 'parity.html'}")
    return 0


def _prior_overheads(hw, bsz: np.ndarray) -> np.ndarray:
    """Seconds the simulator adds to each step when no engine terms are installed (EngineTerms.prior:
    the roofline prior's stated per-step and per-sequence overheads)."""
    from rkvsim.simulator.roofline import default_efficiency
    e = default_efficiency(hw)
    return e.step_overhead_s + e.per_seq_overhead_s * bsz.astype(float)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _parity_html(table, scores) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from rkvsim.validation.steps import STAGES
    fig = make_subplots(rows=1, cols=len(MODES), subplot_titles=[f"{d} ({scores[k]['overall']:.1f}%)"
                                                                 for k, d in MODES])
    for j, (k, _) in enumerate(MODES, start=1):
        for m, g in table.groupby("method"):
            for st, sym in zip(STAGES, ("circle", "diamond")):
                h = g[g["stage"] == st]
                fig.add_trace(go.Scatter(x=h["thr"], y=h[f"pred_thr_{k}"], mode="markers", name=f"{m} {st}",
                                         marker_symbol=sym, legendgroup=f"{m} {st}", showlegend=j == 1,
                                         text=[f"bsz {b}, len {n}" for b, n in zip(h["bsz"], h["prompt_len"])]),
                              row=1, col=j)
        lo, hi = float(table["thr"].min()) * 0.8, float(table["thr"].max()) * 1.2
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="grey"),
                                 showlegend=False), row=1, col=j)
        fig.update_xaxes(type="log", title_text="measured tokens/s", row=1, col=j)
        fig.update_yaxes(type="log", title_text="predicted tokens/s", row=1, col=j)
    fig.update_layout(height=520, width=430 * len(MODES), title="Step throughput: predicted vs measured")
    rows = "".join(f"<tr><td>{d}</td><td>{scores[k]['overall']:.1f}</td><td>{scores[k]['overall_prefill']:.1f}</td>"
                   f"<td>{scores[k]['overall_decoding']:.1f}</td></tr>" for k, d in MODES)
    per = "".join(f"<tr><td>{m}</td>" + "".join(f"<td>{scores[k]['methods'][m]['accuracy']:.1f}</td>" for k, _ in MODES)
                  + "</tr>" for m in scores["engine_kfold"]["methods"])
    head = "".join(f"<th>{d}</th>" for _, d in MODES)
    return ("<html><head><meta charset='utf-8'><title>rkvsim validate</title></head><body>"
            "<h2>Step throughput accuracy (paper's metric, %)</h2>"
            f"<table border=1><tr><th>forecast</th><th>overall</th><th>prefill</th><th>decoding</th></tr>{rows}</table>"
            f"<h3>Per method</h3><table border=1><tr><th>method</th>{head}</tr>{per}</table>"
            + fig.to_html(full_html=False, include_plotlyjs=True) + "</body></html>")
