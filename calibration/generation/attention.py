"""Route a transformers model's attention through rkvsim's kernels.

The point of the length experiments is to measure OUR compression kernels, so
transformers' own KV cache is switched off (use_cache=False) and every attention layer
calls a function registered under ATTN_NAME in transformers' AttentionInterface. That
function receives the layer's post-RoPE q/k/v for the tokens of this forward call only,
and keeps one kernel cache per layer in a `KernelRun` (or one per batch row in a
`RunGroup`) passed down as the keyword argument `rkv_run` (transformers forwards unknown
keyword arguments of the model's forward to the attention function):
  * first call of a layer: kernel.prefill(q, k, v), causal inside the kernel;
  * later calls (one token each): kernel.decode(q, k_new, v_new, cache).
No mask function is registered for ATTN_NAME, so transformers builds no mask and passes
attention_mask=None: causality is the kernels' job (causal prefill; a single decode query
sees everything cached). That only holds for one unpadded sequence, hence batch 1.

RoPE is applied by the model at each token's true position before the kernel caches the
key, so eviction keeps original positions (no re-rotation inside the kept window).
q/k/v are cast to `kv_dtype` before the kernel; cache bytes and quantizer scales are in
that dtype. The default is fp32, not the paper's fp16: this CPU (AVX2) has no fp16
arithmetic, so fp16 attention runs 4-10x slower than fp32 here, while rounding K/V to
fp16 moves SmolLM2's logits by only about 0.05 (checked in tests/test_generation.py),
far below what 2-4 bit quantization or eviction does. float16 stays selectable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rkvsim.kernels import Kernel, make_kernel
from rkvsim.kernels.attention import sdpa
from rkvsim.models import Method

ATTN_NAME = "rkvsim_kernels"
DEFAULT_KV_DTYPE = torch.float32


@dataclass
class KernelRun:
    """The compressed KV cache of one request: one kernel cache per layer."""
    kernel: Kernel
    kv_dtype: torch.dtype = DEFAULT_KV_DTYPE
    caches: dict[int, object] = field(default_factory=dict)

    @classmethod
    def for_method(cls, method: Method | str, kv_dtype: torch.dtype = DEFAULT_KV_DTYPE) -> "KernelRun":
        return cls(make_kernel(method), kv_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' caches."""
        return sum(c.nbytes for c in self.caches.values())


@dataclass
class RunGroup:
    """Several requests of ONE prompt run together, one batch row each, so the model's dense
    layers read their weights once per step for all of them (batch 1 is memory-bound on a
    CPU). The kernels still see batch 1: each row keeps its own KernelRun.

    shared=True (prefill): the batch holds the prompt once; every run's kernel prefills its
    cache from the same q/k/v, and the layer output is exact causal attention, which is what
    every method computes on the prompt (compression acts only on what is cached).
    shared=False (decode): row i is runs[i]'s next token; a None run is an idle row (finished,
    or a config not needed) whose output is zero and whose token is ignored. Keeping idle rows
    keeps the batch size fixed, so a row's arithmetic never depends on when others finish.
    """
    runs: list[KernelRun | None]
    kv_dtype: torch.dtype = DEFAULT_KV_DTYPE
    shared: bool = True


def _group_attention(group: RunGroup, q, k, v, layer: int):
    if group.shared:
        if q.shape[0] != 1:
            raise ValueError("a shared prefill takes the prompt once (batch 1)")
        for run in group.runs:
            if run is not None:
                run.caches[layer] = run.kernel.prefill(q, k, v)[1]
        return sdpa(q, k, v, causal=True)
    if q.shape[0] != len(group.runs) or q.shape[2] != 1:
        raise ValueError(f"decode expects one token for each of {len(group.runs)} rows, got {tuple(q.shape)}")
    outs = []
    for i, run in enumerate(group.runs):
        if run is None:
            outs.append(torch.zeros_like(q[i:i + 1]))
            continue
        out, run.caches[layer] = run.kernel.decode(q[i:i + 1], k[i:i + 1], v[i:i + 1], run.caches[layer])
        outs.append(out)
    return torch.cat(outs)


def kernel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     rkv_run: KernelRun | RunGroup | None = None, **kwargs):
    """transformers attention function: (B,Hq,n,d) q and (B,Hkv,n,d) k/v -> ((B,n,Hq,d), None)."""
    if rkv_run is None:
        raise RuntimeError(f"attention '{ATTN_NAME}' needs the keyword argument rkv_run=KernelRun(...) "
                           "or RunGroup(...) in the model call")
    if attention_mask is not None:
        # A mask means padding or a custom pattern; the kernels cannot honour either.
        raise ValueError(f"attention '{ATTN_NAME}' takes no attention mask (batch 1, no padding)")
    d = query.shape[-1]
    if scaling is not None and abs(scaling - d ** -0.5) > 1e-6 * d ** -0.5:
        raise ValueError(f"the kernels scale by 1/sqrt(d); this model uses {scaling}")
    if isinstance(rkv_run, RunGroup):
        dt = rkv_run.kv_dtype
        out = _group_attention(rkv_run, query.to(dt), key.to(dt), value.to(dt), module.layer_idx)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    dt = rkv_run.kv_dtype
    q, k, v = query.to(dt), key.to(dt), value.to(dt)
    layer = module.layer_idx
    cache = rkv_run.caches.get(layer)
    if cache is None:
        out, cache = rkv_run.kernel.prefill(q, k, v)
    else:
        out, cache = rkv_run.kernel.decode(q, k, v, cache)
    rkv_run.caches[layer] = cache
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the kernel attention with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, kernel_attention)
    return ATTN_NAME


def use_kernels(model) -> None:
    """Switch a loaded model to the kernel attention."""
    register()
    model.set_attn_implementation(ATTN_NAME)


def use_eager(model) -> None:
    """transformers' reference attention (for checking the kernel path)."""
    model.set_attn_implementation("eager")
