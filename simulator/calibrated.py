"""Step cost from a calibrated profile: lookups compiled by calibration/steps/compile.py plus
fitted engine terms, numpy only (no regressor runs inside the event loop).

    step = scale_s * (dense[T] + head[logits] + attention + all-reduce) + fixed_s + per_seq_s * seqs

s is the step's stage: "prefill" when any prompt chunk is in it, else "decode". The engine
terms default to the roofline prior's stated overheads (scale 1); `rkvsim validate` fits them
on measured engine throughput and can install them beside the profile.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rkvsim.models import cached_tokens_of, holds_whole_context

from rkvsim.simulator.cost_model import RooflineCostModel, StepBatch
from rkvsim.simulator.lookup import Tabulated, array_min, array_sum, by_size, int_sum
from rkvsim.models.files import read_json

ENGINE_FILE = "engine_terms.json"


@dataclass(frozen=True)
class StageTerms:
    scale: float = 1.0       # engine time per profiled dense-operator second (fusion, launches, sync)
    attn_scale: float = 1.0  # engine time per profiled attention second (the engine's own kernels)
    fixed_s: float = 0.0     # per step: scheduling, input preparation, sampling sync
    per_seq_s: float = 0.0   # per sequence in the step: block tables, detokenisation

    def apply(self, dense_s: float, attn_s: float, seqs: int) -> float:
        return self.scale * dense_s + self.attn_scale * attn_s + self.fixed_s + self.per_seq_s * seqs


@dataclass(frozen=True)
class EngineTerms:
    """Shared terms per stage, optionally overridden per method label (`per_method[label]`
    = {"prefill": StageTerms, "decode": StageTerms}) where the fit had that method's rows."""
    prefill: StageTerms = StageTerms()
    decode: StageTerms = StageTerms()
    source: str = "roofline-prior overheads"
    fitted_on: list = field(default_factory=list)
    per_method: dict = field(default_factory=dict)

    def for_method(self, label: str) -> tuple[StageTerms, StageTerms]:
        pm = self.per_method.get(label)
        return (pm["prefill"], pm["decode"]) if pm else (self.prefill, self.decode)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "EngineTerms":
        pm = {k: {st: StageTerms(**v[st]) for st in ("prefill", "decode")} for k, v in d.get("per_method", {}).items()}
        return cls(StageTerms(**d["prefill"]), StageTerms(**d["decode"]), d.get("source", ""),
                   list(d.get("fitted_on", [])), pm)

    @classmethod
    def prior(cls, roofline: RooflineCostModel) -> "EngineTerms":
        e = roofline.eff
        st = StageTerms(1.0, 1.0, e.step_overhead_s, e.per_seq_overhead_s)
        return cls(st, st, "roofline-prior overheads")


def load_engine_terms(folder: Path) -> EngineTerms | None:
    p = Path(folder) / ENGINE_FILE
    if not p.exists():
        return None
    return EngineTerms.from_json(read_json(p, "engine terms file (rkvsim validate --install-engine)"))


