"""The routing comparison printed after a run with `arms:`: per compared method, mean and p90
end-to-end latency of each arm, and each arm's mean speed-up over the first arm."""
from __future__ import annotations

from rich.table import Table


def routing_rows(summary: dict) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """(arm names in order, {method: {arm: {"mean", "p90", "label"}}}) from a run's summary."""
    arms: list[str] = []
    rows: dict[str, dict[str, dict]] = {}
    for label, setup in summary.get("setups", {}).items():
        arm = setup.get("arm")
        if arm is None or label not in summary["methods"]:
            continue
        if arm not in arms:
            arms.append(arm)
        key = setup["method"] + (f"@tp{setup['tp']}" if "@tp" in label else "")
        e2e = summary["methods"][label]["e2e_s"]
        rows.setdefault(key, {})[arm] = {"mean": e2e["mean"], "p90": e2e["p90"], "label": label,
                                         "fleet": setup["fleet"], "rejected": summary["methods"][label]["requests_rejected"]}
    return arms, rows


def routing_table(summary: dict) -> Table:
    arms, rows = routing_rows(summary)
    t = Table(title="end-to-end latency per arm (s); x = first arm's mean / this arm's mean")
    t.add_column("method")
    for a in arms:
        t.add_column(f"{a} mean/p90", justify="right")
    for a in arms[1:]:
        t.add_column(f"{a} x", justify="right")
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for method, per in rows.items():
        cells = [f"{fmt(per[a]['mean'])}/{fmt(per[a]['p90'])}" if a in per else "-" for a in arms]
        base = per.get(arms[0], {}).get("mean") if arms else None
        ratios = []
        for a in arms[1:]:
            m = per.get(a, {}).get("mean")
            ratios.append("-" if not base or not m else f"{base / m:.2f}x")
        t.add_row(method, *cells, *ratios)
    return t
