"""The cache shape shared by the eviction methods: a subset of tokens, per (sequence, KV
head), in full precision, in original positional order."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rkvsim.kernels.common import gather_tokens, tensor_bytes, token_positions


@dataclass
class EvictedCache:
    k: Tensor           # (B,Hkv,n,d)
    v: Tensor
    # Original position of every kept token (B,Hkv,n) int64. Bookkeeping for tests and
    # profiling only, NOT counted in nbytes: a real engine knows it from its page table.
    positions: Tensor
    seen: int           # tokens processed so far (next token's position)

    @property
    def num_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v)

    def appended(self, k_new: Tensor, v_new: Tensor, **extra: Tensor) -> "EvictedCache":
        """Add decode tokens at the end; `extra` names further per-token tensors to extend."""
        b, h, n = k_new.shape[:3]
        pos = torch.arange(self.seen, self.seen + n, device=k_new.device).expand(b, h, n)
        grown = {name: torch.cat([getattr(self, name), t], dim=2) for name, t in extra.items()}
        return replace(self, k=torch.cat([self.k, k_new], dim=2), v=torch.cat([self.v, v_new], dim=2),
                       positions=torch.cat([self.positions, pos], dim=2), seen=self.seen + n, **grown)

    def kept(self, idx: Tensor, *per_token: str) -> "EvictedCache":
        """Keep slots idx (B,Hkv,m), which must be ascending so positional order survives;
        `per_token` names further per-token tensors to gather alongside K/V."""
        fields = {name: gather_tokens(getattr(self, name), idx) for name in ("k", "v", "positions") + per_token}
        return replace(self, **fields)

    @classmethod
    def start(cls, k: Tensor, v: Tensor, **extra) -> "EvictedCache":
        """The cache of a prompt's first tokens (positions 0..n-1), before any eviction."""
        b, h, n = k.shape[:3]
        return cls(k.contiguous(), v.contiguous(), token_positions(b, h, 0, n, k.device), n, **extra)
