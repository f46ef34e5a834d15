"""FP8 (e4m3) KV cache: K and V stored as torch.float8_e4m3fn with per-layer scales, one for all
of K and one for V (`scale: tensor`) or one per KV head (`scale: head`).

Scales: computed from the first prefill call's K/V (amax / 448, e4m3's largest finite value), the
way vLLM's calculated KV scales are taken on the first batch, then fixed: later tokens are
quantized with them and saturate at +-448 * scale. They belong to the layer, not to a request,
so `nbytes` counts the payload only (one byte per element, rkvsim.models.kv_bytes_per_head) and
`scale_nbytes` the scales.

Attention: a prefill (or a chunk's own tokens) attends its exact K/V, as serving engines attend
the fresh K/V of a prompt; the cached past is read dequantized. Decode writes the new token
into the cache first and attends over the whole cache dequantized, as vLLM's decode kernels
read K/V back from the fp8 cache. Chunked prefill (`extend`) appends each chunk with the scales
of the first, so the cache after any split equals the unchunked prefill's when the later
chunks stay within the first chunk's range; `last` changes nothing here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rkvsim.kernels.attention import sdpa
from rkvsim.kernels.common import check_chunk, check_decode, tensor_bytes
from rkvsim.models import Method

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def scale_for(x: Tensor, granularity: str) -> Tensor:
    """fp32 scale(s) mapping x's largest magnitude to E4M3_MAX: shape (1,1,1,1) per tensor,
    (1,Hkv,1,1) per KV head."""
    dims = (0, 2, 3) if granularity == "head" else (0, 1, 2, 3)
    amax = x.detach().abs().to(torch.float32).amax(dim=dims, keepdim=True)
    return torch.clamp(amax, min=1e-12) / E4M3_MAX


def quantize(x: Tensor, scale: Tensor) -> Tensor:
    return (x.to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def dequantize(x8: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (x8.to(torch.float32) * scale).to(dtype)


@dataclass
class Fp8Cache:
    k: Tensor          # (B,Hkv,L,d) float8_e4m3fn
    v: Tensor
    k_scale: Tensor    # fp32, per layer: (1,1,1,1) or (1,Hkv,1,1)
    v_scale: Tensor
    dtype: torch.dtype  # the compute dtype K/V are read back as

    @property
    def num_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v)

    @property
    def scale_nbytes(self) -> int:
        return tensor_bytes(self.k_scale, self.v_scale)

    def keys(self) -> Tensor:
        return dequantize(self.k, self.k_scale, self.dtype)

    def values(self) -> Tensor:
        return dequantize(self.v, self.v_scale, self.dtype)

    def append(self, k_new: Tensor, v_new: Tensor) -> "Fp8Cache":
        return Fp8Cache(torch.cat([self.k, quantize(k_new, self.k_scale)], dim=2),
                        torch.cat([self.v, quantize(v_new, self.v_scale)], dim=2),
                        self.k_scale, self.v_scale, self.dtype)


def extend(q: Tensor, k_new: Tensor, v_new: Tensor, cache: Fp8Cache | None, method: Method,
           last: bool = True):
    check_chunk(q, k_new, v_new)
    if cache is None:
        ks, vs = scale_for(k_new, method.scale), scale_for(v_new, method.scale)
        cache = Fp8Cache(quantize(k_new, ks), quantize(v_new, vs), ks, vs, k_new.dtype)
        return sdpa(q, k_new, v_new, causal=True), cache
    k = torch.cat([cache.keys(), k_new], dim=2)
    v = torch.cat([cache.values(), v_new], dim=2)
    return sdpa(q, k, v, causal=True), cache.append(k_new, v_new)


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method, last: bool = True):
    return extend(q, k, v, None, method, last)


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: Fp8Cache, method: Method):
    check_decode(q, k_new, v_new)
    cache = cache.append(k_new, v_new)
    return sdpa(q, cache.keys(), cache.values()), cache
