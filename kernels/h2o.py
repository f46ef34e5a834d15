"""H2O: keep `heavy` tokens with the largest accumulated attention plus `recent` newest.

Scores need the attention probabilities, which fused attention never materialises, so
both prefill and decode run an explicit matmul + softmax pass (that extra cost is what
the profiler is meant to see). Scores are accumulated over queries and over the query
heads of each KV group, one fp32 value per cached token per KV head (counted in nbytes).

Chunked prefill (`extend`): each chunk attends causally over the cache plus itself and
adds its attention mass to the scores; eviction runs only when the prompt's last chunk
lands (last=True), as after an unchunked prefill. Until then the cache holds every prompt
token with its score, so a prompt in chunks ends with the scores, kept tokens, outputs
and bytes of the unchunked prefill (up to fp32 summation order of the scores). Mid-prompt
(last=False) the cache holds n tokens + n scores, more than kv_bytes_per_head's cap.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rkvsim.models import Method

from rkvsim.kernels.attention import attention_with_mass
from rkvsim.kernels.common import check_chunk, check_decode, tensor_bytes
from rkvsim.kernels.evicted import EvictedCache


@dataclass
class H2OCache(EvictedCache):
    scores: Tensor = None   # (B,Hkv,n) fp32 accumulated attention per kept token

    @property
    def nbytes(self) -> int:
        return super().nbytes + tensor_bytes(self.scores)


def update_scores(scores: Tensor, mass: Tensor) -> Tensor:
    """Accumulate one step's attention mass into the running scores."""
    return scores + mass


def keep_slots(scores: Tensor, method: Method) -> Tensor | None:
    """Ascending slots to keep, (B,Hkv,heavy+recent); None if nothing needs evicting.
    Cached tokens are in positional order, so the last `recent` slots are the recent window
    and heavy hitters are chosen among the older ones only."""
    n = scores.shape[-1]
    if n <= method.heavy + method.recent:
        return None
    older = n - method.recent
    heavy = scores[..., :older].topk(method.heavy, dim=-1, sorted=False).indices.sort(dim=-1).values
    recent = torch.arange(older, n, device=scores.device).expand(*scores.shape[:-1], method.recent)
    return torch.cat([heavy, recent], dim=-1)


def evict(cache: H2OCache, method: Method) -> H2OCache:
    """The compression step: keep heavy hitters + recent, carrying their scores along."""
    idx = keep_slots(cache.scores, method)
    return cache if idx is None else cache.kept(idx, "scores")


def extend(q: Tensor, k_new: Tensor, v_new: Tensor, cache: H2OCache | None, method: Method,
           last: bool = True):
    check_chunk(q, k_new, v_new)
    b, h, c = k_new.shape[:3]
    zeros = torch.zeros(b, h, c, dtype=torch.float32, device=k_new.device)
    if cache is None:
        cache = H2OCache.start(k_new, v_new, scores=zeros)
    else:
        cache = cache.appended(k_new, v_new, scores=zeros)
    # Attend first (the chunk sees the whole cache plus itself, causally), then evict. A
    # single newest query sees every key, so it skips building the mask.
    out, mass = attention_with_mass(q, cache.k, cache.v, q_offset=None if c == 1 else cache.num_tokens - c)
    cache = replace(cache, scores=update_scores(cache.scores, mass))
    return out, (evict(cache, method) if last else cache)


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method, last: bool = True):
    return extend(q, k, v, None, method, last)


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: H2OCache, method: Method):
    check_decode(q, k_new, v_new)
    # One token is a one-token chunk that ends its "prompt": H2O evicts after every step.
    return extend(q, k_new, v_new, cache, method, last=True)
