"""Compression-side steps timed alone, through the functions rkvsim.kernels exposes for it.

Per method (num_tokens = tokens the step works on, kv_len = tokens in the cache it sees):
- kivi/gear `quantize_segment` / `compress_segment`: the prefill-time block (K and V) a
  whole prompt or a chunk moves out of the residual window (kv_len 0: the block's cost does
  not depend on the past); gear `low_rank`: its low-rank factorisation alone (one K-shaped
  residual);
- kivi/gear `quantize_on_append`: the decode-time event moving the oldest G tokens out of
  the residual window (once every G decode steps), on a cache of kv_len tokens;
- kivi `dequantize_cache`, gear `reconstruct`: materialising K/V from the compressed cache,
  which attention repeats every decode step;
- h2o `update_scores`, h2o/streamingllm `evict`: decode-time (cache one over budget) and
  prefill-time (a prompt's last chunk, on all kv_len + new_tokens prompt tokens) eviction;
- snapkv `select`: the prefill-time vote + pooling + top-k, at every prompt length a
  prefill row ends.
fp16 has no compression step.
"""
from __future__ import annotations

from typing import Callable

import torch

from rkvsim.models import EVICTING, Method, ModelSpec, quantized_tokens

from rkvsim.profiler.grids import AttentionHeads, Grid
from rkvsim.profiler.schema import COMPRESSION
from rkvsim.profiler.tasks import Context, Task, timed

Build = Callable[[], Callable[[], object]]  # makes inputs, returns the callable to time


def _kernels():
    from rkvsim import kernels
    return kernels


def _module(m: Method):
    """The method's own kernel module (its spec names it)."""
    from rkvsim.kernels.factory import module_for
    return module_for(m.kind)


def _quantizer_cases(m: Method, grid: Grid, h: AttentionHeads, d: int, ctx: Context):
    corrected = m.spec.corrections is not None    # GEAR: low-rank + outliers on top of the quantizer
    mod = _module(m)
    hkv = h.num_kv_heads

    def segment(b: int, n_q: int) -> Build:
        def build():
            k, v = ctx.randn(b, hkv, n_q, d), ctx.randn(b, hkv, n_q, d)
            if corrected:
                return lambda: (mod.compress_segment(k, m, keys=True), mod.compress_segment(v, m, keys=False))
            return lambda: mod.quantize_segment(k, v, m)
        return build

    def low_rank(b: int, n_q: int) -> Build:
        def build():
            residual = torch.randn(b, hkv, n_q, d, device=ctx.device, dtype=torch.float32) * 0.01
            rank = mod.segment_rank(m, n_q, d)
            return lambda: mod.low_rank(residual, rank)
        return build

    def cache_at(b: int, kv_len: int):
        # What prefill leaves (minus its attention): the oldest tokens quantized, the rest
        # in the residual window.
        k, v = ctx.randn(b, hkv, kv_len, d), ctx.randn(b, hkv, kv_len, d)
        return mod.empty_cache(k, v).quantize_oldest(m, quantized_tokens(m, kv_len))

    def on_append(b: int, kv_len: int) -> Build:
        def build():
            cache = cache_at(b, kv_len)
            # Fill the window to residual + G so the next call performs the quantization event.
            while cache.k_res.shape[2] < m.residual + m.group_size:
                cache = cache.appended(ctx.randn(b, hkv, 1, d), ctx.randn(b, hkv, 1, d))
            return lambda: mod.quantize_on_append(cache, m)
        return build

    def materialise(b: int, kv_len: int) -> Build:
        def build():
            cache = cache_at(b, kv_len)
            return lambda: cache.keys_values()
        return build

    seg_op = "compress_segment" if corrected else "quantize_segment"
    for b in grid.prefill_batch_sizes:
        for kv, n in grid.prefill_points():
            n_q = quantized_tokens(m, kv + n) - quantized_tokens(m, kv)
            if n_q:
                yield seg_op, b, 0, n_q, segment(b, n_q)
                if corrected:
                    yield "low_rank", b, 0, n_q, low_rank(b, n_q)
    for b in grid.decode_batch_sizes:
        for kv in grid.decode_kv_lens:
            yield "quantize_on_append", b, kv, m.group_size, on_append(b, kv)
            if quantized_tokens(m, kv):
                yield ("reconstruct" if corrected else "dequantize_cache"), b, kv, kv, materialise(b, kv)


