"""KIVI's asymmetric group quantizer and the bit packing behind it.

Keys are quantized per channel (one scale/zero per channel per `group` tokens), values per
token (one scale/zero per token per `group` channels), as KIVI does: key outliers live in
fixed channels, value errors matter per token. Scales/zeros are stored in the K/V dtype and
the integer codes are bit-packed into uint8, so the bytes held are the bytes a real engine
would hold (see rkvsim.models.kv_bytes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes < 2**bits along the last dim -> 8//bits codes per byte (little end first)."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"last dim {codes.shape[-1]} not a multiple of {per}")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    return (c << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """Inverse of pack_bits."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(*packed.shape[:-1], -1)


@dataclass
class QTensor:
    """A quantized (B,H,n,d) K or V block; tokens are stored row-major, so blocks quantized
    at different times concatenate byte-wise (n*d*bits is always a multiple of 8 because n
    is a multiple of the group size)."""
    packed: Tensor       # (B,H,n*d*bits/8) uint8
    scale: Tensor        # keys (B,H,n/G,d); values (B,H,n,ceil(d/G)); K/V dtype
    zero: Tensor         # same shape and dtype as scale
    bits: int
    group: int
    head_dim: int
    per_channel: bool    # True for keys

    @property
    def num_tokens(self) -> int:
        return self.packed.shape[-1] * 8 // (self.bits * self.head_dim)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


def _minmax_codes(x: Tensor, dim: int, bits: int, dtype: torch.dtype):
    """Asymmetric min/max quantization of float32 x along `dim`. The codes are computed with
    the scale/zero as rounded to the storage dtype, so dequantization sees what we stored."""
    levels = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / levels).to(dtype)
    zero = lo.to(dtype)
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((x - zero.float()) / s).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def quantize_keys(x: Tensor, bits: int, group: int) -> QTensor:
    """Per-channel quantization of keys x (B,H,n,d), n a multiple of `group`."""
    b, h, n, d = x.shape
    if n % group:
        raise ValueError(f"key block of {n} tokens is not a multiple of group {group}")
    xg = x.float().reshape(b, h, n // group, group, d)
    codes, scale, zero = _minmax_codes(xg, dim=3, bits=bits, dtype=x.dtype)
    return QTensor(pack_bits(codes.reshape(b, h, n * d), bits), scale.squeeze(3), zero.squeeze(3),
                   bits, group, d, per_channel=True)


def quantize_values(x: Tensor, bits: int, group: int) -> QTensor:
    """Per-token quantization of values x (B,H,n,d) in groups of `group` channels; a
    partial last group is padded by repeating its last channel, which leaves its min/max
    unchanged, and the padding codes are dropped."""
    b, h, n, d = x.shape
    ng = math.ceil(d / group)
    xf = x.float()
    pad = ng * group - d
    if pad:
        xf = torch.cat([xf, xf[..., -1:].expand(b, h, n, pad)], dim=-1)
    codes, scale, zero = _minmax_codes(xf.reshape(b, h, n, ng, group), dim=4, bits=bits, dtype=x.dtype)
    codes = codes.reshape(b, h, n, ng * group)[..., :d]
    return QTensor(pack_bits(codes.reshape(b, h, n * d), bits), scale.squeeze(4), zero.squeeze(4),
                   bits, group, d, per_channel=False)


def dequantize(qt: QTensor) -> Tensor:
    """(B,H,n,d) in the scale dtype."""
    b, h = qt.packed.shape[:2]
    n, d, g = qt.num_tokens, qt.head_dim, qt.group
    codes = unpack_bits(qt.packed, qt.bits).reshape(b, h, n, d).to(qt.scale.dtype)
    if qt.per_channel:
        c = codes.reshape(b, h, n // g, g, d)
        return (c * qt.scale.unsqueeze(3) + qt.zero.unsqueeze(3)).reshape(b, h, n, d)
    ng = qt.scale.shape[-1]
    if ng * g != d:  # partial last channel group: pad codes, drop the padding afterwards
        codes = torch.cat([codes, codes.new_zeros(b, h, n, ng * g - d)], dim=-1)
    x = codes.view(b, h, n, ng, g) * qt.scale.unsqueeze(-1) + qt.zero.unsqueeze(-1)
    return x.reshape(b, h, n, ng * g)[..., :d]


def concat(a: QTensor | None, b: QTensor) -> QTensor:
    """Older block `a` followed by newer block `b` (same quantizer settings)."""
    if a is None:
        return b
    dim = 2
    return QTensor(torch.cat([a.packed, b.packed], dim=-1), torch.cat([a.scale, b.scale], dim=dim),
                   torch.cat([a.zero, b.zero], dim=dim), a.bits, a.group, a.head_dim, a.per_channel)
