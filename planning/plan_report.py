"""`rkvsim plan` output: the table printed, and the HTML report with capacity curves."""
from __future__ import annotations

import html

from rkvsim.planning.plan import PlanResult


def _rate(mp) -> str:
    r = mp.max_rate
    if not r:
        return "-"
    ge = ">=" if r["lower_bound"] else ""
    return f"{ge}{r['median']:.3g} [{r['min']:.3g}-{r['max']:.3g}]"


def _neg(mp) -> str:
    n = mp.negatives
    if n is None or n.get("rate") is None:
        return "n/a" if mp.method != "fp16" else "(baseline)"
    return f"{n['rate']:.1%} ({n['negatives']}/{n['benign']})"


def plan_table(res: PlanResult):
    from rich.markup import escape
    from rich.table import Table
    t = Table(title=f"capacity at {res.rate:g} req/s, SLO {', '.join(map(str, res.slos))}, {len(res.seeds)} seeds")
    for c in ("method", "fewest GPUs", "per-seed fewest", "max req/s there (median [min-max])",
              "negative samples (LongBench)", "notes"):
        t.add_column(escape(c))   # "[min-max]" would otherwise be read as a style tag
    for mp in res.methods:
        per = ",".join("-" if g is None else str(g) for g in mp.per_seed_gpus)
        t.add_row(*(escape(x) for x in (mp.method, mp.sentence(), per, _rate(mp), _neg(mp), "; ".join(mp.notes))))
    return t


def capacity_figure(res: PlanResult):
    """Per method: share of seeds meeting every SLO, and the worst objective's value/limit, vs GPUs."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("share of seeds meeting every SLO",
                                                        "worst objective / its limit (<= 1 meets)"))
    for mp in res.methods:
        best = {}
        for x in mp.curve:
            if x["gpus"] not in best or (x["share"], -x["slack"]) > (best[x["gpus"]]["share"], -best[x["gpus"]]["slack"]):
                best[x["gpus"]] = x
        gs = sorted(best)
        txt = [best[g]["config"] for g in gs]
        fig.add_trace(go.Scatter(x=gs, y=[best[g]["share"] for g in gs], mode="lines+markers", name=mp.method,
                                 legendgroup=mp.method, text=txt), row=1, col=1)
        fig.add_trace(go.Scatter(x=gs, y=[min(best[g]["slack"], 10) for g in gs], mode="lines+markers",
                                 name=mp.method, legendgroup=mp.method, showlegend=False, text=txt), row=1, col=2)
    fig.add_hline(y=1.0, line_dash="dot", row=1, col=2)
    fig.update_xaxes(title_text="GPUs (replicas x TP)")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(height=440, title=f"capacity curves at {res.rate:g} req/s")
    return fig


def rate_figure(res: PlanResult):
    import plotly.graph_objects as go
    ms = [mp for mp in res.methods if mp.max_rate]
    if not ms:
        return None
    med = [mp.max_rate["median"] for mp in ms]
    fig = go.Figure(go.Bar(x=[f"{mp.method} ({mp.max_rate['config']})" for mp in ms], y=med,
                           error_y=dict(type="data", symmetric=False,
                                        array=[mp.max_rate["max"] - m for mp, m in zip(ms, med)],
                                        arrayminus=[m - mp.max_rate["min"] for mp, m in zip(ms, med)])))
    fig.update_layout(title="highest rate meeting every SLO at the fewest-GPU configuration (median, min-max over seeds)",
                      yaxis_title="requests/s", height=420)
    return fig


def render(res: PlanResult, name: str) -> str:
    figs = [f for f in (capacity_figure(res), rate_figure(res)) if f is not None]
    plots = "".join(f.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
                    for i, f in enumerate(figs))
    rows = "".join(f"<tr><td>{html.escape(mp.method)}</td><td>{html.escape(mp.sentence())}</td>"
                   f"<td>{html.escape(','.join('-' if g is None else str(g) for g in mp.per_seed_gpus))}</td>"
                   f"<td>{html.escape(_rate(mp))}</td><td>{html.escape(_neg(mp))}</td>"
                   f"<td>{html.escape('; '.join(mp.notes))}</td></tr>" for mp in res.methods)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rkvsim plan: {html.escape(name)}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} th, td {{ border: 1px solid #ccc; padding: .25em .5em; }}
th {{ background: #f2f2f2; }}</style></head><body>
<h1>rkvsim plan: {html.escape(name)}</h1>
<p>rate {res.rate:g} req/s; SLO {html.escape(', '.join(map(str, res.slos)))} (and no request rejected);
seeds {html.escape(str(res.seeds))}; verbosity: {html.escape(res.verbosity)}; costs: {html.escape(res.cost_source)};
{res.runs} simulations</p>
<table><tr><th>method</th><th>fewest GPUs</th><th>per-seed fewest</th><th>max req/s there</th>
<th>negative samples (LongBench, Llama-3-8B-Instruct, threshold 0.1)</th><th>notes</th></tr>{rows}</table>
{plots}
</body></html>
"""
