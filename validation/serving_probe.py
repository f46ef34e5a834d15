"""The engine's speed at the moment of a replay: a short batched-bench probe before and after.

A shared host's speed drifts by more than the error a serving forecast is judged on. So each
replay is bracketed by a probe: two llama-batched-bench invocations at points of the engine
profile's own grid that the cell's load exercises (the grid prompt length nearest the
workload's token-weighted mean prompt; batch 1 and the server's slot count; the grid's decode
length), pinned to the server's cores while the server sits idle. Each point's time over the profile's
median for the same point is the host's speed then (1.0 = as profiled; 1.1 = 10% slower).
The simulation uses the profile scaled by the mean of the two probes, per stage (prefill,
decode), written beside the results as a profile of its own; the probes' disagreement is the
cell's drift, and a cell whose drift exceeds a threshold cannot verify a forecast.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rkvsim.models.files import atomic_write, write_json

TIME_COLUMNS = ("time_s_median", "time_s_p10", "time_s_p90", "time_s_mean", "time_s_std", "time_s_min", "time_s_max")
STAGE_OF_ROW = {"prefill": "prefill", "decode": "decode", "server_decode": "decode"}
DRIFT_MAX_PCT = 2.0     # issue 16: the accuracy goals apply to cells whose probes agree within 2%


@dataclass(frozen=True)
class ProbePlan:
    kv: str
    prompt_tokens: int
    gen_tokens: int
    batches: tuple[int, ...]

    def as_dict(self) -> dict:
        return {**asdict(self), "batches": list(self.batches)}


def _bench_rows(rows: list[dict], kv: str) -> list[dict]:
    return [r for r in rows if r["method"] == kv and r["stage"] in ("prefill", "decode")]


PROBE_MAX_PROMPT = 128     # keeps a probe to a few seconds (its prefills run at every probed batch)


def plan_probe(rows: list[dict], kv: str, prompts: np.ndarray, n_parallel: int) -> ProbePlan:
    """Grid points of the profile that this workload's steps look most like: the grid prompt
    nearest the token-weighted mean prompt (where the prefill time goes; at most
    PROBE_MAX_PROMPT), batch 1 and the largest grid batch up to the slot count."""
    bench = _bench_rows(rows, kv)
    if not bench:
        raise ValueError(f"the engine profile has no bench rows for KV type {kv}")
    pps = sorted({int(r["prompt_tokens"]) for r in bench})
    p = np.asarray(prompts, np.float64)
    target = float((p * p).sum() / p.sum()) if len(p) and p.sum() > 0 else float(pps[0])
    cands = [x for x in pps if x <= PROBE_MAX_PROMPT] or pps[:1]
    pp = min(cands, key=lambda x: abs(math.log(x) - math.log(max(target, 1.0))))
    batches = sorted({int(r["batch_size"]) for r in bench if int(r["prompt_tokens"]) == pp})
    top = max([b for b in batches if b <= n_parallel] or batches[:1])
    gen = min(int(r["gen_tokens"]) for r in bench)
    return ProbePlan(kv, pp, gen, tuple(sorted({batches[0], top})))


def profile_points(rows: list[dict], plan: ProbePlan) -> dict[tuple[str, int], float]:
    """{(stage, batch): the profile's median time} at the probe's points."""
    out = {}
    for r in _bench_rows(rows, plan.kv):
        if int(r["prompt_tokens"]) == plan.prompt_tokens and int(r["gen_tokens"]) == plan.gen_tokens \
                and int(r["batch_size"]) in plan.batches:
            out[(r["stage"], int(r["batch_size"]))] = float(r["time_s_median"])
    return out


def measured_points(bench_results: list[dict]) -> dict[tuple[str, int], float]:
    """{(stage, batch): seconds} from llama-batched-bench results (prefill whole, decode per step).
    A configuration listed twice keeps its last run (the first is the warm-up)."""
    out = {}
    for r in bench_results:
        out[("prefill", int(r["pl"]))] = float(r["t_pp"])
        out[("decode", int(r["pl"]))] = float(r["t_tg"]) / int(r["tg"])
    return out


def speed(measured: dict, profiled: dict) -> dict:
    """Time over the profile's time per stage (geometric mean over the probe's points)."""
    out: dict = {"points": []}
    for stage in ("prefill", "decode"):
        ratios = [measured[k] / profiled[k] for k in sorted(profiled) if k[0] == stage and k in measured]
        if not ratios:
            raise ValueError(f"the probe measured no {stage} point of the profile")
        out[stage] = float(math.exp(statistics.fmean(math.log(x) for x in ratios)))
    out["points"] = [{"stage": s, "batch": b, "profile_s": profiled[(s, b)], "measured_s": measured[(s, b)]}
                     for (s, b) in sorted(profiled) if (s, b) in measured]
    return out


def drift(before: dict, after: dict) -> dict:
    """How far the host's speed moved between the two probes (after / before - 1, in %)."""
    d = {s: 100.0 * (after[s] / before[s] - 1.0) for s in ("prefill", "decode")}
    d["max_abs"] = max(abs(d["prefill"]), abs(d["decode"]))
    return d


def scale_at_replay(before: dict, after: dict) -> dict[str, float]:
    """The speed the replay ran at, per stage: the geometric mean of the two probes."""
    return {s: math.sqrt(before[s] * after[s]) for s in ("prefill", "decode")}


def write_scaled_profile(src: Path, rows: list[dict], meta: dict, factors: dict[str, float], out: Path) -> Path:
    """The engine profile with every time multiplied by its stage's factor, as a profile folder."""
    from rkvsim.simulator.llamacpp_cost import STEPS_FILE
    out.mkdir(parents=True, exist_ok=True)
    scaled = []
    for r in rows:
        f = factors[STAGE_OF_ROW[r["stage"]]]
        scaled.append({**r, **{c: repr(float(r[c]) * f) for c in TIME_COLUMNS if r.get(c) not in (None, "")}})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(scaled)
    data = buf.getvalue().encode()
    atomic_write(out / STEPS_FILE, lambda fh: fh.write(data))
    write_json(out / "meta.json", {**meta, "scaled_from": str(src), "probe_scale": factors}, sort_keys=True,
               default=str)
    return out


def run_probe(bench_binary: Path, gguf: Path, plan: ProbePlan, settings, repeats: int = 2) -> dict:
    """Time the plan's points `repeats` times, the median of each kept; {(stage, batch): s}.

    Each invocation runs the first batch once more before the measured ones and drops it: the
    first configuration after loading the model pays first-touch costs (up to 40% on a 16-token
    prefill here) that the profile's medians over repeats do not carry."""
    from dataclasses import replace

    from rkvsim.profiler.engine_bench import bench_command, run_bench
    ctx = max(plan.batches) * (plan.prompt_tokens + plan.gen_tokens)
    s = replace(settings, ctx_size=max(256, -(-ctx // 256) * 256))
    npl = [plan.batches[0], *plan.batches]
    cmd = bench_command(bench_binary, gguf, plan.kv, [plan.prompt_tokens], [plan.gen_tokens], npl, s)
    reps: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        rows, _raw = run_bench(cmd, timeout_s=300, cores=s.cores())
        for k, v in measured_points(rows).items():
            reps.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in reps.items()}