def _eviction_cases(m: Method, grid: Grid, h: AttentionHeads, d: int, ctx: Context):
    kn = _kernels()
    hkv = h.num_kv_heads
    cap = m.token_cap

    def cache_of(b: int, n: int):
        k, v = ctx.randn(b, hkv, n, d), ctx.randn(b, hkv, n, d)
        pos = kn.common.token_positions(b, hkv, 0, n, ctx.device)
        if m.spec.attention_scores:
            scores = torch.rand(b, hkv, n, device=ctx.device, dtype=torch.float32)
            return kn.h2o.H2OCache(k, v, pos, n, scores=scores)
        return kn.evicted.EvictedCache(k, v, pos, n)

    def evict(b: int, n: int) -> Build:
        def build():
            cache = cache_of(b, n)
            mod = _module(m)
            return lambda: mod.evict(cache, m)
        return build

    def update(b: int, n: int) -> Build:
        def build():
            scores = torch.rand(b, hkv, n, device=ctx.device, dtype=torch.float32)
            mass = torch.rand(b, hkv, n, device=ctx.device, dtype=torch.float32)
            return lambda: kn.h2o.update_scores(scores, mass)
        return build

    seen = set()
    for b in grid.decode_batch_sizes:          # decode: one token over the budget
        seen.add((b, cap + 1))
        yield "evict", b, cap + 1, cap + 1, evict(b, cap + 1)
        if m.spec.attention_scores:
            yield "update_scores", b, cap + 1, cap + 1, update(b, cap + 1)
    for b in grid.prefill_batch_sizes:         # prefill: a prompt over the budget
        for n in _prompt_lengths(grid):
            if n > cap and (b, n) not in seen:
                yield "evict", b, n, n, evict(b, n)


def _prompt_lengths(grid: Grid) -> list[int]:
    """Prompt lengths at which a prefill row's last chunk ends (where selection runs)."""
    return sorted({kv + n for kv, n in grid.prefill_points()})


def _snapkv_cases(m: Method, grid: Grid, h: AttentionHeads, d: int, ctx: Context):
    kn = _kernels()

    def select(b: int, n: int) -> Build:
        def build():
            q = ctx.randn(b, h.num_q_heads, n, d)
            k = ctx.randn(b, h.num_kv_heads, n, d)
            return lambda: kn.snapkv.select(q, k, m)
        return build

    for b in grid.prefill_batch_sizes:
        for n in _prompt_lengths(grid):
            if n > m.budget:
                yield "select", b, n, n, select(b, n)


def _cases(m: Method, grid: Grid, h: AttentionHeads, d: int, ctx: Context):
    s = m.spec
    # Group quantizers launch their own quantize kernels; a quantizer fused into the cache
    # write (FP8) has no compression step of its own to time.
    if s.quantized_tokens is not None and s.quantize_launches:
        return _quantizer_cases(m, grid, h, d, ctx)
    if s.family == EVICTING:
        return _eviction_cases(m, grid, h, d, ctx)
    if s.prompt_vote:
        return _snapkv_cases(m, grid, h, d, ctx)
    return iter(())


def compression_tasks(model: ModelSpec, methods: list[Method], grid: Grid, heads: AttentionHeads,
                      ctx: Context) -> list[Task]:
    tasks = []
    for m in methods:
        base = {"method": m.label, "kind": m.kind, "tp": 1, "num_kv_heads": heads.num_kv_heads,
                "num_q_heads": heads.num_q_heads, "head_dim": model.head_dim, "dtype": ctx.dtype_name,
                "source": "rkvprof-collect"}
        for op, b, kv, n, build in _cases(m, grid, heads, model.head_dim, ctx):
            row = {**base, "op": op, "batch_size": b, "kv_len": kv, "num_tokens": n}
            tasks.append(Task(COMPRESSION, row, lambda build=build: timed(build(), ctx),
                              f"{m.label} {op} b={b} kv={kv} n={n}"))
    return tasks
