"""The count-vs-threshold curve of negative samples as a self-contained plotly HTML file."""
from __future__ import annotations

from pathlib import Path

from rkvsim.models.files import write_bytes
from rkvsim.calibration.quality.negatives import ThresholdCurve


def curve_figure(curve: ThresholdCurve, marked: float | None = None):
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, ys in curve.counts.items():
        fig.add_trace(go.Scatter(x=[100 * t for t in curve.thresholds], y=ys, mode="lines", name=name,
                                 hovertemplate="%{x:.0f}%: %{y} negatives<extra>" + name + "</extra>"))
    if marked is not None:
        fig.add_vline(x=100 * marked, line_dash="dot", line_color="grey",
                      annotation_text=f"threshold {100 * marked:g}%")
    fig.update_layout(
        title=f"Negative samples vs threshold ({curve.mode} counting)",
        xaxis_title="threshold (% drop from the baseline score)", yaxis_title="negative samples",
        template="plotly_white", hovermode="x unified",
    )
    return fig


def write_curve_html(path: Path | str, curve: ThresholdCurve, marked: float | None = None) -> Path:
    """Write atomically: a reader (or a browser reloading) never sees half a file."""
    path = Path(path)
    text = curve_figure(curve, marked).to_html(full_html=True, include_plotlyjs=True,
                                               config={"displaylogo": False})
    write_bytes(path, text.encode("utf-8"))
    return path
