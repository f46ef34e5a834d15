"""One object per method with the shared prefill/decode interface."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

import importlib

from rkvsim.models import Method, kinds, parse_method, spec_of


def module_for(kind: str):
    """The kernel module a kind's spec names (rkvsim.kernels.<spec.kernel>)."""
    name = spec_of(kind).kernel
    if name is None:
        raise ValueError(f"{kind} has no torch kernel (an engine's own KV type); methods with kernels: "
                         f"{', '.join(k for k in kinds() if spec_of(k).kernel)}")
    return importlib.import_module(f"rkvsim.kernels.{name}")


class _Modules(dict):
    """MODULES[kind]: the kind's kernel module, imported on first use."""

    def __missing__(self, kind: str):
        mod = self[kind] = module_for(kind)
        return mod


MODULES = _Modules()


@dataclass(frozen=True)
class Kernel:
    """Attention + KV cache of one method. q (B,Hq,n,d); k/v (B,Hkv,n,d); decode n=1. Returns
    (out (B,Hq,n,d), cache); caches expose num_tokens and nbytes.

    Chunked prefill: `prefill(first, last=False)` then `extend(chunk, cache, last=...)` per
    further chunk, last=True on the chunk that ends the prompt (where H2O and SnapKV select
    tokens). Each chunk's queries sit at the newest positions and attend causally over the
    cache plus the chunk; per-method cache rules are in each module's docstring.
    """
    method: Method

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, last: bool = True):
        return MODULES[self.method.kind].prefill(q, k, v, self.method, last=last)

    def extend(self, q: Tensor, k_new: Tensor, v_new: Tensor, cache, last: bool = True):
        return MODULES[self.method.kind].extend(q, k_new, v_new, cache, self.method, last=last)

    def decode(self, q: Tensor, k_new: Tensor, v_new: Tensor, cache):
        return MODULES[self.method.kind].decode(q, k_new, v_new, cache, self.method)


def make_kernel(method: Method | str) -> Kernel:
    """Kernel for a Method (or a label such as 'kivi-2', 'h2o-512')."""
    m = parse_method(method) if isinstance(method, str) else method
    module_for(m.kind)   # a kind without a kernel fails here, by name
    return Kernel(m)
