"""KIVI: 2/4/8-bit group quantization with a full-precision window of recent tokens.

The cache holds tokens [0, n_q) quantized and [n_q, n) in full precision. Quantize on
append: whenever the full-precision window reaches residual + G tokens its oldest G are
quantized (after prefill, all but the newest residual..residual+G-1 at once), which is
exactly rkvsim.models.quantized_tokens. Attention dequantizes the whole quantized part
every step, as KIVI's non-fused path does; prefill attends over the original K/V.

Chunked prefill (`extend`): the chunk's queries attend causally over the cache as held
(quantized part dequantized, residual window exact) plus the chunk's own exact K/V; then
the chunk is appended and every token past the window is quantized in one event, up to
quantized_tokens(n) for the n tokens now held. Quantized counts are multiples of G from
token 0, so the token groups (and thus the bytes and codes) are those of an unchunked
prefill of all n tokens: nbytes == kv_bytes_per_head(method, d, n, n). Only the outputs
differ from an unchunked prefill, where the past would have been seen exact. `last` changes
nothing here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rkvsim.models import Method, quantized_tokens

from rkvsim.kernels import quant
from rkvsim.kernels.attention import sdpa
from rkvsim.kernels.common import check_chunk, check_decode, tensor_bytes


def quantize_segment(k: Tensor, v: Tensor, method: Method) -> tuple[quant.QTensor, quant.QTensor]:
    """The group quantization itself (timeable alone): keys per channel, values per token."""
    return (quant.quantize_keys(k, method.bits, method.group_size),
            quant.quantize_values(v, method.bits, method.group_size))


@dataclass
class KiviCache:
    qk: quant.QTensor | None   # oldest tokens, quantized
    qv: quant.QTensor | None
    k_res: Tensor              # newest tokens, full precision (B,Hkv,r,d)
    v_res: Tensor

    @property
    def num_quantized(self) -> int:
        return 0 if self.qk is None else self.qk.num_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_quantized + self.k_res.shape[2]

    @property
    def nbytes(self) -> int:
        qb = 0 if self.qk is None else self.qk.nbytes + self.qv.nbytes
        return qb + tensor_bytes(self.k_res, self.v_res)

    def quantize_oldest(self, method: Method, count: int) -> "KiviCache":
        """Move the `count` oldest full-precision tokens into the quantized store."""
        if count <= 0:
            return self
        qk, qv = quantize_segment(self.k_res[:, :, :count], self.v_res[:, :, :count], method)
        return KiviCache(quant.concat(self.qk, qk), quant.concat(self.qv, qv),
                         self.k_res[:, :, count:].contiguous(), self.v_res[:, :, count:].contiguous())

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """Full (B,Hkv,n,d) K and V as attention sees them (quantized part dequantized)."""
        if self.qk is None:
            return self.k_res, self.v_res
        return (torch.cat([quant.dequantize(self.qk), self.k_res], dim=2),
                torch.cat([quant.dequantize(self.qv), self.v_res], dim=2))

    def appended(self, k_new: Tensor, v_new: Tensor) -> "KiviCache":
        return replace(self, k_res=torch.cat([self.k_res, k_new], dim=2),
                       v_res=torch.cat([self.v_res, v_new], dim=2))


def quantize_on_append(cache: KiviCache, method: Method) -> KiviCache:
    """The decode-time compression step: quantize the oldest G tokens once the window is full."""
    if cache.k_res.shape[2] >= method.residual + method.group_size:
        return cache.quantize_oldest(method, method.group_size)
    return cache


def empty_cache(k: Tensor, v: Tensor) -> KiviCache:
    return KiviCache(None, None, k.contiguous(), v.contiguous())


def extend(q: Tensor, k_new: Tensor, v_new: Tensor, cache: KiviCache | None, method: Method,
           last: bool = True, new_cache=empty_cache):
    check_chunk(q, k_new, v_new)
    if cache is None:
        out = sdpa(q, k_new, v_new, causal=True)
        cache = new_cache(k_new, v_new)
    else:
        k_past, v_past = cache.keys_values()
        out = sdpa(q, torch.cat([k_past, k_new], dim=2), torch.cat([v_past, v_new], dim=2), causal=True)
        cache = cache.appended(k_new, v_new)
    return out, cache.quantize_oldest(method, quantized_tokens(method, cache.num_tokens) - cache.num_quantized)


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method, last: bool = True, new_cache=empty_cache):
    return extend(q, k, v, None, method, last, new_cache)


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: KiviCache, method: Method):
    check_decode(q, k_new, v_new)
    cache = quantize_on_append(cache.appended(k_new, v_new), method)
    k, v = cache.keys_values()
    return sdpa(q, k, v), cache
