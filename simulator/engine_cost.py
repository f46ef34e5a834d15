"""Step cost of a llama.cpp server iteration, from an engine profile (rkvprof collect --engine).

The profile's batched-bench rows are llama_decode calls of known shape. Every call (and every
server iteration) is reduced to three numbers:
  T      tokens in the call (decode tokens + prompt-chunk tokens): the dense layers;
  A_dec  keys attended by decode tokens = sum of their context lengths (KV read per token);
  A_pre  keys attended by prompt tokens = sum over chunks of n * past + n (n + 1) / 2 (causal).
and its time is modelled as
  t = g(T) + k_dec * A_dec + k_pre * A_pre
with g piecewise linear through one knot per token count the bench measured (linear
extrapolation past the last knot) and k_dec, k_pre >= 0, plus what the server adds around
llama_decode (sampling and streaming a token for each slot that produces one):
  + server_step_s + server_seq_s * (decode tokens + prompts that end in the step)
fitted (both >= 0) to the profile's `server_decode` rows (profiler/engine_server_probe.py):
the server's measured decode iterations minus the bench model's prediction for them. The knots and slopes come from one
weighted least-squares fit (weights 1/t: relative error) over the KV type's rows, so the
model interpolates the measurements linearly in tokens and in KV length, never by nearest
neighbour. Decode rows at one batch size but different prompt lengths fix k_dec; prefill
rows with the same tokens per call but different prompt lengths fix k_pre.

Reads plain CSV/JSON: the simulator imports neither torch nor rkvsim.profiler.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from rkvsim.models import Method

from .cost_model import StepBatch

ENGINE_SOURCE = "rkvprof-engine"
STEPS_FILE = "engine_steps.csv"
PACKAGED_ROOT = Path(__file__).resolve().parent.parent / "profiler" / "data"


class EngineProfileError(ValueError):
    """No usable engine profile; the message names the fix."""


def read_engine_profile(folder: Path | str) -> tuple[dict, list[dict]]:
    folder = Path(folder)
    meta_path, rows_path = folder / "meta.json", folder / STEPS_FILE
    if not meta_path.is_file() or not rows_path.is_file():
        raise EngineProfileError(f"profile: {folder} holds no engine profile (meta.json + {STEPS_FILE}); "
                                 "make one with `rkvprof collect --engine llamacpp --out DIR`")
    meta = json.loads(meta_path.read_text())
    if meta.get("source") != ENGINE_SOURCE:
        raise EngineProfileError(f"profile: {folder} is a {meta.get('source')!r} profile, not an engine profile "
                                 "(rkvprof collect --engine llamacpp)")
    if meta.get("status") != "complete":
        raise EngineProfileError(f"profile: {folder} is an unfinished collection; rerun the same "
                                 "`rkvprof collect --engine` command to finish it")
    with open(rows_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return meta, rows


def packaged_engine_profiles(model: str, hardware: str = "cpu") -> list[Path]:
    """Engine profiles shipped with rkvsim for a model (newest first)."""
    base = PACKAGED_ROOT / hardware / f"llamacpp-{model}"
    found = [p.parent for p in base.glob("*/meta.json")]
    return sorted(found, key=lambda p: json.loads((p / "meta.json").read_text()).get("finished", ""), reverse=True)


def origin(meta: dict) -> str:
    """cost_source: which measurements the costs come from."""
    date = (meta.get("finished") or meta.get("started") or "")[:10]
    commit = (meta.get("llamacpp_commit") or "?")[:7]
    return (f"profile:{meta.get('hardware', 'cpu')}@{date} engine llama.cpp {commit} "
            f"({meta.get('threads')} threads, {meta.get('cpu')})")


def _observations(rows: list[dict], kv: str) -> np.ndarray:
    """(T, A_dec, A_pre, seconds) per llama_decode call, one line per profile row."""
    obs = []
    for r in rows:
        if r["method"] != kv:
            continue
        pl, pp, tg, steps = (int(r[k]) for k in ("batch_size", "prompt_tokens", "gen_tokens", "steps"))
        t = float(r["time_s_median"])
        if r["stage"] == "decode":
            # Step i (0-based) feeds position pp + i, attending pp + i + 1 keys.
            obs.append((pl, pl * (pp + (tg + 1) / 2), 0.0, t))
        elif r["stage"] == "prefill":
            # The bench's prefill batch holds whole sequences in order; each call gets an equal share.
            obs.append((pl * pp / steps, 0.0, pl * pp * (pp + 1) / 2 / steps, t / steps))
    return np.array(obs, dtype=np.float64).reshape(-1, 4)


class EngineCostModel:
    """CostModel of one llama.cpp KV type. See the module docstring for the model."""

    def __init__(self, meta: dict, rows: list[dict], method: Method):
        kv = method.kind
        obs = _observations(rows, kv)
        if len(obs) < 4:
            raise EngineProfileError(f"methods: the engine profile has {len(obs)} rows for KV type {kv!r}; "
                                     f"collect it: rkvprof collect --engine llamacpp --kv {kv}")
        self.method, self.meta = method, meta
        self.source = origin(meta)
        self.knots, self.values, self.k_dec, self.k_pre = _fit(obs)
        self.fit_error = self._fit_error(obs)
        self.server_step_s, self.server_seq_s = self._server_overhead(rows, kv)

    # ---- the CostModel protocol --------------------------------------------------------
    def step_time(self, batch: StepBatch) -> float:
        n, a_dec, a_pre = _reduce(batch)
        if n == 0:
            return 0.0
        return (self._g(n) + self.k_dec * a_dec + self.k_pre * a_pre
                + self.server_step_s + self.server_seq_s * _n_logits(batch))

    def breakdown(self, batch: StepBatch) -> dict[str, float]:
        n, a_dec, a_pre = _reduce(batch)
        if n == 0:
            return {}
        return {"dense": self._g(n), "attn_decode": self.k_dec * a_dec, "attn_prefill": self.k_pre * a_pre,
                "server": self.server_step_s + self.server_seq_s * _n_logits(batch)}

    # ---- internals -----------------------------------------------------------------------
    def _g(self, n: float) -> float:
        x, y = self.knots, self.values
        if n <= x[-1] or len(x) == 1:
            return float(np.interp(n, x, y))
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        return float(y[-1] + slope * (n - x[-1]))

    def _bench_decode(self, batch: int, ctx: float) -> float:
        return self._g(batch) + self.k_dec * batch * ctx

    def _server_overhead(self, rows: list[dict], kv: str) -> tuple[float, float]:
        """(per iteration, per sampled sequence) seconds the server adds; (0, 0) without probe rows."""
        pts = []
        for r in rows:
            if r["method"] == kv and r["stage"] == "server_decode":
                c, pp, tg = int(r["batch_size"]), int(r["prompt_tokens"]), int(r["gen_tokens"])
                # The probe's gaps are steady-state tokens 9..tg: contexts around pp + (9 + tg) / 2.
                pts.append((c, float(r["time_s_median"]) - self._bench_decode(c, pp + (9 + tg) / 2)))
        if not pts:
            return 0.0, 0.0
        c, o = np.array(pts, dtype=np.float64).T
        if len(set(c.tolist())) > 1:
            b, a = np.polyfit(c, o, 1)
        else:
            a, b = float(o.mean()), 0.0
        # Overheads cannot be negative: refit the other term alone when one would be.
        if b < 0:
            a, b = max(0.0, float(o.mean())), 0.0
        if a < 0:
            a, b = 0.0, max(0.0, float((o * c).sum() / (c * c).sum()))
        return float(a), float(b)

    def _fit_error(self, obs: np.ndarray) -> dict:
        pred = np.array([self._g(t) + self.k_dec * ad + self.k_pre * ap for t, ad, ap, _ in obs])
        rel = np.abs(pred - obs[:, 3]) / obs[:, 3]
        return {"mean_abs_rel": float(rel.mean()), "max_abs_rel": float(rel.max()), "rows": int(len(obs))}


def _n_logits(b: StepBatch) -> int:
    """Sequences that sample a token in the step: every decode, and every prompt that ends."""
    n = len(b.decode_ctx)
    if len(b.prefill_new):
        n += len(b.prefill_new) if b.prefill_done is None else int(np.count_nonzero(b.prefill_done))
    return n


def _reduce(b: StepBatch) -> tuple[int, float, float]:
    n_dec = len(b.decode_ctx)
    a_dec = float(b.decode_ctx.sum()) if n_dec else 0.0
    if len(b.prefill_new):
        new = b.prefill_new.astype(np.float64)
        a_pre = float((new * b.prefill_past).sum() + (new * (new + 1)).sum() / 2)
        return n_dec + int(b.prefill_new.sum()), a_dec, a_pre
    return n_dec, a_dec, 0.0


def _fit(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Knot values of g and the two attention slopes: weighted least squares, slopes >= 0,
    then g made non-decreasing (more tokens never cost less)."""
    t_tok, a_dec, a_pre, y = obs.T
    knots = np.unique(np.round(t_tok, 6))
    # Hat basis: g(T) = sum_k v_k * hat_k(T); one-hot when T is a knot (always, here).
    basis = np.zeros((len(obs), len(knots)))
    for i, t in enumerate(t_tok):
        j = int(np.searchsorted(knots, t))
        if j < len(knots) and math.isclose(knots[j], t):
            basis[i, j] = 1.0
        else:
            w = (t - knots[j - 1]) / (knots[j] - knots[j - 1])
            basis[i, j - 1], basis[i, j] = 1 - w, w
    w = 1.0 / y
    free = [0, 1]   # which attention slopes are still fitted
    cols = [a_dec, a_pre]
    while True:
        X = np.column_stack([basis] + [cols[c] for c in free]) if free else basis
        sol, *_ = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)
        slopes = dict(zip(free, sol[len(knots):]))
        neg = [c for c, v in slopes.items() if v < 0]
        if not neg:
            break
        free = [c for c in free if c not in neg]
    values = np.maximum.accumulate(np.maximum(sol[:len(knots)], 0.0))
    return knots, values, float(slopes.get(0, 0.0)), float(slopes.get(1, 0.0))


