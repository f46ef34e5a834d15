"""Small helpers every kernel module shares: shape checks, byte counting, token gathers."""
from __future__ import annotations

import torch
from torch import Tensor


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Fail early on the shape mistakes that would otherwise broadcast silently."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B,Hq,n,d) and k/v (B,Hkv,n,d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, _, d = q.shape
    if k.shape[0] != b or k.shape[-1] != d or hq % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not form grouped-query attention")


def check_decode(q: Tensor, k_new: Tensor, v_new: Tensor) -> None:
    """Decode appends exactly one token: the kernels attend without a mask there."""
    check_qkv(q, k_new, v_new)
    if q.shape[2] != 1 or k_new.shape[2] != 1:
        raise ValueError(f"decode takes one token per sequence, got q {tuple(q.shape)}, k {tuple(k_new.shape)}")


def check_chunk(q: Tensor, k_new: Tensor, v_new: Tensor) -> None:
    """A prefill chunk: c >= 1 new tokens, one query per new key."""
    check_qkv(q, k_new, v_new)
    if q.shape[2] != k_new.shape[2] or k_new.shape[2] < 1:
        raise ValueError(f"a chunk needs one query per new token (c >= 1), got q {tuple(q.shape)}, "
                         f"k {tuple(k_new.shape)}")


def append_tokens(past: Tensor | None, new: Tensor) -> Tensor:
    """past followed by new along the token dim; no copy when there is no past."""
    if past is None or past.shape[2] == 0:
        return new.contiguous()
    return torch.cat([past, new], dim=2)


def last_tokens(x: Tensor, n: int) -> Tensor:
    """The newest n tokens (all of them when fewer are there)."""
    return x[:, :, max(0, x.shape[2] - n):]


def tensor_bytes(*tensors: Tensor | None) -> int:
    """Bytes the given tensors' elements occupy (None entries skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Pick tokens per (batch, head): x (B,H,L,...) and idx (B,H,n) -> (B,H,n,...)."""
    shape = idx.shape + x.shape[3:]
    view = idx.reshape(idx.shape + (1,) * (x.dim() - 3)).expand(shape)
    return torch.gather(x, 2, view)


def token_positions(batch: int, heads: int, start: int, stop: int, device) -> Tensor:
    """Original positions start..stop-1 for every (batch, head), as int64 (B,H,n)."""
    return torch.arange(start, stop, device=device).expand(batch, heads, stop - start).clone()
