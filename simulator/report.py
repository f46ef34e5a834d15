"""One self-contained HTML report of a simulation: summary table, verdicts, plots.

The plotly library is embedded inline (the file works offline and can be mailed);
per-request and time-series data are thinned so that the file stays a few MB.
Verdict sentences are computed from the numbers only, relative to the fp16 row when
there is one.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rkvsim.models.files import write_bytes

if TYPE_CHECKING:  # pandas stays off the simulator's import path
    import pandas as pd

MAX_POINTS = 2000  # per method (and replica) and per curve
BASELINE = "fp16"
_LATENCIES = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E"))


def write_report(path: Path | str, summary: dict, requests: "pd.DataFrame", timeseries: "pd.DataFrame") -> None:
    """Write the report to `path` atomically (a reader never sees half a file)."""
    text = render_report(summary, requests, timeseries)
    write_bytes(Path(path), text.encode("utf-8"))


def render_report(summary: dict, requests: "pd.DataFrame", timeseries: "pd.DataFrame") -> str:
    """The report as one HTML string."""
    methods: dict[str, dict] = summary.get("methods", {})
    labels = list(methods)
    scenario = str(summary.get("scenario", "?"))
    sources = summary.get("cost_source", "unknown")
    # Methods may get their costs from different places; name them all.
    sources = [str(x) for x in sources] if isinstance(sources, (list, tuple)) else [str(sources)]
    cost = ", ".join(sources)
    figs = [_cdf_figure(requests, labels), _throughput_figure(methods), _timeseries_figure(timeseries, labels)]
    plots = [f.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
             for i, f in enumerate(figs)]
    uncalibrated = not all(x.startswith("profile:") for x in sources)
    esc = html.escape
    verdicts = "".join(f"<li>{esc(v)}</li>" for v in verdict_lines(methods))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>rkvsim: {esc(scenario)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.cost {{ display: inline-block; padding: .3em .7em; border-radius: .3em; font-weight: bold;
        background: {"#fde8c8" if uncalibrated else "#d8f0d8"}; }}
.top {{ display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .5em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f2f2f2; }}
</style></head><body>
<h1>rkvsim: {esc(scenario)}</h1>
<p><span class="cost">costs: {esc(cost)}</span> &nbsp; seed {esc(str(summary.get("seed", "?")))}</p>
<div class="top">
<div>{_summary_table(methods)}</div>
<div style="max-width: 46em"><h3>Verdict</h3><ul>{verdicts}</ul></div>
</div>
{_trust_table(summary)}
{"".join(plots)}
</body></html>
"""


def _trust_table(summary: dict) -> str:
    """How far to trust the costs: the measured error of each way a part was obtained (cost_trust)."""
    from rkvsim.simulator.table import trust_rows
    rows = trust_rows(summary)
    if not rows:
        return ""
    esc = html.escape
    body = "".join(
        f"<tr><td>{esc(f['part'])}</td><td>{esc(ms)}</td><td style='text-align:left'>{esc(f['how'])}</td>"
        f"<td>{_fmt(f.get('median_pct'))}</td><td>{_fmt(f.get('worst_pct'))}</td><td>{f.get('cases', 0)}</td>"
        f"<td style='text-align:left'>{esc(f.get('measured_by', ''))}</td></tr>" for ms, f in rows)
    return ("<h3>How far to trust these costs</h3><p>Where each part's error could be measured, the error that "
            "way of obtaining it showed (MAPE, %); n/a: nothing measured it.</p><table><tr><th>part</th>"
            "<th>methods</th><th>measured how</th><th>typical %</th><th>worst %</th><th>cases</th>"
            f"<th>measured by</th></tr>{body}</table>")


# ---------------------------------------------------------------- numbers
def _num(v) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _lat(row: dict, key: str, q: str) -> float | None:
    d = row.get(key) or {}
    return _num(d.get(q)) if isinstance(d, dict) else None