def find_engine_profile(scn) -> Path:
    """The scenario's `profile:` folder, else the newest engine profile shipped for its model."""
    if scn.profile:
        p = Path(scn.profile).expanduser()
        if not p.is_dir():
            raise EngineProfileError(f"profile: {scn.profile} is not a folder; give an engine profile folder "
                                     "(rkvprof collect --engine llamacpp --out DIR)")
        return p
    from rkvsim.models import resolve_model
    name = resolve_model(scn.model).name
    found = packaged_engine_profiles(name, scn.hardware)
    if not found:
        raise EngineProfileError(f"profile: no llama.cpp engine profile ships for {name} on {scn.hardware}; "
                                 f"collect one (rkvprof collect --engine llamacpp --model {name} --out DIR) "
                                 "and set profile: DIR")
    return found[0]


_CACHE: dict[tuple[str, str], EngineCostModel] = {}


def engine_cost_model(scn, method: Method) -> EngineCostModel:
    folder = find_engine_profile(scn)
    rows_file = folder / STEPS_FILE
    # Keyed on the table's mtime too: a profile collected again is read again.
    key = (str(folder.resolve()), method.kind, rows_file.stat().st_mtime_ns if rows_file.exists() else 0)
    hit = _CACHE.get(key)
    if hit is None:
        meta, rows = read_engine_profile(folder)
        hit = _CACHE[key] = EngineCostModel(meta, rows, method)
    return hit
