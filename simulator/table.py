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
