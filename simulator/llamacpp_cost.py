"""Step cost of a llama.cpp server iteration, from an engine profile (rkvprof collect --engine).

The cost is paid per physical batch (ubatch): llama.cpp cuts every llama_decode call into
ubatches (simulator/ubatch.py), and each ubatch reads all the weights once. A ubatch is
reduced to three numbers:
  T      tokens in it (decode tokens + prompt tokens): the dense layers;
  A_dec  keys attended by its decode tokens = sum of their context lengths (KV read per token);
  A_pre  keys attended by its prompt tokens = sum over sequences of n * past + n (n + 1) / 2;
and its time is modelled as
  u = g(T) + k_dec * A_dec + k_pre * A_pre
with g piecewise linear through one knot per ubatch size the bench produced (linear
extrapolation past the last knot) and k_dec, k_pre >= 0. A bench row or a server iteration
costs the sum over its ubatches, so the bench rows are cut exactly as llama.cpp cut them
(one KV stream per sequence: llama-batched-bench sizes n_seq_max to its largest batch) and a
server iteration is cut by its slots' sequence ids (StepBatch.decode_seq / prefill_seq; slots
in a row compute together, a gap between slots costs a second ubatch). What the server adds
around llama_decode (sampling and streaming a token for each slot that produces one) is
  + server_step_s + server_seq_s * (decode tokens + prompts that end in the step)
fitted (both >= 0) to the profile's `server_decode` rows (profiler/engine_server_probe.py):
the server's measured decode iterations minus the bench model's prediction for them, pooled
over the profile's KV types (the overhead is the same for all of them). The knots
and slopes come from one weighted least-squares fit (weights 1/t: relative error) over the KV
type's rows, g non-decreasing and the slopes >= 0 as bounds: the sums over ubatches keep the
problem linear in the knot values.

Reads plain CSV/JSON: the simulator imports neither torch nor rkvsim.profiler.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from rkvsim.models import Method

from rkvsim.simulator import ubatch
from rkvsim.simulator.cost_model import StepBatch
from rkvsim.models.files import read_json

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
    meta = read_json(meta_path, "engine profile meta.json")
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
    return sorted(found, key=lambda p: read_json(p / "meta.json", "engine profile meta.json").get("finished", ""), reverse=True)


def origin(meta: dict) -> str:
    """cost_source: which measurements the costs come from."""
    date = (meta.get("finished") or meta.get("started") or "")[:10]
    commit = (meta.get("llamacpp_commit") or "?")[:7]
    return (f"profile:{meta.get('hardware', 'cpu')}@{date} engine llama.cpp {commit} "
            f"({meta.get('threads')} threads, {meta.get('cpu')})")


Ubatch = tuple[float, float, float]   # (T, A_dec, A_pre) of one physical batch


def _bench_streams(rows: list[dict], kv: str) -> int:
    """KV streams of the bench's context: llama-batched-bench sets n_seq_max to its largest batch."""
    return max([int(r["batch_size"]) for r in rows if r["method"] == kv and r["stage"] in ("prefill", "decode")] or [1])


def _observations(rows: list[dict], kv: str) -> list[tuple[list[Ubatch], float]]:
    """The ubatches of each bench row's measured time (a prefill, or one decode step)."""
    streams = _bench_streams(rows, kv)
    obs = []
    for r in rows:
        if r["method"] != kv:
            continue
        pl, pp, tg = (int(r[k]) for k in ("batch_size", "prompt_tokens", "gen_tokens"))
        n_ub, n_batch = int(r.get("n_ubatch") or 512), int(r.get("n_batch") or 2048)
        t = float(r["time_s_median"])
        if r["stage"] == "decode":
            # Step i (0-based) feeds position pp + i, attending pp + i + 1 keys; sequences 0..pl-1.
            ubs = ubatch.split([(j, 1) for j in range(pl)], n_ub, streams)
            obs.append(([(float(sum(n for _, n in u)), len(u) * (pp + (tg + 1) / 2), 0.0) for u in ubs], t))
        elif r["stage"] == "prefill":
            # The bench queues sequence after sequence and decodes them n_batch tokens at a time
            # (llama_decode calls: runs of n_batch tokens, as split_simple cuts).
            ubs: list[Ubatch] = []
            done = {j: 0 for j in range(pl)}
            for view in ubatch.split_simple([(j, pp) for j in range(pl)], n_batch):
                for u in ubatch.split(view, n_ub, streams):
                    ubs.append(_prompt_ubatch(u, done))
            obs.append((ubs, t))
    return obs


def _prompt_ubatch(u: list[tuple[int, int]], done: dict[int, int]) -> Ubatch:
    a_pre = 0.0
    for seq, n in u:
        p = done[seq]
        a_pre += n * p + n * (n + 1) / 2
        done[seq] = p + n
    return float(sum(n for _, n in u)), 0.0, a_pre