def _fmt(v, digits: int = 3) -> str:
    v = _num(v)
    if v is None:
        return "n/a"
    if v != 0 and (abs(v) >= 10 ** digits or abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}" if abs(v) < 1 else f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _ratio(a, b) -> str:
    a, b = _num(a), _num(b)
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def verdict_lines(methods: dict[str, dict]) -> list[str]:
    """One computed sentence per method, relative to fp16 when present."""
    base = methods.get(BASELINE)
    out = []
    for label, m in methods.items():
        parts = []
        if base is not None and label != BASELINE:
            parts.append(f"{_ratio(m.get('output_tokens_per_s'), base.get('output_tokens_per_s'))} "
                         f"the output throughput of {BASELINE}")
            parts.append(f"p90 E2E {_ratio(_lat(m, 'e2e_s', 'p90'), _lat(base, 'e2e_s', 'p90'))}")
            parts.append(f"TTFT p90 {_ratio(_lat(m, 'ttft_s', 'p90'), _lat(base, 'ttft_s', 'p90'))}")
            parts.append(f"TPOT p90 {_ratio(_lat(m, 'tpot_s', 'p90'), _lat(base, 'tpot_s', 'p90'))}")
            ml, bl = _num(m.get("mean_output_tokens")), _num(base.get("mean_output_tokens"))
            if ml is not None and bl is not None and abs(ml - bl) > 0.005 * bl:
                # Only with verbosity on: the workload's lengths differ per method.
                parts.append(f"answers {_ratio(ml, bl)} as long")
        else:
            parts.append(f"{_fmt(m.get('output_tokens_per_s'))} output tokens/s")
            parts.append(f"p90 E2E {_fmt(_lat(m, 'e2e_s', 'p90'))} s")
            parts.append(f"TTFT p90 {_fmt(_lat(m, 'ttft_s', 'p90'))} s")
            parts.append(f"TPOT p90 {_fmt(_lat(m, 'tpot_s', 'p90'))} s")
        rej = _num(m.get("requests_rejected"))
        parts.append(f"{int(rej) if rej is not None else 'n/a'} rejected")
        pre = _num(m.get("preemptions"))
        parts.append(f"{int(pre) if pre is not None else 'n/a'} preemptions")
        kv = _num(m.get("kv_peak_fraction"))
        parts.append(f"KV peaked at {kv * 100:.0f}% of capacity" if kv is not None else "KV peak n/a")
        out.append(f"{label}: " + ", ".join(parts) + ".")
    return out


_COLUMNS = (
    ("completed", lambda m: m.get("requests_completed")),
    ("rejected", lambda m: m.get("requests_rejected")),
    ("mean out len", lambda m: m.get("mean_output_tokens")),
    ("out tok/s", lambda m: m.get("output_tokens_per_s")),
    ("req/s", lambda m: m.get("requests_per_s")),
    ("prefill tok/s", lambda m: m.get("prefill_tokens_per_s")),
    ("TTFT p50 s", lambda m: _lat(m, "ttft_s", "p50")),
    ("TTFT p90 s", lambda m: _lat(m, "ttft_s", "p90")),
    ("TPOT p50 s", lambda m: _lat(m, "tpot_s", "p50")),
    ("TPOT p90 s", lambda m: _lat(m, "tpot_s", "p90")),
    ("ITL p99 s", lambda m: _lat(m, "itl_s", "p99")),
    ("E2E p50 s", lambda m: _lat(m, "e2e_s", "p50")),
    ("E2E p90 s", lambda m: _lat(m, "e2e_s", "p90")),
    ("E2E p99 s", lambda m: _lat(m, "e2e_s", "p99")),
    ("queue p90 s", lambda m: _lat(m, "queue_s", "p90")),
    ("preempt.", lambda m: m.get("preemptions")),
    ("KV peak %", lambda m: None if _num(m.get("kv_peak_fraction")) is None else 100 * _num(m["kv_peak_fraction"])),
    ("mean batch", lambda m: m.get("mean_batch_size")),
    ("prefix hit %", lambda m: None if "prefix_cache" not in m else 100 * m["prefix_cache"]["hit_rate"]),
    ("prefill saved", lambda m: (m.get("prefix_cache") or {}).get("saved_prefill_tokens")),
)


