"""SnapKV: after prefill, the last `window` prompt queries vote on which earlier prompt
tokens to keep; votes are max-pooled so neighbours of important tokens survive too. The
prompt is cut to `budget` tokens (window included) once; decode appends without eviction."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rkvsim.models import Method

from .attention import attention_with_mass, sdpa
from .common import check_decode, check_qkv, token_positions
from .evicted import EvictedCache


def votes(q: Tensor, k: Tensor, method: Method) -> Tensor:
    """Pooled votes (B,Hkv,n-window) fp32 of the window queries over the prefix."""
    b, h, n, _ = k.shape
    w = method.window
    # Only the window queries are scored, with their causal mask inside the window.
    _, mass = attention_with_mass(q[:, :, n - w:], k, None, q_offset=n - w)
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


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method):
    check_qkv(q, k, v)
    out = sdpa(q, k, v, causal=True)
    b, h, n, _ = k.shape
    cache = EvictedCache(k.contiguous(), v.contiguous(), token_positions(b, h, 0, n, k.device), n)
    idx = select(q, k, method)
    return out, (cache if idx is None else cache.kept(idx))


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: EvictedCache, method: Method):
    check_decode(q, k_new, v_new)
    cache = cache.appended(k_new, v_new)
    return sdpa(q, cache.k, cache.v), cache
