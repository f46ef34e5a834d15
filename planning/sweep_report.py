"""The sweep's HTML report: throughput-vs-latency curves per method, a heatmap over two axes of
each method's advantage over FP16, the crossovers, and the rows' table beside."""
from __future__ import annotations

import html
import math

from rkvsim.planning.crossover import BASELINE, Crossover, advantage, higher_is_better

MAX_TABLE_ROWS = 400


def curves_figure(ok, axis: str, metric: str):
    """Per method: output tokens/s against the metric, one point per value of `axis` (seed mean)."""
    import plotly.graph_objects as go
    fig = go.Figure()
    for method, g in ok.groupby("method"):
        m = g.groupby(axis)[["output_tokens_per_s", metric]].mean().reset_index().sort_values(axis)
        fig.add_trace(go.Scatter(x=m["output_tokens_per_s"], y=m[metric], mode="lines+markers", name=method,
                                 text=[f"{axis}={v}" for v in m[axis]], hovertemplate="%{text}<br>%{x:.0f} tok/s, %{y:.3g}"))
    fig.update_layout(title=f"throughput vs {metric} (one point per {axis}, mean over seeds and other axes)",
                      xaxis_title="output tokens/s", yaxis_title=metric, height=480)
    return fig


def heatmap_figure(ok, ax1: str, ax2: str, metric: str):
    """Per compression method: its relative advantage over FP16 on `metric` over (ax1, ax2)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    mean = ok.groupby(["compress", "tp", "arm", ax1, ax2], dropna=False)[metric].mean().reset_index()
    base = mean[mean["compress"] == BASELINE].set_index(["tp", "arm", ax1, ax2])[metric]
    methods = [m for m in mean["compress"].unique() if m != BASELINE]
    if base.empty or not methods:
        return None
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=methods, shared_yaxes=True)
    for i, m in enumerate(methods):
        g = mean[mean["compress"] == m]
        xs, ys = sorted(g[ax1].unique()), sorted(g[ax2].unique())
        z = [[math.nan] * len(xs) for _ in ys]
        for _, r in g.iterrows():
            key = (r["tp"], r["arm"], r[ax1], r[ax2])
            if key in base.index:
                z[ys.index(r[ax2])][xs.index(r[ax1])] = advantage(float(r[metric]), float(base[key]), metric)
        fig.add_trace(go.Heatmap(x=[str(x) for x in xs], y=[str(y) for y in ys], z=z, zmid=0, colorscale="RdBu",
                                 coloraxis=None, showscale=(i == 0), colorbar=dict(title="vs fp16", tickformat="+.0%")),
                      row=1, col=i + 1)
        fig.update_xaxes(title_text=ax1, row=1, col=i + 1)
    fig.update_yaxes(title_text=ax2, row=1, col=1)
    better = "higher" if higher_is_better(metric) else "lower"
    fig.update_layout(title=f"advantage over fp16 on {metric} ({better} is better; blue: compression wins)",
                      height=420)
    return fig


def _table(df) -> str:
    cols = [c for c in df.columns if c not in ("schema_version", "point_key", "cost_source")]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for _, r in df.head(MAX_TABLE_ROWS).iterrows():
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.4g}" if isinstance(v, float) else html.escape(str(v)))
        body.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    more = f"<p>first {MAX_TABLE_ROWS} of {len(df)} rows; all in rows.parquet</p>" if len(df) > MAX_TABLE_ROWS else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def render(name: str, df, axes: list[str], x_axis: str | None, metric: str, heat: list[str] | None,
           crossovers: list[Crossover]) -> str:
    ok = df[df["status"] == "ok"] if len(df) else df
    figs = []
    if x_axis and len(ok):
        figs.append(curves_figure(ok, x_axis, metric))
    if heat and len(heat) == 2 and len(ok):
        f = heatmap_figure(ok, heat[0], heat[1], metric)
        if f is not None:
            figs.append(f)
    plots = "".join(f.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
                    for i, f in enumerate(figs))
    cross = "".join(f"<li>{html.escape(c.sentence())}</li>" for c in crossovers) or \
        "<li>no crossover computed (needs an fp16 row and a numeric axis)</li>"
    sources = ", ".join(sorted(set(ok["cost_source"]))) if len(ok) else "n/a"
    failed = int((df["status"] != "ok").sum()) if len(df) else 0
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rkvsim sweep: {html.escape(name)}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.top {{ display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }}
table {{ border-collapse: collapse; font-size: 0.8em; }} th, td {{ border: 1px solid #ccc; padding: .2em .4em; }}
th {{ background: #f2f2f2; }} .tbl {{ max-height: 40em; overflow: auto; }}</style></head><body>
<h1>rkvsim sweep: {html.escape(name)}</h1>
<p>costs: {html.escape(sources)} &nbsp; {len(df)} rows over axes {html.escape(', '.join(axes))};
{failed} rows whose set-up does not fit the hardware</p>
<div class="top"><div style="max-width: 50em"><h3>Where compression starts to beat fp16</h3><ul>{cross}</ul></div>
<div class="tbl">{_table(df)}</div></div>
{plots}
</body></html>
"""
