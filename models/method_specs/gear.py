"""GEAR (Kang et al., 2024): KIVI's quantizer plus, per quantization event ("segment" of n_s
tokens, per head, for K and for V), a low-rank approximation of the quantization error and the
largest errors kept exactly as sparse outliers:
- low-rank factors of rank max(1, ceil(rank_frac * min(n_s, d))), stored as (n_s x rank) and
  (rank x d) full-precision matrices;
- ceil(outlier_frac * n_s * d) outliers, each a full-precision value and an int32 index."""
from types import SimpleNamespace

import numpy as np

from rkvsim.models.method_specs import _quantizer as q
from rkvsim.models.methods import QUANTIZING, MethodSpec

INDEX_BYTES = 4   # int32 outlier positions


def rank(m, n_s, head_dim):
    # The same float expression for ints and arrays, so a request and a batch agree bit for bit.
    return np.maximum(1, np.ceil(m.rank_frac * np.minimum(n_s, head_dim))).astype(np.int64)


def outliers(m, n_s, head_dim):
    """Outliers of ONE of K or V for a segment of n_s tokens (0 for an empty segment)."""
    return np.ceil(m.outlier_frac * n_s * head_dim).astype(np.int64)


def segment_bytes(m, n_s, head_dim, dtype_bytes):
    """Error-correction terms of one segment of n_s tokens, K and V together (0 when empty)."""
    low_rank = (n_s + head_dim) * rank(m, n_s, head_dim) * dtype_bytes
    outl = outliers(m, n_s, head_dim) * (dtype_bytes + INDEX_BYTES)
    return np.where(np.asarray(n_s) > 0, 2 * (low_rank + outl), 0)


def segments(m, prompt_len: int, total_len: int) -> list[int]:
    """Sizes of the quantization events: one at prefill, then one per G tokens appended."""
    first = int(q.quantized_tokens(m, prompt_len))
    later = (int(q.quantized_tokens(m, total_len)) - first) // m.group_size
    return ([first] if first else []) + [m.group_size] * later


def _seg_g(m, head_dim, dtype_bytes) -> int:
    """Correction bytes of one G-token segment (every quantization event after the prefill)."""
    return int(segment_bytes(m, m.group_size, head_dim, dtype_bytes))


def _bytes(m, head_dim, prompt, total, dtype_bytes):
    g = m.group_size
    first = q.quantized_tokens(m, prompt)
    later = (q.quantized_tokens(m, total) - first) // g
    seg_g = _seg_g(m, head_dim, dtype_bytes)
    return q.group_bytes_per_head(m, head_dim, prompt, total, dtype_bytes) \
        + segment_bytes(m, first, head_dim, dtype_bytes) + later * seg_g


def _bytes_of_total(m, head_dim, total, dtype_bytes):
    # The segments after the prefill are G tokens each, and quantized counts are multiples of G, so
    # `later` splits into qt(total) / G - qt(prompt) / G: _bytes = this + _bytes_of_prompt, exactly.
    return q.group_bytes_per_head(m, head_dim, total, total, dtype_bytes) + \
        q.quantized_tokens(m, total) // m.group_size * _seg_g(m, head_dim, dtype_bytes)


def _bytes_of_prompt(m, head_dim, prompt, dtype_bytes):
    first = q.quantized_tokens(m, prompt)
    return segment_bytes(m, first, head_dim, dtype_bytes) - first // m.group_size * _seg_g(m, head_dim, dtype_bytes)


def _check(m) -> None:
    q.check(m)
    if not (0 < m.rank_frac <= 1 and 0 <= m.outlier_frac <= 1):
        raise ValueError(f"gear.rank_frac must be in (0, 1] and gear.outlier_frac in [0, 1], got "
                         f"{m.rank_frac}, {m.outlier_frac}")


SPEC = MethodSpec(
    kind="gear", family=QUANTIZING, doc=__doc__,
    settings={**q.SETTINGS, "rank_frac": 0.02, "outlier_frac": 0.02}, check=_check,
    number=lambda m: m.bits, from_number=q.engine_bits,
    engine_names=("GEAR",),
    kernel="gear",
    paper_scores=lambda m: rf"^gear_.*_{m.bits}bits$",
    bytes_per_head=_bytes, bytes_parts=(_bytes_of_total, _bytes_of_prompt),
    token_bytes=q.marginal_token_bytes, fixed_bytes=q.window_overhead,
    quantized_tokens=q.quantized_tokens, quant_bytes_per_token=q.quant_bytes_per_token,
    corrections=SimpleNamespace(segment_bytes=segment_bytes, rank=rank, outliers=outliers),
    prefix_why="the prompt is quantized as one segment whose low-rank error factors and outliers are fitted "
               "over the whole prompt, the request's own question included: no prefix of it stands alone, "
               "so every request's cache is private",
)
