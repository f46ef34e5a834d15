"""Attention prefill and decode tasks, one per method x configuration, through rkvsim.kernels.

Inputs are random: timing does not depend on values except where a method selects tokens,
and there any selection costs the same work. Decode rows time a step that triggers no
quantization event (after a prefill the residual window holds residual..residual+G-1
tokens, one more never reaches residual+G); the per-event cost is the compression table's
`quantize_on_append`, to be amortised over G steps.

Prefill rows with kv_len > 0 time the chunk that ENDS a prompt of kv_len + new_tokens
tokens: the first kv_len were prefilled untimed with last=False, then `extend(..., last=True)`
is timed. So they include any quantization event the chunk triggers, and for H2O / SnapKV
the prompt-end selection; a middle chunk of those methods costs the row minus the
compression table's `evict` / `select` at kv_len = kv_len + new_tokens.
"""
from __future__ import annotations

from typing import Callable

from rkvsim.models import Method, ModelSpec

from rkvsim.profiler.grids import AttentionHeads, Grid
from rkvsim.profiler.schema import ATTENTION
from rkvsim.profiler.tasks import Context, Task
from rkvsim.profiler.timing import measure


def default_kernel_factory() -> Callable[[Method], object]:
    from rkvsim.kernels import make_kernel
    return make_kernel


def _measure_step(step: Callable[[], object], ctx: Context) -> dict:
    """Time `step` (returns (out, cache)); report the cache the last call produced."""
    held = {}

    def fn():
        held["cache"] = step()[1]

    row = measure(fn, ctx.policy, ctx.device).as_row()
    cache = held["cache"]
    row.update(cache_tokens=int(cache.num_tokens), cache_nbytes=int(cache.nbytes))
    return row


def _qkv(batch: int, n: int, heads: AttentionHeads, d: int, ctx: Context):
    return (ctx.randn(batch, heads.num_q_heads, n, d), ctx.randn(batch, heads.num_kv_heads, n, d),
            ctx.randn(batch, heads.num_kv_heads, n, d))


def _measure_on(step: Callable[[], object], base, what: str, ctx: Context) -> dict:
    """Time a step that starts from cache `base` on every repeat."""
    before = base.num_tokens
    row = _measure_step(step, ctx)
    # Every repeat must time the same step from the same cache; a kernel that grew its
    # input cache in place would make later repeats time a longer context.
    if base.num_tokens != before:
        raise RuntimeError(f"{what} modified its input cache in place; repeated timing would drift")
    return row


def _prefill_run(kernel, batch: int, kv_len: int, n: int, heads: AttentionHeads, d: int, ctx: Context):
    def run() -> dict:
        q, k, v = _qkv(batch, n, heads, d, ctx)
        if kv_len == 0:
            return _measure_step(lambda: kernel.prefill(q, k, v), ctx)
        # The first kv_len prompt tokens, prefilled by the method as a prompt still open.
        _, base = kernel.prefill(*_qkv(batch, kv_len, heads, d, ctx), last=False)
        return _measure_on(lambda: kernel.extend(q, k, v, base, last=True), base, f"{kernel!r}.extend", ctx)
    return run


def _decode_run(kernel, batch: int, kv_len: int, heads: AttentionHeads, d: int, ctx: Context):
    def run() -> dict:
        # The cache a request has after a kv_len-token prompt, built by the method itself.
        _, base = kernel.prefill(*_qkv(batch, kv_len, heads, d, ctx))
        q, k, v = _qkv(batch, 1, heads, d, ctx)
        return _measure_on(lambda: kernel.decode(q, k, v, base), base, f"{kernel!r}.decode", ctx)
    return run


def attention_tasks(model: ModelSpec, methods: list[Method], grid: Grid, heads: AttentionHeads,
                    ctx: Context, kernel_factory: Callable[[Method], object]) -> list[Task]:
    d = model.head_dim
    tasks = []
    for method in methods:
        kernel = kernel_factory(method)
        base = {"method": method.label, "kind": method.kind, "tp": 1, "num_q_heads": heads.num_q_heads,
                "num_kv_heads": heads.num_kv_heads, "head_dim": d, "dtype": ctx.dtype_name,
                "overhead_s_median": None, "source": "rkvprof-collect"}
        for b in grid.prefill_batch_sizes:
            for kv, n in grid.prefill_points():
                row = {**base, "stage": "prefill", "batch_size": b, "kv_len": kv, "new_tokens": n}
                tasks.append(Task(ATTENTION, row, _prefill_run(kernel, b, kv, n, heads, d, ctx),
                                  f"{method.label} prefill b={b} kv={kv} n={n}"))
        for b in grid.decode_batch_sizes:
            for kv in grid.decode_kv_lens:
                row = {**base, "stage": "decode", "batch_size": b, "kv_len": kv, "new_tokens": 1}
                tasks.append(Task(ATTENTION, row, _decode_run(kernel, b, kv, heads, d, ctx),
                                  f"{method.label} decode b={b} kv={kv}"))
    return tasks