class LlamaCppCostModel:
    """CostModel of one llama.cpp KV type on a server that cuts batches into n_ubatch-token
    ubatches over `streams` KV streams (1: unified KV). See the module docstring for the model."""

    def __init__(self, meta: dict, rows: list[dict], method: Method, n_ubatch: int = 512, streams: int = 4):
        kv = method.kind
        obs = _observations(rows, kv)
        if len(obs) < 4:
            raise EngineProfileError(f"methods: the engine profile has {len(obs)} rows for KV type {kv!r}; "
                                     f"collect it: rkvprof collect --engine llamacpp --kv {kv}")
        self.method, self.meta = method, meta
        self.n_ubatch, self.streams = n_ubatch, streams
        self.source = origin(meta)
        self.knots, self.values, self.k_dec, self.k_pre = _fit(obs)
        self.fit_error = self._fit_error(obs)
        self.server_step_s, self.server_seq_s = self._server_overhead(rows, kv)

    # ---- the CostModel protocol --------------------------------------------------------
    def step_time(self, batch: StepBatch) -> float:
        ubs = self.ubatches(batch)
        if not ubs:
            return 0.0
        return sum(self._u(u) for u in ubs) + self.server_step_s + self.server_seq_s * _n_logits(batch)

    def breakdown(self, batch: StepBatch) -> dict[str, float]:
        ubs = self.ubatches(batch)
        if not ubs:
            return {}
        return {"dense": sum(self._g(t) for t, _, _ in ubs), "attn_decode": self.k_dec * sum(a for _, a, _ in ubs),
                "attn_prefill": self.k_pre * sum(a for _, _, a in ubs),
                "server": self.server_step_s + self.server_seq_s * _n_logits(batch), "ubatches": float(len(ubs))}

    def ubatches(self, b: StepBatch) -> list[Ubatch]:
        """(T, A_dec, A_pre) of each ubatch llama.cpp makes of this iteration."""
        n_dec, n_pre = len(b.decode_ctx), len(b.prefill_new)
        if n_dec + n_pre == 0:
            return []
        # Without slot ids the sequences are taken as adjacent slots: decodes, then prompts.
        dseq = b.decode_seq if b.decode_seq is not None else np.arange(n_dec)
        pseq = b.prefill_seq if b.prefill_seq is not None else np.arange(n_dec, n_dec + n_pre)
        ctx = dict(zip(dseq.tolist(), b.decode_ctx.tolist()))
        done = dict(zip(pseq.tolist(), b.prefill_past.tolist()))
        segs = sorted((s, 1) for s in ctx) + sorted(zip(pseq.tolist(), b.prefill_new.tolist()))
        out = []
        for u in ubatch.split(segs, self.n_ubatch, self.streams):
            t = a_dec = a_pre = 0.0
            for seq, n in u:
                t += n
                if seq in ctx:
                    a_dec += ctx[seq]
                else:
                    p = done[seq]
                    a_pre += n * p + n * (n + 1) / 2
                    done[seq] = p + n
            out.append((t, a_dec, a_pre))
        return out

    # ---- internals -----------------------------------------------------------------------
    def _u(self, u: Ubatch) -> float:
        return self._g(u[0]) + self.k_dec * u[1] + self.k_pre * u[2]

    def _g(self, n: float) -> float:
        return _g_of(self.knots, self.values, n)

    def _server_overhead(self, rows: list[dict], kv: str) -> tuple[float, float]:
        """(per iteration, per sampled sequence) seconds the server adds; (0, 0) without probe rows.

        Sampling and streaming a token do not depend on the KV type, so the probe rows of every
        KV type in the profile are pooled, each less its own KV type's bench model: one noisy
        probe then no longer sets one KV type's overhead alone."""
        fits = {kv: (self.knots, self.values, self.k_dec)}
        pts = []
        for r in rows:
            if r["stage"] != "server_decode":
                continue
            k = r["method"]
            if k not in fits:
                obs = _observations(rows, k)
                if len(obs) < 4:
                    continue
                knots, values, k_dec, _k_pre = _fit(obs)
                fits[k] = (knots, values, k_dec)
            knots, values, k_dec = fits[k]
            c, pp, tg = int(r["batch_size"]), int(r["prompt_tokens"]), int(r["gen_tokens"])
            # The probe's gaps are steady-state tokens 9..tg: contexts around pp + (9 + tg) / 2.
            bench = _g_of(knots, values, c) + k_dec * c * (pp + (9 + tg) / 2)
            pts.append((c, float(r["time_s_median"]) - bench))
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

    def _fit_error(self, obs: list[tuple[list[Ubatch], float]]) -> dict:
        pred = np.array([sum(self._u(u) for u in ubs) for ubs, _ in obs])
        y = np.array([t for _, t in obs])
        rel = np.abs(pred - y) / y
        return {"mean_abs_rel": float(rel.mean()), "max_abs_rel": float(rel.max()), "rows": int(len(obs))}


def _g_of(x: np.ndarray, y: np.ndarray, n: float) -> float:
    """g(T): piecewise linear through the knots, extrapolated linearly past the last one."""
    if n <= x[-1] or len(x) == 1:
        return float(np.interp(n, x, y))
    slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
    return float(y[-1] + slope * (n - x[-1]))


