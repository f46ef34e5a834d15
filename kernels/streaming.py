"""StreamingLLM: keep the first `sink` tokens (attention sinks) and the `recent` newest.

Chunked prefill (`extend`): the chunk attends causally over the cache as held (sinks +
recent window) plus itself, then the cap applies at once. Since the kept set is always
the first `sink` and the newest `recent` tokens seen, any split of a prompt keeps the
same tokens (and bytes, kv_bytes_per_head(method, d, n, n)) as an unchunked prefill;
outputs differ only for queries whose unchunked view reached tokens evicted earlier.
`last` changes nothing here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rkvsim.models import Method

from rkvsim.kernels.attention import sdpa
from rkvsim.kernels.common import check_chunk, check_decode
from rkvsim.kernels.evicted import EvictedCache


def evict(cache: EvictedCache, method: Method) -> EvictedCache:
    """Drop everything between the sinks and the recent window (the compression step)."""
    n, cap = cache.num_tokens, method.sink + method.recent
    if n <= cap:
        return cache
    # Same slots for every head, so plain slicing is enough (no gather).
    s, r = method.sink, n - method.recent
    cut = lambda t: torch.cat([t[:, :, :s], t[:, :, r:]], dim=2)  # noqa: E731
    return EvictedCache(cut(cache.k), cut(cache.v), cut(cache.positions), cache.seen)


def extend(q: Tensor, k_new: Tensor, v_new: Tensor, cache: EvictedCache | None, method: Method,
           last: bool = True):
    check_chunk(q, k_new, v_new)
    cache = EvictedCache.start(k_new, v_new) if cache is None else cache.appended(k_new, v_new)
    out = sdpa(q, cache.k, cache.v, causal=True)  # a chunk is attended in full, then capped
    return out, evict(cache, method)


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method, last: bool = True):
    return extend(q, k, v, None, method, last)


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: EvictedCache, method: Method):
    check_decode(q, k_new, v_new)
    # Evict before attending, as StreamingLLM does: the new token sees sink + recent tokens.
    cache = evict(cache.appended(k_new, v_new), method)
    return sdpa(q, cache.k, cache.v), cache