def _summary_table(methods: dict[str, dict]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in _COLUMNS)
    rows = []
    for label, m in methods.items():
        cells = "".join(f"<td>{_fmt(get(m))}</td>" for _, get in _COLUMNS)
        rows.append(f"<tr><td><b>{html.escape(str(label))}</b></td>{cells}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"


# ---------------------------------------------------------------- plots
def _thin(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most `limit` evenly spaced points out of n, first and last kept."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def _cdf_figure(requests: "pd.DataFrame", labels: list[str]):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=1, cols=3, subplot_titles=[f"{t} CDF (s)" for _, t in _LATENCIES])
    colors = _colors(labels)
    done = requests
    if "rejected" in requests.columns:
        done = requests[~requests["rejected"].fillna(False).astype(bool)]
    for col_i, (col, _) in enumerate(_LATENCIES, start=1):
        for label in labels:
            if col not in done.columns:
                continue
            v = done.loc[done["method"] == label, col].to_numpy(dtype=float)
            v = np.sort(v[np.isfinite(v)])
            if len(v) == 0:
                continue
            idx = _thin(len(v))
            fig.add_trace(go.Scatter(x=v[idx], y=(idx + 1) / len(v), mode="lines", name=label,
                                     legendgroup=label, showlegend=col_i == 1,
                                     line={"color": colors[label], "shape": "hv"}), row=1, col=col_i)
    fig.update_yaxes(range=[0, 1.01], title_text="fraction of completed requests", row=1, col=1)
    fig.update_layout(title="Latency distributions (completed requests)", height=420)
    return fig


def _throughput_figure(methods: dict[str, dict]):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    labels = list(methods)
    colors = _colors(labels)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["output tokens/s", "requests/s"])
    for col_i, key in enumerate(("output_tokens_per_s", "requests_per_s"), start=1):
        y = [_num(methods[l].get(key)) for l in labels]
        fig.add_trace(go.Bar(x=labels, y=[v if v is not None else 0 for v in y],
                             marker_color=[colors[l] for l in labels], showlegend=False,
                             text=[_fmt(v) for v in y], textposition="outside"), row=1, col=col_i)
    fig.update_layout(title="Throughput", height=380)
    return fig


def _timeseries_figure(timeseries: "pd.DataFrame", labels: list[str]):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=["KV cache occupancy (fraction of capacity)", "batch size"])
    colors = _colors(labels)
    has_replica = "replica" in timeseries.columns and timeseries["replica"].nunique() > 1
    for label in labels:
        sub = timeseries[timeseries["method"] == label]
        groups = sub.groupby("replica", sort=True) if has_replica else [(None, sub)]
        first = True
        for rep, g in groups:
            g = g.sort_values("time_s")
            idx = _thin(len(g))
            t = g["time_s"].to_numpy(dtype=float)[idx]
            name = label if rep is None else f"{label} r{rep}"
            for row, col in ((1, "kv_fraction"), (2, "batch_size")):
                if col not in g.columns:
                    continue
                fig.add_trace(go.Scatter(x=t, y=g[col].to_numpy(dtype=float)[idx], mode="lines", name=name,
                                         legendgroup=label, showlegend=(row == 1 and first),
                                         line={"color": colors[label], "shape": "hv", "width": 1}),
                              row=row, col=1)
            first = False
    fig.update_xaxes(title_text="time (s)", row=2, col=1)
    fig.update_layout(title="Over time", height=600)
    return fig


def _colors(labels: list[str]) -> dict[str, str]:
    import plotly.colors as pc

    pal = pc.qualitative.Plotly
    return {l: pal[i % len(pal)] for i, l in enumerate(labels)}

