"""GEAR: KIVI's quantizer (4 or 8 bit) plus error correction per quantization event.

Each event ("segment": the prefill block, then every G tokens moved out of the residual
window) is compressed per (sequence, KV head), K and V separately:
  1. the ceil(outlier_frac * n_s * d) largest-magnitude entries are kept exactly (value in
     the K/V dtype + int32 flat index) and zeroed before quantizing, so they no longer
     stretch the min/max ranges;
  2. the rest is group-quantized as in KIVI;
  3. the quantization residual is approximated at rank max(1, ceil(rank_frac*min(n_s, d)))
     and stored as (n_s x r) and (r x d) factors in the K/V dtype.
Reconstruction = dequantized + low-rank, with outliers written back on top.

Chunked prefill (`extend`, see kivi.extend): each chunk that moves tokens out of the
residual window is ONE segment of quantized_tokens(n_after) - quantized_tokens(n_before)
tokens, so a prompt in chunks holds one segment per such chunk instead of one for the
whole prompt. Quantized payload and residual window match KIVI's (and an unchunked
prefill's) bytes; the correction terms are the sum of
rkvsim.models.kv_bytes.gear_segment_bytes over those segments, which
kv_bytes_per_head(method, d, prompt_len, total_len) (one prefill segment) does not model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rkvsim.models import Method

from rkvsim.kernels import kivi, quant
from rkvsim.kernels.common import tensor_bytes


@dataclass
class Correction:
    """Error-correction terms of S consecutive equal-length segments of K (or V)."""
    start: int        # first token of the first segment
    seg_len: int      # n_s
    u: Tensor         # (B,H,S,n_s,r), left factor scaled by the singular values
    vt: Tensor        # (B,H,S,r,d)
    values: Tensor    # (B,H,S,k) outlier values
    index: Tensor     # (B,H,S,k) int32, flat index into the segment's n_s*d entries

    @property
    def num_segments(self) -> int:
        return self.u.shape[2]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.u, self.vt, self.values, self.index)


def segment_rank(method: Method, n_s: int, d: int) -> int:
    return max(1, math.ceil(method.rank_frac * min(n_s, d)))


def segment_outliers(method: Method, n_s: int, d: int) -> int:
    return math.ceil(method.outlier_frac * n_s * d)


def low_rank(residual: Tensor, rank: int, oversample: int = 4, niter: int = 2) -> tuple[Tensor, Tensor]:
    """Rank-`rank` factors of a batched fp32 residual (..., n, d) by randomized subspace
    iteration (what GEAR uses instead of a full SVD): returns (U*S (..., n, r), V^T (..., r, d))."""
    n, d = residual.shape[-2:]
    u, s, v = torch.svd_lowrank(residual, q=min(rank + oversample, n, d), niter=niter)
    return u[..., :rank] * s[..., None, :rank], v[..., :rank].transpose(-1, -2)


def compress_segment(x: Tensor, method: Method, keys: bool, start: int = 0) -> tuple[quant.QTensor, Correction]:
    """GEAR's compression of one segment x (B,H,n_s,d): outliers, quantization, low rank."""
    b, h, n_s, d = x.shape
    flat = x.reshape(b, h, n_s * d)
    idx = flat.abs().topk(segment_outliers(method, n_s, d), dim=-1, sorted=False).indices
    values = torch.gather(flat, -1, idx)
    dense = flat.scatter(-1, idx, 0).view(b, h, n_s, d)
    quantize = quant.quantize_keys if keys else quant.quantize_values
    qt = quantize(dense, method.bits, method.group_size)
    residual = dense.float() - quant.dequantize(qt).float()
    u, vt = low_rank(residual, segment_rank(method, n_s, d))
    corr = Correction(start, n_s, u.to(x.dtype).unsqueeze(2), vt.to(x.dtype).unsqueeze(2),
                      values.unsqueeze(2), idx.to(torch.int32).unsqueeze(2))
    return qt, corr


def add_correction(terms: list[Correction], new: Correction) -> list[Correction]:
    """Stack a segment onto the last run of equal-length segments (one batched matmul each
    at attend time) or start a new run."""
    if terms and terms[-1].seg_len == new.seg_len:
        last = terms[-1]
        cat = lambda a, b: torch.cat([a, b], dim=2)  # noqa: E731
        merged = Correction(last.start, last.seg_len, cat(last.u, new.u), cat(last.vt, new.vt),
                            cat(last.values, new.values), cat(last.index, new.index))
        return terms[:-1] + [merged]
    return terms + [new]


def apply_corrections(x: Tensor, terms: list[Correction]) -> Tensor:
    """Add low-rank terms and restore outliers in place on a freshly dequantized x (B,H,n,d)."""
    b, h, _, d = x.shape
    for c in terms:
        s, n_s = c.num_segments, c.seg_len
        region = x[:, :, c.start:c.start + s * n_s].view(b, h, s, n_s, d)
        region += c.u @ c.vt
        region.view(b, h, s, n_s * d).scatter_(-1, c.index.long(), c.values)
    return x


@dataclass
class GearCache(kivi.KiviCache):
    k_terms: list[Correction] = field(default_factory=list)
    v_terms: list[Correction] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(c.nbytes for c in self.k_terms + self.v_terms)

    def quantize_oldest(self, method: Method, count: int) -> "GearCache":
        if count <= 0:
            return self
        start = self.num_quantized
        qk, ck = compress_segment(self.k_res[:, :, :count], method, keys=True, start=start)
        qv, cv = compress_segment(self.v_res[:, :, :count], method, keys=False, start=start)
        return GearCache(quant.concat(self.qk, qk), quant.concat(self.qv, qv),
                         self.k_res[:, :, count:].contiguous(), self.v_res[:, :, count:].contiguous(),
                         add_correction(self.k_terms, ck), add_correction(self.v_terms, cv))

    def keys_values(self) -> tuple[Tensor, Tensor]:
        if self.qk is None:
            return self.k_res, self.v_res
        k = apply_corrections(quant.dequantize(self.qk), self.k_terms)
        v = apply_corrections(quant.dequantize(self.qv), self.v_terms)
        return torch.cat([k, self.k_res], dim=2), torch.cat([v, self.v_res], dim=2)


def empty_cache(k: Tensor, v: Tensor) -> GearCache:
    return GearCache(None, None, k.contiguous(), v.contiguous())


def quantize_on_append(cache: GearCache, method: Method) -> GearCache:
    """Decode-time compression step (quantize + outliers + low rank of the oldest G)."""
    return kivi.quantize_on_append(cache, method)


def extend(q: Tensor, k_new: Tensor, v_new: Tensor, cache: GearCache | None, method: Method, last: bool = True):
    return kivi.extend(q, k_new, v_new, cache, method, last, new_cache=empty_cache)


def prefill(q: Tensor, k: Tensor, v: Tensor, method: Method, last: bool = True):
    return kivi.prefill(q, k, v, method, last, new_cache=empty_cache)


def decode(q: Tensor, k_new: Tensor, v_new: Tensor, cache: GearCache, method: Method):
    return kivi.decode(q, k_new, v_new, cache, method)
