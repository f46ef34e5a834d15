"""KIVI's group quantizer, as bytes: the arithmetic KIVI and GEAR (which uses KIVI's quantizer
as its backbone) share.

- the newest tokens stay in full precision; once `residual + group_size` full-precision tokens
  are held, the oldest `group_size` of them are quantized (quantize on append). After a prefill
  of n tokens, floor((n - residual) / G) * G tokens are quantized at once;
- keys: per-channel, one (scale, zero) pair per channel per G tokens;
- values: per-token, one (scale, zero) pair per token per G channels;
- scales and zero-points are stored in the full-precision dtype, payload bit-packed.
Every function takes ints or int64 arrays (numpy operations only), so one formula serves a
request and a batch.
"""
from __future__ import annotations

import numpy as np

SETTINGS = {"bits": 4, "group_size": 32, "residual": 128}


def check(m) -> None:
    if m.bits not in (2, 4, 8):
        raise ValueError(f"{m.kind}.bits must be 2, 4 or 8, got {m.bits}")
    if m.group_size <= 0:
        raise ValueError(f"{m.kind}.group_size must be positive, got {m.group_size}")


def quantized_tokens(m, n):
    """How many of n appended tokens are held quantized (the rest: full precision)."""
    g = m.group_size
    return np.maximum(n - m.residual, 0) // g * g


def quant_bytes_per_token(m, head_dim: int, dtype_bytes: int) -> float:
    """Payload + scales/zeros of ONE quantized token (K and V, one head). Exact because the
    quantized count is always a multiple of the group size."""
    g = m.group_size
    payload = 2 * head_dim * m.bits / 8
    key_params = head_dim * 2 * dtype_bytes / g
    value_params = -(-head_dim // g) * 2 * dtype_bytes
    return payload + key_params + value_params


def group_bytes_per_head(m, head_dim: int, prompt, total, dtype_bytes: int):
    """Full-precision window + quantized payload + scales/zeros, one KV head, one layer."""
    g = m.group_size
    full = 2 * head_dim * dtype_bytes
    n_q = quantized_tokens(m, total)
    payload = 2 * n_q * head_dim * m.bits // 8
    params = (n_q // g) * head_dim * 2 * dtype_bytes + n_q * (-(-head_dim // g)) * 2 * dtype_bytes
    return (total - n_q) * full + payload + params


def group_bytes_of_total(m, head_dim, total, dtype_bytes):
    """group_bytes_per_head, which does not read the prompt: KIVI's bytes_parts are (this, None)."""
    return group_bytes_per_head(m, head_dim, total, total, dtype_bytes)


def _request_bytes(model, m, prompt: int, total: int, tp: int, dtype_bytes: int) -> int:
    """models.kv_bytes.kv_bytes, spelled here so that the spec modules import nothing above them."""
    heads = max(1, model.num_kv_heads // tp)
    return model.num_layers * heads * int(m.spec.bytes_per_head(m, model.head_dim, prompt, total, dtype_bytes))


def marginal_token_bytes(m, model, tp: int, dtype_bytes: int) -> float:
    """What one more cached token costs once the cache is long: measured across 64 groups of
    decode-time growth, so the window and the prefill segment cancel."""
    kv_bytes = _request_bytes
    g = m.group_size
    lo = m.residual + 64 * g
    hi = lo + 64 * g
    prompt = lo
    return (kv_bytes(model, m, prompt, hi, tp, dtype_bytes) - kv_bytes(model, m, prompt, lo, tp, dtype_bytes)) / (hi - lo)


def window_overhead(m, model, tp: int, dtype_bytes: int) -> float:
    """Bytes a request holds beyond marginal bytes x tokens at its worst point: the full-precision
    window at its fullest (and GEAR's prefill segment terms)."""
    kv_bytes = _request_bytes
    per = marginal_token_bytes(m, model, tp, dtype_bytes)
    g, r = m.group_size, m.residual
    worst = 0.0
    # The window is fullest just before a group is quantized: n = r + g - 1 (mod g).
    for prompt in (r + g - 1, 4 * r + g - 1, 32 * r + g - 1):
        for n in (prompt, prompt + g * 4):
            worst = max(worst, kv_bytes(model, m, prompt, n, tp, dtype_bytes) - per * n)
    return worst


def engine_bits(n: int) -> dict:
    return {"bits": n}
