"""SnapKV: after prefill, the last `window` prompt queries vote on which earlier prompt
tokens to keep; votes are max-pooled so neighbours of important tokens survive too. The
prompt is cut to `budget` tokens (window included) once; decode appends without eviction.

Chunked prefill (`extend`): every chunk attends causally over the whole cache plus itself;
the selection runs when the prompt's last chunk lands (last=True). The votes need the
prompt's last `window` queries, which may span chunks, so while a prompt is open the
cache keeps its newest `window` queries (`window_q`, transient prefill state rather than
KV: not in nbytes, dropped at selection). A prompt in chunks thus ends with the unchunked
prefill's outputs, kept tokens and bytes (kv_bytes_per_head(method, d, n, n)); mid-prompt
the cache holds all n tokens. A chunk on a closed cache (after the last chunk or a decode
step) only appends, as decode does: SnapKV compresses a prompt once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from rkvsim.models import Method

from rkvsim.kernels.attention import attention_with_mass, sdpa
from rkvsim.kernels.common import check_chunk, check_decode, last_tokens
from rkvsim.kernels.evicted import EvictedCache


@dataclass
class SnapCache(EvictedCache):
    window_q: Tensor | None = None   # (B,Hq,<=window,d) while the prompt is open, else None


def votes(q: Tensor, k: Tensor, method: Method) -> Tensor:
    """Pooled votes (B,Hkv,n-window) fp32 of the window queries over the prefix. q holds the
    prompt's queries, or at least its last `window` (the window queries are q's last rows)."""
    b, h, n, _ = k.shape
    w = method.window
    # Only the window queries are scored, with their causal mask inside the window.
    _, mass = attention_with_mass(q[:, :, q.shape[2] - w:], k, None, q_offset=n - w)
    prefix = mass[..., :n - w].reshape(b * h, 1, n - w)
    pooled = F.max_pool1d(prefix, method.kernel, stride=1, padding=method.kernel // 2)
    return pooled[..., :n - w].reshape(b, h, n - w)


def select(q: Tensor, k: Tensor, method: Method) -> Tensor | None:
    """The compression step: ascending slots to keep (B,Hkv,budget), or None if the prompt fits."""
    n = k.shape[2]
    if n <= method.budget:
        return None
    top = votes(q, k, method).topk(method.budget - method.window, dim=-1, sorted=False).indices
    window = torch.arange(n - method.window, n, device=k.device).expand(*k.shape[:2], method.window)
    return torch.cat([top.sort(dim=-1).values, window], dim=-1)


def extend(q: Tensor, k_new: Tensor, v_new: Tensor, cache: SnapCache | None, method: Method,
           last: bool = True):
    check_chunk(q, k_new, v_new)
    if cache is None:
        cache = SnapCache.start(k_new, v_new, window_q=q[:, :, :0])
    else:
        cache = cache.appended(k_new, v_new)
    out = sdpa(q, cache.k, cache.v, causal=True)
    if cache.window_q is None:   # closed: the prompt was compressed already
        return out, cache
    # Only the newest `window` rows matter; slicing q first keeps the copy window-sized.
    w = method.window
    recent_q = last_tokens(torch.cat([cache.window_q, last_tokens(q, w)], dim=2), w)
    if not last:
        return out, replace(cache, window_q=recent_q.contiguous())
    idx = select(recent_q, cache.k, method)
    cache = replace(cache, window_q=None)
    return out, (cache if idx is None else cache.kept(idx))


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method, last: bool = True):
    return extend(q, k, v, None, method, last)


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: EvictedCache, method: Method):
    check_decode(q, k_new, v_new)
    cache = cache.appended(k_new, v_new)
    return sdpa(q, cache.k, cache.v), cache
