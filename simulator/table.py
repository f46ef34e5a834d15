"""The per-method table printed after a run."""
from __future__ import annotations

from rich.table import Table


def _f(x, scale=1.0, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x * scale)


def method_table(summary: dict) -> Table:
    t = Table(title=f"{summary['scenario']} (seed {summary['seed']})")
    # Prefix-cache columns only where a run kept a prefix cache and some request hit it.
    prefix = any((m.get("prefix_cache") or {}).get("saved_prefill_tokens") for m in summary["methods"].values())
    for col in ("method", "done", "rej", "out len", "out tok/s", "req/s", "TTFT p50/p90 s", "TPOT p50/p90 ms",
                "E2E p50/p90 s", "preempt", "KV peak", "batch", *(("prefix hit",) if prefix else ())):
        t.add_column(col, justify="right" if col != "method" else "left")
    for label, m in summary["methods"].items():
        hit = (_f(m["prefix_cache"]["hit_rate"], 100, "{:.0f}%") if "prefix_cache" in m else "off",) if prefix else ()
        t.add_row(
            label, str(m["requests_completed"]), str(m["requests_rejected"]),
            # Mean output tokens per request: where verbosity is on, compression changes it.
            _f(m.get("mean_output_tokens"), fmt="{:.0f}"),
            _f(m["output_tokens_per_s"], fmt="{:.0f}"), _f(m["requests_per_s"]),
            f"{_f(m['ttft_s']['p50'])}/{_f(m['ttft_s']['p90'])}",
            f"{_f(m['tpot_s']['p50'], 1e3, '{:.1f}')}/{_f(m['tpot_s']['p90'], 1e3, '{:.1f}')}",
            f"{_f(m['e2e_s']['p50'])}/{_f(m['e2e_s']['p90'])}",
            str(m["preemptions"]), _f(m["kv_peak_fraction"], 100, "{:.0f}%"),
            _f(m["mean_batch_size"], fmt="{:.1f}"), *hit,
        )
    return t


def trust_rows(summary: dict) -> list[tuple[str, dict]]:
    """Each distinct trust figure of the run (summary's cost_trust per method) with the methods it
    applies to, in first-seen order: [(methods, figure)]."""
    seen: dict[str, tuple[list[str], dict]] = {}
    for label, m in summary.get("methods", {}).items():
        for f in m.get("cost_trust") or []:
            key = repr(sorted(f.items()))
            seen.setdefault(key, ([], f))[0].append(label)
    every = list(summary.get("methods", {}))
    return [("all" if ms == every else ", ".join(ms), f) for ms, f in seen.values()]


def trust_line(summary: dict) -> str | None:
    """One line: the measured error of each way this run's costs were obtained."""
    rows = trust_rows(summary)
    if not rows:
        return None
    bits = []
    for ms, f in rows:
        who = "" if ms == "all" else f" [{ms}]"
        if f.get("median_pct") is None:
            bits.append(f"{f['part']}{who}: not measured")
        elif f["cases"] == 1:
            bits.append(f"{f['part']}{who} {f['median_pct']:.1f}% (1 case)")
        else:
            bits.append(f"{f['part']}{who} {f['median_pct']:.1f}% (median of {f['cases']} cases, worst "
                        f"{f['worst_pct']:.1f}%)")
    return "trust (measured error of how each part was obtained; cost_trust in summary.json): " + "; ".join(bits)
