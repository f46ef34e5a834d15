"""Where a compression method starts to beat FP16 along one axis (the paper's "heavy KV" regime,
found from the sweep's rows, not assumed).

For each method and each combination of the other axes, the metric is averaged over seeds at
every value x of the axis and compared with FP16's at the same point (same TP and arm). The
crossover is the smallest x from which the method wins at every larger x; between the last
losing and the first winning value it is interpolated linearly on the relative gap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

HIGHER_IS_BETTER = ("output_tokens_per_s", "requests_per_s", "prefill_tokens_per_s", "requests_completed")
BASELINE = "fp16"


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


@dataclass
class Crossover:
    method: str
    group: dict                 # values of the other axes
    metric: str
    axis: str
    x: float | None             # interpolated crossover; None: never within the range
    status: str                 # 'crosses', 'always', 'never'
    between: tuple | None       # (last losing x, first winning x)
    advantage: list[tuple]      # (x, relative advantage over FP16; > 0 = better)

    def sentence(self) -> str:
        where = "".join(f", {k}={v}" for k, v in self.group.items())
        if self.status == "always":
            return (f"{self.method} beats {BASELINE} on {self.metric} over the whole swept range "
                    f"({self.axis} >= {self.advantage[0][0]:g}{where})")
        if self.status == "never":
            best = max(self.advantage, key=lambda t: t[1])
            return (f"{self.method} does not beat {BASELINE} on {self.metric} at the largest {self.axis} swept "
                    f"({self.advantage[-1][0]:g}{where}); best relative gap {best[1]:+.1%} at {best[0]:g}")
        lo, hi = self.between
        return (f"{self.method} beats {BASELINE} on {self.metric} from {self.axis} ~ {self.x:.4g} "
                f"(between {lo:g} and {hi:g}{where})")


def advantage(method_value: float, base_value: float, metric: str) -> float:
    """Relative advantage over FP16: > 0 when the method is better."""
    if base_value is None or method_value is None or not math.isfinite(base_value) or not math.isfinite(method_value):
        return math.nan
    if base_value == 0:
        return math.nan
    if higher_is_better(metric):
        return method_value / base_value - 1.0
    return base_value / method_value - 1.0 if method_value else math.nan


def find_crossovers(df, axis: str, metric: str, other_axes: list[str]) -> list[Crossover]:
    """One Crossover per (method, other-axes combination) with an FP16 row to compare with."""
    ok = df[df["status"] == "ok"]
    if metric not in ok.columns:
        raise ValueError(f"report.metric: {metric!r} is not a row column; use e.g. e2e_s_p90, ttft_s_p99, "
                         "output_tokens_per_s")
    keys = [k for k in other_axes if k in ok.columns] + ["tp", "arm"]
    mean = ok.groupby(keys + ["compress", axis], dropna=False)[metric].mean().reset_index()
    out = []
    for gvals, g in mean.groupby(keys, dropna=False):
        gvals = gvals if isinstance(gvals, tuple) else (gvals,)
        group = {k: v for k, v in zip(keys, gvals) if k in other_axes}
        base = g[g["compress"] == BASELINE].set_index(axis)[metric]
        if base.empty:
            continue
        for method, gm in g[g["compress"] != BASELINE].groupby("compress"):
            s = gm.set_index(axis)[metric]
            xs = sorted(x for x in s.index if x in base.index)
            adv = [(float(x), advantage(float(s[x]), float(base[x]), metric)) for x in xs]
            adv = [(x, a) for x, a in adv if not math.isnan(a)]
            if not adv:
                continue
            wins = [a > 0 for _, a in adv]
            k = len(wins)
            while k > 0 and wins[k - 1]:
                k -= 1
            if k == len(wins):
                out.append(Crossover(method, group, metric, axis, None, "never", None, adv))
            elif k == 0:
                out.append(Crossover(method, group, metric, axis, adv[0][0], "always", None, adv))
            else:
                (x0, a0), (x1, a1) = adv[k - 1], adv[k]
                x = x0 + (x1 - x0) * (0 - a0) / (a1 - a0) if a1 != a0 else x1
                out.append(Crossover(method, group, metric, axis, x, "crosses", (x0, x1), adv))
    return out
