"""Service-level objectives: 'ttft_p99<=2s,e2e_p90<=30s,tpot_p50<=80ms' -> checks on a summary row."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

METRICS = {"ttft": "ttft_s", "tpot": "tpot_s", "itl": "itl_s", "e2e": "e2e_s", "queue": "queue_s"}
STATS = ("mean", "p50", "p90", "p99")
_RE = re.compile(r"^\s*([a-z0-9]+)_(mean|p50|p90|p99)\s*<=\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$")


class SLOError(ValueError):
    pass


@dataclass(frozen=True)
class SLO:
    name: str          # as written, e.g. ttft_p99
    column: str        # row column, e.g. ttft_s_p99
    limit_s: float

    def value(self, row: dict) -> float:
        v = row.get(self.column)
        return math.nan if v is None else float(v)

    def met(self, row: dict) -> bool:
        v = self.value(row)
        return math.isfinite(v) and v <= self.limit_s

    def __str__(self) -> str:
        return f"{self.name}<={self.limit_s:g}s"


def parse_slos(text: str) -> list[SLO]:
    out = []
    for part in [p for p in text.split(",") if p.strip()]:
        m = _RE.match(part)
        if not m or m.group(1) not in METRICS:
            raise SLOError(f"--slo {part.strip()!r}: write METRIC_STAT<=LIMIT with METRIC in "
                           f"{', '.join(METRICS)}, STAT in {', '.join(STATS)}, LIMIT in s or ms, e.g. ttft_p99<=2s")
        limit = float(m.group(3)) / (1000.0 if m.group(4) == "ms" else 1.0)
        out.append(SLO(f"{m.group(1)}_{m.group(2)}", f"{METRICS[m.group(1)]}_{m.group(2)}", limit))
    if not out:
        raise SLOError("--slo: give at least one objective, e.g. 'ttft_p99<=2s,e2e_p90<=30s'")
    return out


def meets(row: dict, slos: list[SLO]) -> bool:
    """Every objective met, every request served (a set-up that rejects requests meets no SLO)."""
    if row.get("status") != "ok" or row.get("requests_rejected", 1) > 0:
        return False
    return all(s.met(row) for s in slos)


def slack(row: dict, slos: list[SLO]) -> float:
    """Worst value/limit over the objectives (<= 1: met); inf for a set-up that does not fit."""
    if row.get("status") != "ok":
        return math.inf
    vals = [s.value(row) / s.limit_s for s in slos]
    return max((v if math.isfinite(v) else math.inf) for v in vals)
