"""Compile a StepFit into lookup tables for one (model, method, TP): the simulator then costs a
step with a few array lookups and never calls a regressor inside its event loop.

Tables (seconds, all layers of one replica rank):
- dense[t]: every per-layer dense op x layers + embedding, by new tokens t in the step;
  evaluated on a geometric grid of t and interpolated linearly to every integer.
- head[n]: LM head + sampling by logits produced (None when the profile has no such rows;
  the cost model then uses its roofline prior for them and says so).
- decode[b, c]: decode attention of b requests whose mean key is c (grid, bilinear).
- prefill[n, p]: one prefill chunk of n tokens over p cached tokens (grid, bilinear).
Choosing the attention fit for a method: the same label if profiled; else the same kind at
another setting (the physics features carry the setting: bytes, cached tokens); else FP16
attention over the tokens the method keeps (SnapKV after its vote). Each choice is noted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rkvsim.models import Method, ModelSpec, parse_method

from rkvsim.calibration.steps.features import PER_LAYER_OPS, decode_work, dense_work, prefill_work
from rkvsim.calibration.steps.fit import OpFit, StepFit

HEAD_OPS = ("lm_head", "sample")


@dataclass
class CompiledCosts:
    origin: str
    layers: int
    dense: np.ndarray
    head: np.ndarray | None
    dec_b: np.ndarray
    dec_c: np.ndarray
    dec: np.ndarray
    pre_n: np.ndarray
    pre_p: np.ndarray
    pre: np.ndarray
    attention_from: str           # profile method whose attention fit is used
    notes: list[str] = field(default_factory=list)


def _grid(hi: int, dense_upto: int, n_geo: int) -> np.ndarray:
    lo = np.arange(1, min(dense_upto, hi) + 1)
    geo = np.geomspace(max(dense_upto, 1), max(hi, 2), n_geo).round()
    return np.unique(np.concatenate([lo, geo, [hi]])).astype(np.int64)


def anchored(f: OpFit, build, use_transfer: bool = False, **inputs) -> np.ndarray:
    """Predict inside the profiled range with the chosen estimator; beyond it, scale the
    prediction at the range's edge by the physics law (trees are flat outside their data,
    FLOPs and bytes are not)."""
    est = f.transfer if (use_transfer and f.transfer is not None) else f.estimator
    clipped = {k: (np.clip(np.asarray(v, np.float64), *f.ranges[k]) if k in f.ranges else v)
               for k, v in inputs.items()}
    w_clip = build(**clipped)
    y = est.predict(w_clip)
    if f.physics is None or all(np.array_equal(np.asarray(clipped[k]), np.asarray(inputs[k], np.float64))
                                for k in inputs):
        return y
    w_raw = build(**inputs)
    return y * f.physics.predict(w_raw) / f.physics.predict(w_clip)


def pick_attention(fit: StepFit, method: Method) -> tuple[str, Method, str | None]:
    """(profile method label, method to compute features with, note)."""
    have = set(fit.methods("decode")) & set(fit.methods("prefill"))
    if method.label in have:
        return method.label, method, None
    same = sorted(m for m in have if parse_method(m).kind == method.kind)
    if same:
        return same[0], method, (f"attention of {method.label} from the {same[0]} fit "
                                           f"(its bytes and cached tokens computed for {method.label})")
    if "fp16" in have and method.spec.fp16_attention_stand_in:
        what = ("its selection/eviction work is not included" if method.token_cap is not None
                or method.spec.prompt_budget is not None else "read at FP16's bytes, an upper bound")
        return "fp16", parse_method("fp16"), (
            f"{method.kind} attention not profiled: FP16 attention over the tokens {method.label} keeps "
            f"({what})")
    raise LookupError(f"the profile has no attention for {method.kind} and no FP16 attention to stand in; "
                      f"profile it: rkvprof collect --methods {method.label}")


def compile_costs(fit: StepFit, model: ModelSpec, method: Method, tp: int = 1, max_tokens: int = 8192,
                  max_batch: int = 256, max_ctx: int = 4096) -> CompiledCosts:
    dt = model.weight_dtype_bytes
    L = model.num_layers
    notes = []
    transfer = model.name != fit.model
    if transfer:
        notes.append(f"fitted on {fit.model}, applied to {model.name} through FLOP/byte features "
                     "(physics-anchored predictors)")
    dims = (model.hidden_size, model.intermediate_size, model.num_heads, model.num_kv_heads,
            model.head_dim, model.vocab_size)

    # Dense: geometric grid over tokens, linear interpolation to every integer.
    t_hi = max(int(max_tokens) + int(max_batch), 2)
    tg = _grid(t_hi, 64, 160)
    dense_g = np.zeros(len(tg))
    head_g = np.zeros(len(tg))
    missing = []
    for op in ("emb",) + tuple(sorted(PER_LAYER_OPS)) + HEAD_OPS:
        f = fit.get("dense", "all", op)
        if f is None:
            missing.append(op)
            continue
        y = anchored(f, lambda tokens, op=op: dense_work(op, tokens, *dims, tp, dt), transfer, tokens=tg)
        if op in HEAD_OPS:
            head_g += y
        else:
            dense_g += y * (L if op in PER_LAYER_OPS else 1)
    if [op for op in missing if op not in HEAD_OPS]:
        notes.append(f"dense ops not profiled (left out): {', '.join(o for o in missing if o not in HEAD_OPS)}")
    t_all = np.arange(t_hi + 1)
    dense = np.interp(t_all, np.concatenate([[0], tg]), np.concatenate([[0.0], dense_g]))
    head = None
    if not [op for op in HEAD_OPS if op in missing]:
        head = np.interp(t_all, np.concatenate([[0], tg]), np.concatenate([[0.0], head_g]))

    label, feat_method, note = pick_attention(fit, method)
    if note:
        notes.append(note)
    hq, hkv = max(1, model.num_heads // tp), max(1, model.num_kv_heads // tp)
    d = model.head_dim
    dec_f, pre_f = fit.get("decode", label, "attention"), fit.get("prefill", label, "attention")

    # Decode: batch x mean tokens held per request, bilinear.
    cap = feat_method.token_cap or method.token_cap
    k_hi = max(2, min(int(max_ctx), cap) if cap else int(max_ctx))
    bg = _grid(max(int(max_batch), 2), 32, 28)
    cg = np.unique(np.concatenate([[1], _grid(k_hi, 64, 72)]))
    B, C = np.meshgrid(bg, cg, indexing="ij")

    def dec_build(batch, ctx):
        return decode_work(feat_method, batch, np.asarray(ctx).round().astype(np.int64), hq, hkv, d,
                           prompt=np.asarray(ctx).round().astype(np.int64), dtype_bytes=dt)
    dec = L * anchored(dec_f, dec_build, transfer, batch=B.ravel().astype(float),
                       ctx=C.ravel().astype(float)).reshape(B.shape)

    # Prefill chunk: new tokens x cached past, bilinear.
    ng = _grid(max(int(max_tokens), 2), 16, 56)
    pg = np.unique(np.concatenate([[0], _grid(max(int(max_ctx), 2), 16, 48)]))
    N, P = np.meshgrid(ng, pg, indexing="ij")

    def pre_build(tokens, past):
        return prefill_work(feat_method, np.asarray(tokens).round().astype(np.int64),
                            np.asarray(past).round().astype(np.int64), hq, hkv, d, dtype_bytes=dt)
    pre = L * anchored(pre_f, pre_build, transfer, tokens=N.ravel().astype(float),
                       past=P.ravel().astype(float)).reshape(N.shape)
    return CompiledCosts(fit.origin, L, dense, head, bg.astype(np.float64), cg.astype(np.float64), dec,
                         ng.astype(np.float64), pg.astype(np.float64), pre, label, notes)
