"""bench_serving's HTML report: per-replay errors against probe drift, ratios measured vs simulated,
and the tables beside them."""
from __future__ import annotations

import html
from pathlib import Path

from rkvsim.models.files import atomic_write

_COLOURS = {"f16": "#1f77b4", "q8_0": "#ff7f0e", "q4_0": "#2ca02c"}


def _fmt(v, d=1, sign=True) -> str:
    if v is None:
        return "–"
    return f"{v:+.{d}f}" if sign else f"{v:.{d}f}"


def render(summary: dict) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "mean E2E error (%) against the replay's probe drift (%)",
        f"ratio to {summary['reference']}: simulated against measured (mean E2E)"])
    for kv in sorted({c["kv"] for c in summary["cells"]}):
        cs = [c for c in summary["cells"] if c["kv"] == kv and c["probe_drift_pct"] is not None]
        fig.add_trace(go.Scatter(x=[c["probe_drift_pct"] for c in cs], y=[c["error_pct"]["e2e_s"]["mean"] for c in cs],
                                 mode="markers", name=kv, marker={"color": _COLOURS.get(kv)},
                                 text=[f"{c['cell']} r{c['round'] + 1}" for c in cs]), row=1, col=1)
        rs = [r for r in summary["ratios"] if r["kv"] == kv and r["simulation"] == "as profiled"]
        fig.add_trace(go.Scatter(x=[r["figures"]["E2E mean"]["measured"] for r in rs],
                                 y=[r["figures"]["E2E mean"]["simulated"] for r in rs], mode="markers",
                                 name=f"{kv} ratio", marker={"color": _COLOURS.get(kv), "symbol": "diamond"},
                                 text=[r["cell"] for r in rs]), row=1, col=2)
    rs = [r["figures"]["E2E mean"][k] for r in summary["ratios"] for k in ("measured", "simulated")]
    rs = [x for x in rs if x is not None]
    if rs:
        lo, hi = min(rs), max(rs)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                                 line={"color": "#999", "dash": "dot"}), row=1, col=2)
    fig.update_layout(height=460, margin={"t": 60})
    head = ("<tr><th>cell</th><th>kv</th><th>round</th><th>meas tok/s</th><th>thpt err</th><th>E2E mean err</th>"
            "<th>E2E p90 err</th><th>TTFT p90 err</th><th>E2E mean err as profiled</th><th>probe speed</th>"
            "<th>drift %</th><th>verdict</th></tr>")
    rows = "".join(
        f"<tr><td>{html.escape(c['cell'])}</td><td>{c['kv']}</td><td>{c['round'] + 1}</td>"
        f"<td>{_fmt(c['measured']['output_tokens_per_s'], 1, False)}</td><td>{_fmt(c['error_pct']['output_tokens_per_s'])}</td>"
        f"<td>{_fmt(c['error_pct']['e2e_s']['mean'])}</td><td>{_fmt(c['error_pct']['e2e_s']['p90'])}</td>"
        f"<td>{_fmt(c['error_pct']['ttft_s']['p90'])}</td>"
        f"<td>{_fmt(((c.get('error_pct_as_profiled') or {}).get('e2e_s') or {}).get('mean'))}</td>"
        f"<td>{_fmt((c['probe_speed'] or {}).get('decode'), 3, False)}</td><td>{_fmt(c['probe_drift_pct'], 1, False)}</td>"
        f"<td>{c['verdict']}</td></tr>" for c in summary["cells"])
    rhead = ("<tr><th>cell</th><th>kv</th><th>simulation</th><th>rounds</th>"
             + "".join(f"<th>{html.escape(k)} meas / sim (err %)</th>" for k in
                       ("throughput", "E2E mean", "E2E p90", "TTFT mean", "TTFT p90")) + "</tr>")
    rrows = "".join(
        f"<tr><td>{html.escape(r['cell'])}</td><td>{r['kv']}</td><td>{r['simulation']}</td><td>{r['rounds']}</td>"
        + "".join(f"<td>{_fmt(f['measured'], 3, False)} / {_fmt(f['simulated'], 3, False)} ({_fmt(f['error_pct'])})</td>"
                  for f in r["figures"].values()) + "</tr>" for r in summary["ratios"])
    floor = "".join(f"<li>{kv}: {d['replays']} replays, mean TPOT spread {_fmt(d['tpot_s_spread_pct'])}%, mean E2E "
                    f"spread {_fmt(d['e2e_s_spread_pct'])}%</li>" for kv, d in summary["drift_floor"].items())
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>bench_serving</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 8px;text-align:right}} td:first-child{{text-align:left}}</style>
</head><body><h1>llama-server (measured) vs rkvsim (simulated)</h1>
<p>error = (simulated - measured) / measured; simulated at the speed the replay's probes measured unless marked
"as profiled". Capacity of {html.escape(summary['reference'])}: {_fmt(summary['capacity_requests_per_s'], 3, False)} requests/s.</p>
{fig.to_html(full_html=False, include_plotlyjs=True, config={"displaylogo": False})}
<h2>Replays</h2><table>{head}{rows}</table>
<h2>Ratios</h2><table>{rhead}{rrows}</table>
<h2>Drift floor</h2><ul>{floor}</ul></body></html>"""


def write_report(path: Path, summary: dict) -> None:
    text = render(summary).encode("utf-8")
    atomic_write(Path(path), lambda f: f.write(text))
