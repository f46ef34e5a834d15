"""Physics features of profiled operators: the FLOPs and bytes one timed row did.

A regressor fitted on these (rather than on batch size and token counts alone) transfers
across model shapes: a 13B layer's QKV projection at 512 tokens is "this many FLOPs over
this many bytes" like a 7B one, just more. Every function takes arrays (one entry per row)
and returns a dict of named columns; the columns a predictor uses are listed in FEATURES.

Dense operators follow profiler/schema.py's vocabulary (Vidur's names). Attention rows use
the method's cache as models/kv_bytes.py defines it: the bytes a decode step streams are the
compressed cache's, while eviction methods that score the whole context (H2O's accumulated
attention; StreamingLLM's profiled kernel) are measured at the raw context length, so both
the raw and the cached token counts are offered.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from rkvsim.models import Method, cached_tokens_vec, parse_method
from rkvsim.models.kv_bytes import kv_bytes_per_head

DENSE_OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
             "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add",
             "lm_head", "sample")
# Ops run once per layer; the rest once per step.
PER_LAYER_OPS = frozenset(DENSE_OPS) - {"emb", "lm_head", "sample"}

# Columns each predictor family regresses on (besides a constant).
DENSE_FEATURES = ("flops", "vflops", "bytes")
# Tree inputs of the shape-transfer fit (several models in one profile): the GEMM's M (tokens),
# N and K per rank beside the work, so that tile and wave effects follow the shape, not the model.
SHAPE_TREE_FEATURES = ("tokens", "n_out", "k_in", "flops", "vflops", "bytes")
DECODE_FEATURES = ("batch", "flops", "kv_bytes", "raw_bytes", "score_work")
PREFILL_FEATURES = ("tokens", "flops", "kv_bytes", "score_work")


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def dense_work(op: str, t, hidden, inter, q_heads, kv_heads, head_dim, vocab, tp=1,
               dtype_bytes: int = 2, gated=True, parallel=False) -> dict[str, np.ndarray]:
    """Work of one dense operator over t tokens on one TP rank (weights sharded as Megatron).
    Besides FLOPs and bytes: the GEMM's output width `n_out` and reduction depth `k_in` per rank
    (the element count per token for element-wise ops, k_in = 1; rotary: query width, KV width),
    which shape-transfer fits read.
    parallel: a parallel attention + MLP block (models.ModelSpec.parallel_block), whose timed residual
    `add` sums three tensors, two element-wise adds (Vidur's profiler: attention + MLP + residual),
    where a sequential block's sums two."""
    t, h, dt = _f(t), _f(hidden), float(dtype_bytes)
    g = 1.0 + _f(gated)            # gate and up fused (2 x intermediate) when the MLP is gated
    tp = _f(tp)
    qs = _f(q_heads) / tp * _f(head_dim)
    kvs = np.maximum(1.0, _f(kv_heads) / tp) * _f(head_dim)
    i = _f(inter) / tp
    v = _f(vocab) / tp
    z, one = np.zeros_like(t), np.ones_like(t)
    if op == "emb":
        fl, vf, by, n, k = z, z, 2 * t * h * dt, h, one
    elif op in ("input_layernorm", "post_attention_layernorm"):
        fl, vf, by, n, k = z, 5 * t * h, 2 * t * h * dt + h * dt, h, one
    elif op == "attn_pre_proj":
        out = qs + 2 * kvs
        fl, vf, by, n, k = 2 * t * h * out, z, dt * (h * out + t * h + t * out), out, h
    elif op == "attn_rope":
        # n_out, k_in: query and KV widths apart, since the rotary kernel (one thread block per token)
        # loops over the query heads and then the KV heads, so each width sets its own trip count
        # (measured, A100 TP 8: 8 query + 1 KV heads take 27 us at 4096 tokens, 4 + 4 heads 18 us)
        fl, vf, by, n, k = z, 3 * t * (qs + kvs), dt * 2 * t * (qs + kvs), qs, kvs
    elif op == "attn_post_proj":
        fl, vf, by, n, k = 2 * t * qs * h, z, dt * (qs * h + t * qs + t * h), h, qs
    elif op == "mlp_up_proj":
        fl, vf, by, n, k = 2 * g * t * h * i, z, dt * (g * h * i + t * h + g * t * i), g * i, h
    elif op == "mlp_act":        # SiLU(gate) * up reads 2 x intermediate; a plain GELU reads one
        fl, vf, by, n, k = z, 5 * t * i, dt * (g + 1) * t * i, g * i, one
    elif op == "mlp_down_proj":
        fl, vf, by, n, k = 2 * t * i * h, z, dt * (i * h + t * i + t * h), h, i
    elif op == "add":
        a = 1.0 + _f(parallel)
        fl, vf, by, n, k = z, a * t * h, a * 3 * t * h * dt, h, one
    elif op == "lm_head":
        fl, vf, by, n, k = 2 * t * h * v, z, dt * (h * v + t * h) + 4 * t * v, v, h
    elif op == "sample":
        fl, vf, by, n, k = z, 5 * t * v, 4 * t * v, v, one
    else:
        raise KeyError(f"unknown dense operator {op!r}; known: {', '.join(DENSE_OPS)}")
    bc = lambda x: np.broadcast_to(_f(x), t.shape).astype(np.float64)  # noqa: E731
    return {"tokens": t, "flops": fl, "vflops": vf, "bytes": by, "n_out": bc(n), "k_in": bc(k)}


@lru_cache(maxsize=64)
def _method(label: str) -> Method:
    return parse_method(label)


def _kv_bytes_head(method: Method, head_dim: int, prompt: np.ndarray, total: np.ndarray,
                   dtype_bytes: int) -> np.ndarray:
    """models.kv_bytes_per_head over arrays, evaluated once per distinct (prompt, total)."""
    pairs = np.stack([prompt, total], axis=1).astype(np.int64)
    uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
    vals = np.array([kv_bytes_per_head(method, head_dim, int(p), int(n), dtype_bytes) for p, n in uniq],
                    dtype=np.float64)
    return vals[inv.reshape(-1)]


def cached_tokens(method: Method, prompt: np.ndarray, total: np.ndarray) -> np.ndarray:
    return cached_tokens_vec(method, np.asarray(prompt, np.int64), np.asarray(total, np.int64)).astype(np.float64)


def decode_work(method: Method, batch, ctx, q_heads, kv_heads, head_dim, prompt=None,
                dtype_bytes: int = 2) -> dict[str, np.ndarray]:
    """One decode step of `batch` requests with `ctx` tokens each (per layer, per rank; callers
    pass the tokens the cache holds, with prompt = ctx).
    flops: QK^T and PV over the cached tokens; kv_bytes: the compressed cache streamed;
    raw_bytes: what an FP16 cache of the raw context would be; score_work: q heads x raw
    context (scores an eviction method keeps over everything it has seen)."""
    b, c = _f(batch), np.asarray(ctx, np.int64)
    c = np.broadcast_to(c, np.broadcast(b, c).shape)
    p = c if prompt is None else np.broadcast_to(np.asarray(prompt, np.int64), c.shape)
    hq, hkv, d = _f(q_heads), _f(kv_heads), int(np.max(head_dim))
    kept = cached_tokens(method, p, c)
    per_head = _kv_bytes_head(method, d, p, c, dtype_bytes)
    full = 2 * d * dtype_bytes
    return {"batch": b, "ctx": c.astype(np.float64), "flops": 4 * b * kept * d * hq,
            "kv_bytes": b * hkv * per_head, "raw_bytes": b * hkv * c * full,
            "score_work": b * hq * c}


def prefill_work(method: Method, new, past, q_heads, kv_heads, head_dim,
                 dtype_bytes: int = 2) -> dict[str, np.ndarray]:
    """One prefill chunk of `new` tokens over `past` cached tokens (per layer, per rank).
    Causal: on average past + new/2 keys per query."""
    n, pst = _f(new), np.asarray(past, np.int64)
    hq, hkv, d = _f(q_heads), _f(kv_heads), int(np.max(head_dim))
    area = n * (_f(pst) + n / 2)
    total = (pst + np.asarray(new, np.int64)).astype(np.int64)
    per_head = _kv_bytes_head(method, d, total, total, dtype_bytes)
    return {"tokens": n, "past": _f(pst), "flops": 4 * area * d * hq,
            "kv_bytes": hkv * per_head, "score_work": hq * area}


# Output tiles cuBLAS-class GEMM kernels use (M x N); which one a shape gets is the library's choice,
# so the fit is offered several and learns which matters where.
GEMM_TILES = ((64, 64), (128, 128), (128, 256), (256, 128))


def wave_features(work: dict[str, np.ndarray], sms: int) -> np.ndarray:
    """Log columns of how a GPU with `sms` streaming multiprocessors runs the work in waves.
    A GEMM of M x N outputs runs ceil(M/tm) * ceil(N/tn) tiles, one per SM at a time, so its time
    steps up where the tile count passes a multiple of `sms`, not smoothly with FLOPs (measured:
    InternLM-20B's up projection at TP 4 on an A100 takes 73-77 us for 184-256 tokens and 111-114 us
    for 336-384, where 128 x 128 tiles go from 108 to 162 on 108 SMs). Per tile size: the share of the
    waves' tile slots the work leaves idle (as the padded/used ratio) and the wave count. Row kernels
    (norms, activations: one thread block per token) run ceil(tokens / sms) waves."""
    m = np.maximum(np.asarray(work["tokens"], np.float64), 1.0)
    n = np.maximum(np.asarray(work["n_out"], np.float64), 1.0)
    cols = []
    for tm, tn in GEMM_TILES:
        tiles = np.ceil(m / tm) * np.ceil(n / tn)
        waves = np.ceil(tiles / sms)
        cols += [np.log(waves * sms * tm * tn / (m * n)), np.log(waves)]
    cols += [np.log(np.ceil(m / sms)), np.log(m * n / sms)]
    return np.column_stack(cols)


def design(work: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """[1, features...] matrix for the linear physics fit."""
    n = len(next(iter(work.values())))
    return np.column_stack([np.ones(n)] + [np.asarray(work[k], np.float64) for k in names])


def log_features(work: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """log1p of the physics columns: shape-agnostic inputs for the tree-based candidates."""
    return np.column_stack([np.log1p(np.asarray(work[k], np.float64)) for k in names])
