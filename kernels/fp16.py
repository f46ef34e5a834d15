"""Uncompressed baseline: the whole K/V history in the input dtype, fused attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rkvsim.models import Method

from .attention import sdpa
from .common import check_decode, check_qkv, tensor_bytes


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


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method | None = None):
    check_qkv(q, k, v)
    return sdpa(q, k, v, causal=True), FullCache(k.contiguous(), v.contiguous())


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: FullCache, method: Method | None = None):
    check_decode(q, k_new, v_new)
    # Concatenation (not a preallocated buffer) keeps nbytes equal to what is really held.
    cache = FullCache(torch.cat([cache.k, k_new], dim=2), torch.cat([cache.v, v_new], dim=2))
    return sdpa(q, cache.k, cache.v), cache
