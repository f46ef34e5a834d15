"""Bytes a KV cache holds, per method: the one formula shared by kernels/ (cache.nbytes), the
simulator's block manager and the roofline cost model. Each kind's formula is its spec's
(models/method_specs/); this module turns them into per-request and per-rank figures."""
from __future__ import annotations

import numpy as np

from rkvsim.models.architectures import ModelSpec
from rkvsim.models.method_specs.gear import INDEX_BYTES, segment_bytes as _gear_segment_bytes, segments as gear_segments
from rkvsim.models.method_specs.llamacpp import GGML_BLOCK, row_bytes as ggml_row_bytes
from rkvsim.models.methods import SCORE_BYTES, Method

__all__ = ["kv_bytes", "kv_bytes_per_head", "kv_bytes_per_head_vec", "kv_bytes_per_token", "kv_fixed_overhead",
           "quantized_tokens", "gear_segment_bytes", "gear_segments", "ggml_row_bytes", "GGML_BLOCK",
           "SCORE_BYTES", "INDEX_BYTES"]


def quantized_tokens(method: Method, n: int) -> int:
    """How many of n appended tokens a quantizer holds quantized (the rest: full precision)."""
    f = method.spec.quantized_tokens
    return int(f(method, n)) if f else 0


def gear_segment_bytes(method: Method, n_s: int, head_dim: int, dtype_bytes: int) -> int:
    """GEAR's error-correction terms for one quantized segment of n_s tokens, K and V together."""
    return int(_gear_segment_bytes(method, n_s, head_dim, dtype_bytes))


def kv_bytes_per_head_vec(method: Method, head_dim: int, prompt, total, dtype_bytes: int = 2) -> np.ndarray:
    """Bytes per KV head and layer over arrays of requests, exact (integer arithmetic).
    Requires total >= prompt."""
    prompt = np.asarray(prompt, np.int64)
    total = np.asarray(total, np.int64)
    return method.spec.bytes_per_head(method, head_dim, prompt, total, dtype_bytes)


def kv_bytes_per_head(method: Method, head_dim: int, prompt_len: int, total_len: int,
                      dtype_bytes: int = 2) -> int:
    """Bytes one layer's cache holds for ONE KV head of ONE request after prefill of
    `prompt_len` tokens and decode up to `total_len` tokens."""
    if total_len < prompt_len:
        raise ValueError("total_len must be >= prompt_len")
    return int(method.spec.bytes_per_head(method, head_dim, prompt_len, total_len, dtype_bytes))


def kv_bytes(model: ModelSpec, method: Method, prompt_len: int, total_len: int,
             tp: int = 1, dtype_bytes: int = 2) -> int:
    """Bytes of one request's KV cache on one tensor-parallel rank (KV heads split over TP). A
    sliding-window model (Mistral v0.1) keeps only its last `sliding_window` tokens."""
    heads = max(1, model.num_kv_heads // tp)
    w = model.sliding_window
    if w is not None:
        prompt_len, total_len = min(prompt_len, w), min(total_len, w)
    return model.num_layers * heads * kv_bytes_per_head(
        method, model.head_dim, prompt_len, total_len, dtype_bytes)


def kv_bytes_per_token(model: ModelSpec, method: Method, tp: int = 1, dtype_bytes: int = 2) -> float:
    """Marginal bytes of one more cached token once the cache is long (no eviction cap):
    what a paged block of the method holds per token slot."""
    return method.spec.token_bytes(method, model, tp, dtype_bytes)


def kv_fixed_overhead(model: ModelSpec, method: Method, tp: int = 1, dtype_bytes: int = 2) -> float:
    """Bytes a request holds beyond kv_bytes_per_token * cached tokens, at its worst point
    (a quantizer's full-precision window at its fullest, GEAR's prefill segment terms)."""
    f = method.spec.fixed_bytes
    return f(method, model, tp, dtype_bytes) if f else 0.0
