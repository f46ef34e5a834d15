"""H2O: keep `heavy` tokens with the largest accumulated attention plus `recent` newest.

Scores need the attention probabilities, which fused attention never materialises, so
both prefill and decode run an explicit matmul + softmax pass (that extra cost is what
the profiler is meant to see). Scores are accumulated over queries and over the query
heads of each KV group, one fp32 value per cached token per KV head (counted in nbytes).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rkvsim.models import Method

from .attention import attention_with_mass
from .common import check_decode, check_qkv, tensor_bytes, token_positions
from .evicted import EvictedCache


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


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method):
    check_qkv(q, k, v)
    out, mass = attention_with_mass(q, k, v, q_offset=0)
    b, h, n, _ = k.shape
    cache = H2OCache(k.contiguous(), v.contiguous(), token_positions(b, h, 0, n, k.device), n, scores=mass)
    return out, evict(cache, method)


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: H2OCache, method: Method):
    check_decode(q, k_new, v_new)
    b, h, n = k_new.shape[:3]
    zeros = torch.zeros(b, h, n, dtype=torch.float32, device=k_new.device)
    cache = cache.appended(k_new, v_new, scores=zeros)
    # Attend first (the new token sees the full cache plus itself), then evict, as H2O does.
    out, mass = attention_with_mass(q, cache.k, cache.v)
    cache = replace(cache, scores=update_scores(cache.scores, mass))
    return out, evict(cache, method)