class CalibratedCostModel:
    """CostModel over compiled lookups; the roofline prior fills what no profile row covers
    (LM head/sampling when unprofiled, TP all-reduce)."""

    def __init__(self, compiled, roofline: RooflineCostModel, engine: EngineTerms | None = None):
        self.c = compiled
        self.rl = roofline
        self.engine = engine or EngineTerms.prior(roofline)
        self.method = roofline.method
        self._cap = roofline.method.token_cap
        self._held = cached_tokens_of(roofline.method)     # (prompt, ctx) -> tokens each cache holds
        # Then a decode batch's attention key needs only the sum of its contexts (decode_step_held).
        self.holds_whole_context = holds_whole_context(roofline.method)
        notes = list(compiled.notes)
        if compiled.head is None:
            notes.append("LM head/sampling: roofline prior (not in the profile)")
        if roofline.tp > 1:
            notes.append(f"TP all-reduce: {roofline.cost_parts['comm']}")
        notes.append(f"engine terms: {self.engine.source}")
        self.notes = notes
        self.source = compiled.origin
        self.cost_parts = {**roofline.cost_parts, **(getattr(compiled, "parts", None) or {})}
        if compiled.head is None:
            self.cost_parts["dense"] += "+head:roofline-prior"
        self.cost_trust = [*(getattr(compiled, "trust", None) or []), *roofline.overheads.trust()]
        self._pre_terms, self._dec_terms = self.engine.for_method(roofline.method.label)
        # Plain lists and arrays for the per-step lookups.
        self._dec_b, self._dec_c = compiled.dec_b.tolist(), compiled.dec_c.tolist()
        self._pre_n, self._pre_p = compiled.pre_n.tolist(), compiled.pre_p.tolist()
        self._dec_tab, self._pre_tab = compiled.dec.tolist(), compiled.pre.tolist()
        # decode_run's grid as arrays, with each cell's width (the same subtraction _grid_at makes),
        # and its table flattened row by row.
        self._dec_grid = tuple((a, a[1:] - a[:-1]) for a in (np.asarray(self._dec_b, np.float64),
                                                          np.asarray(self._dec_c, np.float64)))
        assert compiled.dec.shape == (len(self._dec_b), len(self._dec_c)), "decode table and its axes disagree"
        self._dec_flat = np.asarray(compiled.dec, np.float64).ravel()
        self._dec_inner = self._dec_grid[1][0][1:-1]
        self._dense_by_size = by_size(self._decode_dense)
        self._dec_lead: dict[int, tuple[float, float]] = {}    # decode_step_held's terms by batch size
        self._dec_rows: dict[int, list[float]] = {}            # _decode_attn's table rows by batch size
        # The table blended across the first axis (batch size, an integer) at every size, flat,
        # size-major: entry n * W + j is _grid_at's `a + (b - a) * tx` at column j for x = n (and
        # `c + (d - c) * tx` at column j + 1), the same operations on the same numbers.
        self._blend = Tabulated(self._blend_at)
        self._dense = compiled.dense
        self._slope = float(compiled.dense[-1] - compiled.dense[-2])

    def _dense_t(self, t: int) -> float:
        n = len(self._dense) - 1
        return float(self._dense[t]) if t <= n else float(self._dense[n] + (t - n) * self._slope)

    def _decode_dense(self, nd: int) -> float:
        """Dense layers, LM head and all-reduce of a decode-only step of nd requests."""
        return self._dense_t(nd) + self._head_t(nd) + self.rl._comm(nd)

    def _head_t(self, n: int) -> float:
        h = self.c.head
        if h is None:
            return sum(self.rl._head(n))
        last = len(h) - 1
        return float(h[n]) if n <= last else float(h[last] * n / last)

    @staticmethod
    def _cell(g: list, x: float) -> tuple[int, float]:
        """The grid cell holding x (the edge cells extrapolate) and x's fraction across it."""
        i = min(max(bisect_left(g, x) - 1, 0), len(g) - 2)
        return i, (x - g[i]) / (g[i + 1] - g[i])

    def _grid_at(self, xg: list, yg: list, tab: np.ndarray, x: float, y: float) -> float:
        """Scalar bilinear lookup (bisect on Python lists: no numpy call per step)."""
        i, tx = self._cell(xg, x)
        j, ty = self._cell(yg, y)
        row0, row1 = tab[i], tab[i + 1]
        a, b, c, d = row0[j], row1[j], row0[j + 1], row1[j + 1]
        v = (a + (b - a) * tx) * (1 - ty) + (c + (d - c) * tx) * ty
        return v if v > 0.0 else 0.0

    def _decode_attn(self, held: int, nd: int) -> float:
        # Decode attention is keyed by the mean tokens each cache holds (after eviction), from
        # their exact integer sum `held`: the mean as ndarray.mean computes it (one sum, one
        # division), without its overhead. _grid_at's lookup, its first axis (the batch size)
        # taken from the blended table (__init__), a row per size as a list.
        row = self._dec_rows.get(nd)
        if row is None:
            w = len(self._dec_c)
            row = self._dec_rows[nd] = self._blend(np.arange(nd * w, (nd + 1) * w)).tolist()
        j, ty = self._cell(self._dec_c, float(held) / nd)
        v = row[j] * (1 - ty) + row[j + 1] * ty
        return v if v > 0.0 else 0.0

    def _held_sum(self, prompt: np.ndarray, ctx: np.ndarray) -> int:
        return int_sum(self._held(prompt, ctx))

    def _prefill_attn(self, new: list, past: list) -> float:
        return sum(self._grid_at(self._pre_n, self._pre_p, self._pre_tab, float(n), float(p))
                   for n, p in zip(new, past))

    def _step_parts(self, new: list, past: list, n_done: int, nd: int, held: int) -> tuple[float, float]:
        """(dense + head + all-reduce, attention) of a step: prefill chunks of `new` tokens each
        after `past` (lists; n_done of them finish their prompt) beside nd decodes whose caches
        hold `held` tokens in all (either side may be empty, not both)."""
        t_new = sum(new) + nd
        dense = self._dense_t(t_new) + self._head_t(nd + n_done) + self.rl._comm(t_new)
        attn = (self._decode_attn(held, nd) if nd else 0.0) + (self._prefill_attn(new, past) if new else 0.0)
        return dense, attn

    def _split(self, b: StepBatch) -> tuple[float, float, int, int]:
        nd, npf = len(b.decode_ctx), len(b.prefill_new)
        if nd == 0 and npf == 0:
            return 0.0, 0.0, 0, 0
        dense, attn = self._step_parts(b.prefill_new.tolist(), b.prefill_past.tolist(),
                                       self.rl._n_done(b) if npf else 0, nd,
                                       self._held_sum(b.decode_prompt, b.decode_ctx) if nd else 0)
        return dense, attn, nd, npf

    def _parts(self, b: StepBatch) -> tuple[dict[str, float], int, int]:
        nd, npf = len(b.decode_ctx), len(b.prefill_new)
        t_new = (int_sum(b.prefill_new) if npf else 0) + nd
        n_done = self.rl._n_done(b) if npf else 0
        parts = {"dense": self._dense_t(t_new), "lm_head+sampling": self._head_t(nd + n_done),
                 "allreduce": self.rl._comm(t_new)}
        if nd:
            parts["attn_decode"] = self._decode_attn(self._held_sum(b.decode_prompt, b.decode_ctx), nd)
        if npf:
            parts["attn_prefill"] = self._prefill_attn(b.prefill_new.tolist(), b.prefill_past.tolist())
        return parts, nd, npf

    def decode_run(self, ctx: np.ndarray, prompt: np.ndarray, rem: np.ndarray, k: int) -> np.ndarray:
        """Seconds of k decode-only steps of a fixed batch (see RooflineCostModel.decode_run):
        the same lookups as step_time, on arrays. The attention key, the mean cached tokens, is
        an exact integer sum over the requests decoding divided by their count, as in step_time."""
        nd, tot = self._run_cache_sums(ctx, prompt, rem, k)
        key = tot / nd
        attn = self._grid_vec(nd, key)
        dense = self._dense_by_size(nd)
        st = self._dec_terms
        return st.scale * dense + st.attn_scale * attn + st.fixed_s + st.per_seq_s * nd

    def _run_cache_sums(self, ctx: np.ndarray, prompt: np.ndarray, rem: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(requests decoding, tokens their caches hold) at each step 1..k of a run, as int64
        arrays. Without a token cap every cache holds one token more each step, so the sums
        follow from the first step's by counting who is still decoding (rem >= 1), with no
        k x n array; integer sums either way, so both give the same numbers."""
        steps = np.arange(1, k + 1)
        n = len(ctx)
        if self._cap is None:
            base = self._held(prompt, ctx)
            if int(array_min(rem)) >= k:
                return np.full(k, n), int(array_sum(base)) + n * steps
            last = np.minimum(rem, k)                       # the last step of the run each decodes in
            nd = np.bincount(last, minlength=k + 1)[::-1].cumsum()[::-1][1:]
            # (float weights: integer sums far below 2**53, exact)
            held = np.bincount(last, weights=base, minlength=k + 1)[::-1].cumsum()[::-1][1:]
            return nd, held.astype(np.int64) + nd * steps
        cached = self._held(prompt[None, :], ctx[None, :] + steps[:, None])
        if int(array_min(rem)) < k:
            live = rem[None, :] >= steps[:, None]
            return array_sum(live, 1), array_sum(cached * live, 1)
        return np.full(k, n), array_sum(cached, 1)

    def _blend_at(self, at: np.ndarray) -> np.ndarray:
        """Entries `at` of the blended table (see __init__): size at // W, column at % W."""
        (xa, dx), (ya, _dy) = self._dec_grid
        w = len(ya)
        sizes, col = at // w, at % w
        cell = np.minimum(np.maximum(xa.searchsorted(sizes, "left") - 1, 0), len(xa) - 2)
        tx = (sizes - xa[cell]) / dx[cell]
        a = self._dec_flat.take(cell * w + col)
        b = self._dec_flat.take((cell + 1) * w + col)
        return a + (b - a) * tx

    def _grid_vec(self, nd: np.ndarray, y: np.ndarray) -> np.ndarray:
        """_grid_at on the decode table over arrays of points (batch sizes nd, keys y): the same
        operations element by element, the first axis's taken from the blended table."""
        ya, dy = self._dec_grid[1]
        # (_grid_at's min(max(bisect_left - 1, 0), W - 2) is the count of inner grid points below y)
        j = self._dec_inner.searchsorted(y, "left")
        ty = (y - ya[j]) / dy[j]
        at = nd * len(ya) + j
        v = self._blend(at) * (1 - ty) + self._blend(at + 1) * ty
        return np.where(v > 0.0, v, 0.0)

    def decode_step(self, ctx: np.ndarray, prompt: np.ndarray) -> float:
        """step_time of a decode-only step (decode contexts `ctx`, prompts `prompt`; not empty),
        without a StepBatch: the replica's most frequent call. The same terms as _split's, added
        in the same order (_decode_dense is _split's dense part with t_new = nd, no prefill done)."""
        nd = len(ctx)
        return self.decode_step_held(nd, self._held_sum(prompt, ctx))

    def decode_step_held(self, nd: int, held: int) -> float:
        """decode_step of nd requests whose caches hold `held` tokens in all: StageTerms.apply's
        sum, in its order, with the terms of the batch size alone computed once per size."""
        lead = self._dec_lead.get(nd)
        st = self._dec_terms
        if lead is None:
            lead = self._dec_lead[nd] = (st.scale * self._decode_dense(nd), st.per_seq_s * nd)
        return lead[0] + st.attn_scale * self._decode_attn(held, nd) + st.fixed_s + lead[1]

    def mixed_step(self, new: list, past: list, n_done: int, ctx: np.ndarray, prompt: np.ndarray) -> float:
        """step_time of a step with prefill chunks (`new` tokens each after `past`, as lists;
        n_done of them finish their prompt) beside the decodes (contexts `ctx`, prompts `prompt`,
        maybe empty), without a StepBatch: the replica's call for every admission."""
        nd = len(ctx)
        return self.mixed_step_held(new, past, n_done, nd, self._held_sum(prompt, ctx) if nd else 0)

    def mixed_step_held(self, new: list, past: list, n_done: int, nd: int, held: int) -> float:
        """mixed_step beside nd decodes whose caches hold `held` tokens in all."""
        return self._pre_terms.apply(*self._step_parts(new, past, n_done, nd, held), nd + len(new))

    def step_time(self, batch: StepBatch) -> float:
        if len(batch.prefill_new):
            return self.mixed_step(batch.prefill_new.tolist(), batch.prefill_past.tolist(), self.rl._n_done(batch),
                                   batch.decode_ctx, batch.decode_prompt)
        if len(batch.decode_ctx):
            return self.decode_step(batch.decode_ctx, batch.decode_prompt)
        return 0.0

    def operator_split(self, batch: StepBatch) -> tuple[float, float]:
        """(dense + head + all-reduce, attention) seconds of the profiled operators alone, no
        engine terms: what the engine-term fit starts from."""
        dense, attn, _, _ = self._split(batch)
        return dense, attn

    def breakdown(self, batch: StepBatch) -> dict[str, float]:
        parts, nd, npf = self._parts(batch)
        if nd == 0 and npf == 0:
            return {}
        st = self._pre_terms if npf else self._dec_terms
        out = {k: (st.attn_scale if k.startswith("attn_") else st.scale) * v for k, v in parts.items()}
        out["step_overhead"] = st.fixed_s + st.per_seq_s * (nd + npf)
        return out


def calibrated_cost_model(folder: Path, model, hardware, method, tp: int, max_tokens: int, max_batch: int,
                          max_ctx: int, overheads=None, comm=None) -> "CalibratedCostModel":
    """CalibratedCostModel for one replica: the profile's compiled lookups, with engine terms
    installed beside the profile if any, and the roofline prior for what no profile row covers.
    A profile of another GPU than `hardware` (the nearest one profiled) is carried to it by the
    datasheet roofline; engine terms fitted on that other GPU's engine are not used then."""
    from rkvsim.calibration.steps.fit import fit_folder
    from rkvsim.calibration.steps.profiles import compiled_costs, profile_hardware

    other = profile_hardware(folder) not in (None, hardware.name)
    comp = compiled_costs(folder, model, method, tp, max_tokens, max_batch, max_ctx,
                          to_hw=hardware.name if other else None)
    engine = None if other else load_engine_terms(fit_folder(Path(folder)))
    cm = CalibratedCostModel(comp, RooflineCostModel(model, hardware, method, tp, overheads=overheads, comm=comm), engine)
    if overheads is not None and engine is None:
        cm.source = f"{cm.source}; cpu:{overheads.cpu_source}"
    return cm
