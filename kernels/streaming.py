"""StreamingLLM: keep the first `sink` tokens (attention sinks) and the `recent` newest."""
from __future__ import annotations

import torch
from torch import Tensor

from rkvsim.models import Method

from .attention import sdpa
from .common import check_decode, check_qkv, token_positions
from .evicted import EvictedCache


def evict(cache: EvictedCache, method: Method) -> EvictedCache:
    """Drop everything between the sinks and the recent window (the compression step)."""
    n, cap = cache.num_tokens, method.sink + method.recent
    if n <= cap:
        return cache
    # Same slots for every head, so plain slicing is enough (no gather).
    s, r = method.sink, n - method.recent
    cut = lambda t: torch.cat([t[:, :, :s], t[:, :, r:]], dim=2)  # noqa: E731
    return EvictedCache(cut(cache.k), cut(cache.v), cut(cache.positions), cache.seen)


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method):
    check_qkv(q, k, v)
    out = sdpa(q, k, v, causal=True)  # the prompt itself is attended in full
    b, h, n, _ = k.shape
    cache = EvictedCache(k.contiguous(), v.contiguous(), token_positions(b, h, 0, n, k.device), n)
    return out, evict(cache, method)


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: EvictedCache, method: Method):
    check_decode(q, k_new, v_new)
    # Evict before attending, as StreamingLLM does: the new token sees sink + recent tokens.
    cache = evict(cache.appended(k_new, v_new), method)
    return sdpa(q, cache.k, cache.v), cache
