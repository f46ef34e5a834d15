"""`rkvsim lengths report --html F`: the length report as a plotly page with its table beside it.

Two figures: each config's total-token ratio over FP16 with its bootstrap interval (the
fp16-reseed interval shaded as the sampling-noise band, the paper's Table 4 increases as
markers), and the distribution of reply lengths per config (ECDF, the cap marked).
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from rkvsim.models.files import write_bytes

NOISE = "fp16-reseed"


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}×"


def _table(rep: dict) -> str:
    cols = ("config", "n", "D≥50%", "D≤−50%", "median r", "Σ tokens ratio", "90% CI", "longer?",
            "hit cap", "to cap | base ends", "paper D≥50%", "paper D≤−50%", "paper T4")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for c in rep["configs"]:
        lo, hi = c["token_ratio_ci"]
        t4 = c["paper_table4"]
        cells = [c["config"], str(c["n"]), _fmt(c["d_ge_50"], True), _fmt(c["d_le_m50"], True),
                 _fmt(c["median_ratio"]), _fmt(c["token_ratio"]),
                 "–" if math.isnan(lo) else f"{lo:.2f}–{hi:.2f}", c["verdict"], _fmt(c["cap_share"], True),
                 _fmt(c["cap_share_when_base_stopped"], True), _fmt(c["paper_d_ge_50"], True),
                 _fmt(c["paper_d_le_m50"], True), f"{t4['mean_increase']:.2f}× ({t4['setting']})" if t4 else "–"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _ratio_figure(rep: dict):
    import plotly.graph_objects as go

    cs = [c for c in rep["configs"] if not math.isnan(c["token_ratio_ci"][0])]
    names = [c["config"] for c in cs]
    fig = go.Figure()
    noise = next((c for c in cs if c["config"] == NOISE), None)
    if noise is not None:
        lo, hi = noise["token_ratio_ci"]
        fig.add_hrect(y0=lo, y1=hi, fillcolor="grey", opacity=0.15, line_width=0,
                      annotation_text="fp16-reseed 90% CI (sampling noise)", annotation_position="top left")
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey")
    colour = {"longer": "#c0392b", "shorter": "#2471a3"}
    fig.add_trace(go.Scatter(
        x=names, y=[c["token_ratio"] for c in cs], mode="markers", name="Σ tokens ratio (ours)",
        marker={"size": 10, "color": [colour.get(c["verdict"], "#555") for c in cs]},
        error_y={"type": "data", "symmetric": False,
                 "array": [c["token_ratio_ci"][1] - c["token_ratio"] for c in cs],
                 "arrayminus": [c["token_ratio"] - c["token_ratio_ci"][0] for c in cs]},
        hovertemplate="%{x}: %{y:.2f}×<extra></extra>"))
    t4 = [(c["config"], c["paper_table4"]["mean_increase"]) for c in cs if c["paper_table4"]]
    if t4:
        fig.add_trace(go.Scatter(x=[a for a, _ in t4], y=[b for _, b in t4], mode="markers",
                                 name="paper Table 4 (lengthened requests only)",
                                 marker={"symbol": "x", "size": 9, "color": "#7d3c98"}))
    fig.update_layout(title="Total reply tokens under each config / under FP16, same prompts "
                            "(bootstrap 90% interval over prompts)",
                      yaxis_title="Σ L_config / Σ L_fp16", template="plotly_white")
    return fig


def _ecdf_figure(rows, cap):
    import plotly.graph_objects as go

    by_cfg: dict[str, list[int]] = {}
    for r in rows:
        by_cfg.setdefault(str(r["config"]), []).append(int(r["response_tokens"]))
    fig = go.Figure()
    for name in sorted(by_cfg, key=lambda n: (n != "fp16", n)):
        v = np.sort(by_cfg[name])
        fig.add_trace(go.Scatter(x=v, y=np.arange(1, len(v) + 1) / len(v), mode="lines", name=name,
                                 line={"shape": "hv", "width": 3 if name == "fp16" else 1.5},
                                 visible=True if name in ("fp16", NOISE) or name.startswith("kivi")
                                 else "legendonly"))
    if cap:
        fig.add_vline(x=cap, line_dash="dot", line_color="grey", annotation_text=f"cap {cap}")
    fig.update_layout(title="Reply lengths per config (click the legend to compare others)",
                      xaxis_title="reply tokens", yaxis_title="share of prompts ≤ x", template="plotly_white")
    return fig


def render(rep: dict, rows) -> str:
    figs = [_ratio_figure(rep), _ecdf_figure(rows, rep.get("max_new_tokens"))]
    plots = "".join(f.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
                    for i, f in enumerate(figs))
    status = (f"still being collected: {rep['n_complete_prompts']} of {rep['n_target']} prompts complete"
              if rep["incomplete"] else "collection complete")
    esc = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rkvsim: response lengths under compression</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .5em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f2f2f2; }}
</style></head><body>
<h1>Response lengths under KV-cache compression</h1>
<p>{esc(str(rep['n_prompts']))} prompts ({esc(str(rep['n_rows']))} rows), model {esc(str(rep['model']))},
max_new_tokens {esc(str(rep['max_new_tokens']))}; {esc(status)}. FP16 hit the cap in
{esc(_fmt(rep['baseline_cap_share'], True))} of prompts. r = L_config / L_fp16, D = 1 − r; compare
every row with fp16-reseed, an independent FP16 sample of the same prompts.</p>
{_table(rep)}
{plots}
</body></html>
"""


def write_html(path: Path | str, rep: dict, rows) -> Path:
    path = Path(path)
    write_bytes(path, render(rep, rows).encode("utf-8"))
    return path
