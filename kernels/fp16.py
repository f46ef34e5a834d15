"""Uncompressed baseline: the whole K/V history in the input dtype, fused attention.

Chunked prefill (`extend`): the chunk attends causally over every cached token plus
itself, then is appended, so any split of a prompt gives the unchunked prefill's outputs
and cache. `last` (whether the chunk ends the prompt) changes nothing here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rkvsim.models import Method

from rkvsim.kernels.attention import sdpa
from rkvsim.kernels.common import append_tokens, check_chunk, check_decode, tensor_bytes


@dataclass
class FullCache:
    k: Tensor   # (B,Hkv,L,d)
    v: Tensor

    @property
    def num_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v)


def extend(q: Tensor, k_new: Tensor, v_new: Tensor, cache: FullCache | None, method: Method | None = None,
           last: bool = True):
    check_chunk(q, k_new, v_new)
    # Concatenation (not a preallocated buffer) keeps nbytes equal to what is really held.
    k = append_tokens(None if cache is None else cache.k, k_new)
    v = append_tokens(None if cache is None else cache.v, v_new)
    return sdpa(q, k, v, causal=True), FullCache(k, v)


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method | None = None, last: bool = True):
    return extend(q, k, v, None, method, last)


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: FullCache, method: Method | None = None):
    check_decode(q, k_new, v_new)
    cache = FullCache(torch.cat([cache.k, k_new], dim=2), torch.cat([cache.v, v_new], dim=2))
    return sdpa(q, cache.k, cache.v), cache