def _n_logits(b: StepBatch) -> int:
    """Sequences that sample a token in the step: every decode, and every prompt that ends."""
    n = len(b.decode_ctx)
    if len(b.prefill_new):
        n += len(b.prefill_new) if b.prefill_done is None else int(np.count_nonzero(b.prefill_done))
    return n


KNOT_GAP = 0.03   # ubatch sizes within 3% share a knot (510 = 3 x 170 beside 512)
KNOT_SHARE = 0.25  # a ubatch size becomes a knot where it is at least this share of a row's tokens


def _knots(sizes: np.ndarray) -> np.ndarray:
    kept: list[float] = []
    for t in np.unique(np.round(sizes, 6)):
        if not kept or t > kept[-1] * (1 + KNOT_GAP):
            kept.append(float(t))
    return np.array(kept)


def _hat(knots: np.ndarray, t: float) -> np.ndarray:
    """Weights of g's knot values that give g(t): interpolation inside, the last segment's line past the end."""
    row = np.zeros(len(knots))
    if len(knots) == 1:
        row[0] = 1.0
        return row
    j = int(np.clip(np.searchsorted(knots, t), 1, len(knots) - 1))
    w = (t - knots[j - 1]) / (knots[j] - knots[j - 1])
    if t < knots[0]:
        w = 0.0
    row[j - 1], row[j] = 1 - w, w
    return row


def _fit(obs: list[tuple[list[Ubatch], float]]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Knot values of g and the two attention slopes: weighted least squares over rows that
    are sums of ubatches, with g non-decreasing (more tokens never cost less) and the slopes
    >= 0 as constraints of the fit. g is fitted as its first value plus non-negative steps
    between knots: a knot few rows pin down (a 6-token ubatch) then cannot take a value far
    above its neighbours' and lift every larger ubatch with it, as clipping after an
    unconstrained fit did (q8_0: 148 ms at 6 tokens beside 38 ms at 4, lifting 16 tokens from
    ~114 to 148 ms)."""
    from scipy.optimize import lsq_linear

    # Knots only where some row's time is mostly ubatches of that size: the 6-token tail of a
    # 1,536-token prefill (510 x 3 + 6) is 0.4% of its row and would leave g(6) unmeasured.
    knots = _knots(np.array([u[0] for ubs, _ in obs for u in ubs
                             if u[0] >= KNOT_SHARE * sum(v[0] for v in ubs)]))
    basis = np.array([sum(_hat(knots, u[0]) for u in ubs) for ubs, _ in obs])
    a_dec = np.array([sum(u[1] for u in ubs) for ubs, _ in obs])
    a_pre = np.array([sum(u[2] for u in ubs) for ubs, _ in obs])
    y = np.array([t for _, t in obs])
    w = 1.0 / y
    steps = np.tril(np.ones((len(knots), len(knots))))       # values = steps @ increments
    X = np.column_stack([basis @ steps, a_dec, a_pre]) * w[:, None]
    scale = np.linalg.norm(X, axis=0)
    scale[scale == 0] = 1.0
    sol = lsq_linear(X / scale, y * w, bounds=(0.0, np.inf), method="bvls").x / scale
    k = len(knots)
    return knots, steps @ sol[:k], float(sol[k]), float(sol[k + 1])


def find_engine_profile(scn) -> Path:
    """The scenario's `profile:` folder, else the newest engine profile shipped for its model
    with the scenario's engine threads (else the newest of any)."""
    if scn.profile:
        p = Path(scn.profile).expanduser()
        if not p.is_dir():
            raise EngineProfileError(f"profile: {scn.profile} is not a folder; give an engine profile folder "
                                     "(rkvprof collect --engine llamacpp --out DIR)")
        return p
    from rkvsim.models import resolve_model
    name = resolve_model(scn.model).name
    found = packaged_engine_profiles(name, scn.hardware)
    # A profile measured with the scenario's engine threads first: -t 1 and -t 2 steps differ ~2x.
    threads = getattr(scn.scheduler, "threads", None)
    found.sort(key=lambda p: read_json(p / "meta.json", "engine profile meta.json").get("threads") != threads)
    if not found:
        raise EngineProfileError(f"profile: no llama.cpp engine profile ships for {name} on {scn.hardware}; "
                                 f"collect one (rkvprof collect --engine llamacpp --model {name} --out DIR) "
                                 "and set profile: DIR")
    return found[0]


_CACHE: dict[tuple[str, str], LlamaCppCostModel] = {}


def llamacpp_cost_model(scn, method: Method) -> LlamaCppCostModel:
    folder = find_engine_profile(scn)
    rows_file = folder / STEPS_FILE
    # Keyed on the table's mtime too: a profile collected again is read again.
    sched = scn.scheduler
    streams = 1 if sched.kv_unified else sched.n_parallel
    key = (str(folder.resolve()), method.kind, rows_file.stat().st_mtime_ns if rows_file.exists() else 0,
           sched.n_ubatch, streams)
    hit = _CACHE.get(key)
    if hit is None:
        meta, rows = read_engine_profile(folder)
        hit = _CACHE[key] = LlamaCppCostModel(meta, rows, method, n_ubatch=sched.n_ubatch, streams=streams)
    return hit
