"""The two ways the kernels attend: fused SDPA (no probabilities) and an explicit
matmul + softmax pass that also returns per-key attention mass (H2O, SnapKV need it)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """Fused attention with grouped-query heads; never expands K/V in memory.

    `causal`: the n queries are the LAST n of the L keys (a prompt, or a prompt chunk over
    a cache), so query i sees keys up to L - n + i. Decode passes causal=False because its
    single query sees all.
    """
    gqa = q.shape[1] != k.shape[1]
    n, length = q.shape[2], k.shape[2]
    if not causal or n == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if n == length:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # SDPA's is_causal aligns the mask top-left, wrong for a chunk after cached tokens;
    # an explicit bottom-right mask costs a (n, L) bool tensor and the fused fast path.
    mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def group_queries(q: Tensor, kv_heads: int) -> Tensor:
    """(B,Hq,n,d) -> (B,Hkv,g,n,d): query head h uses KV head h // g (same rule as SDPA's GQA)."""
    b, hq, n, d = q.shape
    return q.view(b, kv_heads, hq // kv_heads, n, d)


def attention_with_mass(q: Tensor, k: Tensor, v: Tensor | None, q_offset: int | None = None,
                        chunk: int = 1024) -> tuple[Tensor | None, Tensor]:
    """Explicit softmax attention returning (out, mass).

    mass (B,Hkv,L) fp32: attention probability each key received, summed over all queries
    and over the query heads sharing that KV head. `q_offset` is the position of the first
    query among the keys for a causal mask (None: no mask). Queries are processed in chunks
    so the probability matrix never exceeds chunk x L per head. v=None skips the output
    (out is then None) when only the mass is wanted.
    """
    b, hkv, length, d = k.shape
    qg = group_queries(q, hkv)
    n = qg.shape[3]
    scale = 1.0 / math.sqrt(d)
    kt = k.unsqueeze(2).transpose(-1, -2)   # (B,Hkv,1,d,L), broadcast over the group
    vv = None if v is None else v.unsqueeze(2)
    mass = torch.zeros(b, hkv, length, dtype=torch.float32, device=k.device)
    outs = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        # Causally, queries s..e-1 see keys only up to q_offset + e - 1; skip the rest.
        seen = length if q_offset is None else q_offset + e
        logits = (qg[:, :, :, s:e] @ kt[..., :seen]).float() * scale
        if q_offset is not None:
            rows = torch.arange(q_offset + s, q_offset + e, device=k.device).unsqueeze(-1)
            cols = torch.arange(seen, device=k.device)
            logits = logits.masked_fill(cols > rows, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        mass[..., :seen] += probs.sum(dim=(2, 3))
        if vv is not None:
            outs.append(probs.to(vv.dtype) @ vv[:, :, :, :seen])
    if vv is None:
        return None, mass
    return torch.cat(outs, dim=3).reshape(b, q.shape[1], n, d), mass
