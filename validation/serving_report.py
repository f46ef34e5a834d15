"""validate-serving's HTML report: measured vs simulated latency CDFs and the figures table."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from rkvsim.models.files import atomic_write

from rkvsim.validation.serving_compare import LATENCIES, STATS

_TITLES = {"ttft_s": "TTFT", "tpot_s": "TPOT", "e2e_s": "E2E"}


def _cdf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(x[np.isfinite(x)])
    return x, np.arange(1, len(x) + 1) / max(len(x), 1)


def render(result: dict, measured_cols: dict, simulated_cols: dict) -> str:
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=1, cols=3, subplot_titles=[f"{_TITLES[k]} (s)" for k in LATENCIES])
    for col, key in enumerate(LATENCIES, start=1):
        for name, cols, colour in (("measured", measured_cols, "#1f77b4"), ("simulated", simulated_cols, "#d62728")):
            x, y = _cdf(np.asarray(cols[key], np.float64))
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=name, line={"color": colour},
                                     showlegend=col == 1, line_shape="hv"), row=1, col=col)
    fig.update_yaxes(title_text="fraction of requests", row=1, col=1)
    fig.update_layout(height=420, margin={"t": 60})
    m, s, e = result["measured"], result["simulated"], result["error_pct"]
    fmt = lambda v, d=4: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    rows = [("output tokens/s", m["output_tokens_per_s"], s["output_tokens_per_s"], e["output_tokens_per_s"]),
            ("requests/s", m["requests_per_s"], s["requests_per_s"], e["requests_per_s"])]
    rows += [(f"{_TITLES[k]} {st}", m[k][st], s[k][st], e[k][st]) for k in LATENCIES for st in STATS]
    table = "".join(f"<tr><td>{html.escape(n)}</td><td>{fmt(a)}</td><td>{fmt(b)}</td><td>{fmt(c, 1)}</td></tr>"
                    for n, a, b, c in rows)
    sat = (f"measured queue growth {fmt(m['queue_growth_s_per_s'], 3)} s/s, simulated "
           f"{fmt(s['queue_growth_s_per_s'], 3)} s/s; simulator says "
           f"{'SATURATED' if s['saturated'] else 'below capacity'}")
    head = html.escape(f"{result['scenario']} · {result['method']} · {result['requests']} requests · {result['load']}")
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>validate-serving {html.escape(result['scenario'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 10px;text-align:right}} td:first-child{{text-align:left}}</style>
</head><body><h1>Real llama-server vs rkvsim</h1><p>{head}</p>
<p>engine: {html.escape(result['engine'])}<br>simulated costs: {html.escape(result['cost_source'])}<br>{html.escape(sat)}</p>
{fig.to_html(full_html=False, include_plotlyjs=True, config={"displaylogo": False})}
<table><tr><th>figure</th><th>measured</th><th>simulated</th><th>error %</th></tr>{table}</table>
</body></html>"""


def write_report(path: Path, result: dict, measured_cols: dict, simulated_cols: dict) -> None:
    text = render(result, measured_cols, simulated_cols).encode("utf-8")
    atomic_write(Path(path), lambda f: f.write(text))
