"""Bytes a KV cache holds, per method: the one formula shared by kernels/ (cache.nbytes),
the simulator's block manager and the roofline cost model.

Layout assumed for every quantizer (KIVI, and GEAR which uses KIVI's quantizer as backbone):
- the newest tokens stay in full precision; once `residual + group_size` full-precision tokens
  are held, the oldest `group_size` of them are quantized (quantize on append). After a
  prefill of n tokens, floor((n - residual) / G) * G tokens are quantized at once;
- keys: per-channel, one (scale, zero) pair per channel per G tokens;
- values: per-token, one (scale, zero) pair per token per G channels;
- scales and zero-points are stored in the full-precision dtype, payload bit-packed.
GEAR adds, per quantization event ("segment" of n_s tokens, per head, for K and for V):
- low-rank factors of the quantization residual, rank max(1, ceil(rank_frac * min(n_s, d))),
  stored as (n_s x rank) and (rank x d) full-precision matrices;
- ceil(outlier_frac * n_s * d) outliers, each a full-precision value and an int32 index.
H2O also holds one fp32 accumulated-attention score per cached token per KV head.
"""
from __future__ import annotations

import math

from rkvsim.models.architectures import ModelSpec
from rkvsim.models.methods import Method

INDEX_BYTES = 4   # int32 outlier positions
SCORE_BYTES = 4   # fp32 accumulated attention scores (H2O)
# llama.cpp KV types: (values per block, bytes per block) as ggml stores them. q8_0: 32 int8 +
# one fp16 scale = 34 bytes; q4_0: 32 4-bit values + one fp16 scale = 18 bytes.
GGML_BLOCK = {"f16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18)}


def ggml_row_bytes(kv_type: str, n: int) -> int:
    """Bytes of n values (one token's K or V for one head) stored as a llama.cpp KV type."""
    per, size = GGML_BLOCK[kv_type]
    return -(-n // per) * size


def quantized_tokens(method: Method, n: int) -> int:
    """How many of n appended tokens a quantizer holds quantized (the rest: full precision)."""
    g, r = method.group_size, method.residual
    if n <= r:
        return 0
    return (n - r) // g * g


def _quant_payload(method: Method, n_q: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V quantized payload plus their scales/zero-points, for n_q quantized tokens."""
    g = method.group_size
    payload = 2 * n_q * head_dim * method.bits // 8
    key_params = (n_q // g) * head_dim * 2 * dtype_bytes
    value_params = n_q * math.ceil(head_dim / g) * 2 * dtype_bytes
    return payload + key_params + value_params


def gear_segment_bytes(method: Method, n_s: int, head_dim: int, dtype_bytes: int) -> int:
    """GEAR's error-correction terms for one quantized segment of n_s tokens, K and V together."""
    if n_s <= 0:
        return 0
    rank = max(1, math.ceil(method.rank_frac * min(n_s, head_dim)))
    low_rank = (n_s + head_dim) * rank * dtype_bytes
    outliers = math.ceil(method.outlier_frac * n_s * head_dim) * (dtype_bytes + INDEX_BYTES)
    return 2 * (low_rank + outliers)


def gear_segments(method: Method, prompt_len: int, total_len: int) -> list[int]:
    """Sizes of the quantization events: one at prefill, then one per G tokens appended."""
    first = quantized_tokens(method, prompt_len)
    later = (quantized_tokens(method, total_len) - first) // method.group_size
    return ([first] if first else []) + [method.group_size] * later


def kv_bytes_per_head(method: Method, head_dim: int, prompt_len: int, total_len: int,
                      dtype_bytes: int = 2) -> int:
    """Bytes one layer's cache holds for ONE KV head of ONE request after prefill of
    `prompt_len` tokens and decode up to `total_len` tokens."""
    if total_len < prompt_len:
        raise ValueError("total_len must be >= prompt_len")
    full = 2 * head_dim * dtype_bytes  # K and V of one token in full precision
    if method.kind in GGML_BLOCK:
        return total_len * 2 * ggml_row_bytes(method.kind, head_dim)
    if method.kind in ("kivi", "gear"):
        n_q = quantized_tokens(method, total_len)
        b = (total_len - n_q) * full + _quant_payload(method, n_q, head_dim, dtype_bytes)
        if method.kind == "gear":
            b += sum(gear_segment_bytes(method, s, head_dim, dtype_bytes)
                     for s in gear_segments(method, prompt_len, total_len))
        return b
    n = method.cached_tokens(prompt_len, total_len)
    b = n * full
    if method.kind == "h2o":
        b += n * SCORE_BYTES
    return b


def kv_bytes(model: ModelSpec, method: Method, prompt_len: int, total_len: int,
             tp: int = 1, dtype_bytes: int = 2) -> int:
    """Bytes of one request's KV cache on one tensor-parallel rank (KV heads split over TP)."""
    heads = max(1, model.num_kv_heads // tp)
    return model.num_layers * heads * kv_bytes_per_head(
        method, model.head_dim, prompt_len, total_len, dtype_bytes)


def kv_bytes_per_token(model: ModelSpec, method: Method, tp: int = 1, dtype_bytes: int = 2) -> float:
    """Marginal bytes of one more cached token once the cache is long (no eviction cap):
    what a paged block of the method holds per token slot."""
    if method.kind in ("kivi", "gear"):
        g = method.group_size
        lo = method.residual + 64 * g
        hi = lo + 64 * g
        prompt = lo  # decode-time growth: segments of G tokens
        return (kv_bytes(model, method, prompt, hi, tp, dtype_bytes)
                - kv_bytes(model, method, prompt, lo, tp, dtype_bytes)) / (hi - lo)
    heads = max(1, model.num_kv_heads // tp)
    if method.kind in GGML_BLOCK:
        return model.num_layers * heads * 2 * ggml_row_bytes(method.kind, model.head_dim)
    per = 2 * model.head_dim * dtype_bytes + (SCORE_BYTES if method.kind == "h2o" else 0)
    return model.num_layers * heads * per


def kv_fixed_overhead(model: ModelSpec, method: Method, tp: int = 1, dtype_bytes: int = 2) -> float:
    """Bytes a request holds beyond kv_bytes_per_token * cached tokens, at its worst point
    (the full-precision residual window at its fullest, GEAR's prefill segment terms)."""
    if method.kind not in ("kivi", "gear"):
        return 0.0
    per = kv_bytes_per_token(model, method, tp, dtype_bytes)
    g, r = method.group_size, method.residual
    worst = 0.0
    # The residual is fullest just before a group is quantized: n = r + g - 1 (mod g).
    for prompt in (r + g - 1, 4 * r + g - 1, 32 * r + g - 1):
        for n in (prompt, prompt + g * 4):
            worst = max(worst, kv_bytes(model, method, prompt, n, tp, dtype_bytes) - per * n)
    return worst
