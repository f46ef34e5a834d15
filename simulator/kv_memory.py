"""How many KV blocks a replica has and how many a request needs, per method.

A block is `block_size` token slots at the method's marginal bytes per token, so a
quantized cache packs more tokens into the same memory. The method's fixed overhead
(KIVI/GEAR full-precision residual window, GEAR's prefill terms) is reserved per request
at its worst point. All numbers come from rkvsim.models.kv_bytes, the formula the kernels'
cache.nbytes is tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rkvsim.models import HardwareSpec, Method, ModelSpec, cached_tokens_vec, kv_bytes_per_token, kv_fixed_overhead
from rkvsim.simulator.lookup import Tabulated


def activation_reserve_bytes(model: ModelSpec, max_batched_tokens: int, max_batch_size: int, tp: int) -> float:
    """Peak activation memory of one step: hidden states, QKV, MLP intermediates and logits.
    Sized for the largest step the scheduler may form (vLLM profiles the same peak)."""
    per_token = 4 * model.hidden_size + 2 * model.intermediate_size // tp + (model.q_size + 2 * model.kv_size) // tp
    return max_batched_tokens * per_token * 2 + max_batch_size * model.vocab_size * 4


@dataclass(frozen=True)
class KVLayout:
    method: Method
    block_size: int
    block_bytes: float
    num_blocks: int
    overhead_blocks: float   # fractional blocks every request carries on top of its tokens (reserved mode)
    capacity_bytes: float
    weight_bytes_per_rank: float
    # exact: a request holds ceil(its bytes / block bytes), its full-precision residual at its actual
    # length (vllm-v1, lmdeploy); False: tokens + the worst-case residual reserved (vllm-v0's numbers).
    exact: bool = False
    whole_windows: bool = True      # exact mode: a sliding window frees whole blocks only
    bytes_scale: int = 1            # layers x KV heads per rank: per-head bytes -> bytes on the rank
    head_dim: int = 128
    dtype_bytes: int = 2
    model_window: int | None = None  # the model's own sliding window (Mistral v0.1: 4096)

    def __post_init__(self):
        # Precomputed once: the decode step asks for blocks every iteration.
        spec = self.method.spec
        # window: (sink, recent) tokens kept by a sliding window (the method's, else the model's), or None.
        win = spec.window(self.method) if spec.window is not None else (
            (0, self.model_window) if self.model_window is not None else None)
        object.__setattr__(self, "window", win)
        # A whole-block window frees blocks from this index on (the sink's blocks stay).
        object.__setattr__(self, "sink_blocks", -(-win[0] // self.block_size) if win else 0)
        object.__setattr__(self, "_plain", win is None and spec.quantized_tokens is None
                           and spec.token_cap is None and spec.prompt_budget is None)
        # Whether a request holds exactly ceil(context / block_size) blocks (its prefill and each
        # decode step): then a decode step's growth is the requests whose context is a multiple
        # of block_size, which the replica counts without the columns (Replica._cross).
        object.__setattr__(self, "ceil_blocks", self.exact and self._plain)
        # Whether a decoding request's blocks can ever fall from one step to the next: a window
        # moving on, a quantizer's residual folding into packed groups. Without either, what a
        # request holds only grows (capped eviction holds at its cap), so the per-step shrink
        # checks are skipped (tests/test_models.py checks the claim over every method).
        object.__setattr__(self, "decode_shrinks", win is not None or spec.quantized_tokens is not None)
        # A quantizer whose bytes split into a part of the context and a part of the prompt
        # (spec.bytes_parts) is looked up in tables of both, grown on demand: one step asks for
        # every decode's blocks, and the formula is a dozen array operations. Where the blocks
        # depend on the context alone (no eviction by prompt; a window; a quantizer without a
        # prompt part), the blocks themselves are tabulated by context.
        parts = spec.bytes_parts if win is None and spec.quantized_tokens is not None else None
        object.__setattr__(self, "_parts", parts)
        object.__setattr__(self, "_by_ctx", self._plain or win is not None or (parts is not None and parts[1] is None))
        object.__setattr__(self, "_tabs", {})

    def blocks_for(self, cached_tokens: int) -> int:
        if cached_tokens <= 0:
            return 0
        return math.ceil(cached_tokens / self.block_size + self.overhead_blocks)

    def blocks_for_vec(self, cached_tokens: np.ndarray) -> np.ndarray:
        return np.ceil(cached_tokens / self.block_size + self.overhead_blocks).astype(np.int64)

    # ---- what a request holds, by policy ------------------------------------------------
    def _exact_vec(self, prompt, ctx, prefill: bool) -> np.ndarray:
        if self._by_ctx:
            return self._tabled("blocks", ctx, lambda at: self._formula(at, at, False))  # prefill: the same here
        return self._formula(prompt, ctx, prefill)

    def _tabled(self, name: str, at, make) -> np.ndarray:
        """make(0..n-1)[at], one table per name (simulator/lookup.py)."""
        tab = self._tabs.get(name)
        if tab is None:
            tab = self._tabs[name] = Tabulated(make, np.int64, 1024)
        return tab(at)

    def _formula(self, prompt, ctx, prefill: bool) -> np.ndarray:
        B = self.block_size
        if self._plain:
            return -(-np.asarray(ctx, np.int64) // B)
        m, spec = self.method, self.method.spec
        prompt = np.asarray(prompt, np.int64)
        ctx = np.asarray(ctx, np.int64)
        win = self.window
        if win is not None:
            sink, recent = win
            if self.whole_windows:
                # Blocks wholly before the window are freed (vLLM's sliding-window manager); the
                # sink's blocks stay. -(-x // B) is ceil(x / B).
                first = np.maximum(ctx - recent, 0) // B
                return -(-ctx // B) - np.maximum(0, first - self.sink_blocks)
            return -(-np.minimum(ctx, sink + recent) // B)
        if spec.quantized_tokens is not None:
            p = ctx if prefill else prompt
            if self._parts is not None:
                # The same integers as bytes_per_head (F + P exactly), so the same blocks.
                of_total, of_prompt = self._parts
                f = self._tabled("of_total", ctx, lambda at: of_total(m, self.head_dim, at, self.dtype_bytes))
                if of_prompt is not None:
                    f = f + self._tabled("of_prompt", p, lambda at: of_prompt(m, self.head_dim, at, self.dtype_bytes))
                b = self.bytes_scale * f
            else:
                b = self.bytes_scale * spec.bytes_per_head(m, self.head_dim, p, ctx, self.dtype_bytes)
            return np.ceil(b / self.block_bytes).astype(np.int64)
        if prefill:
            return -(-ctx // B)         # H2O and SnapKV select when the prompt ends
        return -(-cached_tokens_vec(m, prompt, ctx) // B)

    def prefill_blocks(self, tokens: int) -> int:
        """Blocks a request holds once `tokens` of its prompt (or recomputed context) are in."""
        if not self.exact:
            return self.blocks_for(tokens)
        if tokens <= 0:
            return 0
        # (plain: _formula's ceil without a numpy call, for one request)
        return -(-int(tokens) // self.block_size) if self._plain else int(self._exact_vec(tokens, tokens, prefill=True))

    def prefill_blocks_vec(self, tokens: np.ndarray) -> np.ndarray:
        if not self.exact:
            return self.blocks_for_vec(tokens)
        return np.where(tokens > 0, self._exact_vec(tokens, tokens, prefill=True), 0)

    def decode_blocks(self, prompt: int, ctx: int) -> int:
        """Blocks once the prompt is attended (eviction done) at context `ctx`."""
        if not self.exact:
            return self.blocks_for(self.method.cached_tokens(prompt, ctx))
        return -(-int(ctx) // self.block_size) if self._plain else int(self._exact_vec(prompt, ctx, prefill=False))

    def decode_blocks_vec(self, prompt: np.ndarray, ctx: np.ndarray) -> np.ndarray:
        if not self.exact:
            return self.blocks_for_vec(cached_tokens_vec(self.method, prompt, ctx))
        return self._exact_vec(prompt, ctx, prefill=False)

    def peak_blocks_vec(self, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
        """Most blocks each request ever holds: reserved mode, its whole prompt + output (the
        admission rule vllm-v0 had); exact mode, the larger of its prefill and its decode peak,
        so that an evicting cache is held to its cap."""
        prompt = np.asarray(prompt, np.int64)
        total = prompt + np.asarray(output, np.int64)
        if not self.exact:
            return self.blocks_for_vec(total)
        peak = np.maximum(self._exact_vec(prompt, prompt, prefill=True), self._exact_vec(prompt, total, prefill=False))
        spec, m, B = self.method.spec, self.method, self.block_size
        if self.window is None and "residual" in spec.settings:
            # The residual is fullest just before it folds a group into packed form: the last
            # such context at or below the end (residual + G - 1 full-precision tokens).
            r, g = m.residual, m.group_size
            last = total - (total - r - (g - 1)) % g
            ok = (last >= prompt) & (last >= r + g - 1)
            peak = np.maximum(peak, np.where(ok, self._exact_vec(prompt, np.maximum(last, prompt), prefill=False), 0))
        if self.window is not None and self.whole_windows:
            recent = self.window[1]
            # `recent` consecutive tokens span at most ceil((recent - 1) / B) + 1 blocks.
            span = self.sink_blocks + (-(-(recent - 1) // B) + 1 if recent > 0 else 0)
            peak = np.maximum(peak, np.minimum(span, -(-total // B)))
        return peak

    def peak_blocks(self, prompt: int, output: int) -> int:
        """peak_blocks_vec for one request."""
        return int(self.peak_blocks_vec(np.array([prompt]), np.array([output]))[0])


class DoesNotFitError(ValueError):
    pass


def kv_layout(model: ModelSpec, hw: HardwareSpec, method: Method, tp: int, block_size: int,
              gpu_memory_utilization: float, max_batched_tokens: int, max_batch_size: int,
              exact: bool = False, whole_windows: bool = True) -> KVLayout:
    weights = model.weight_bytes / tp
    reserve = activation_reserve_bytes(model, max_batched_tokens, max_batch_size, tp)
    capacity = hw.memory_bytes * gpu_memory_utilization - weights - reserve
    if capacity <= 0:
        need = (weights + reserve) / gpu_memory_utilization / 1e9
        raise DoesNotFitError(
            f"model: {model.name} needs {weights / 1e9:.1f} GB of weights + {reserve / 1e9:.1f} GB activations per GPU "
            f"but {hw.name} has {hw.memory_bytes / 1e9:.0f} GB ({need:.0f} GB needed at this utilization); "
            "raise tp, lower scheduler.max_batched_tokens or pick larger hardware")
    per_token = kv_bytes_per_token(model, method, tp)
    block_bytes = per_token * block_size
    num_blocks = int(capacity // block_bytes)
    overhead = kv_fixed_overhead(model, method, tp) / block_bytes
    if num_blocks < math.ceil(1 + overhead):
        raise DoesNotFitError(f"hardware: {hw.name} leaves room for no KV block of {model.name}; raise tp or pick larger hardware")
    if exact:
        overhead = 0.0
    return KVLayout(method, block_size, block_bytes, num_blocks, overhead, capacity, weights, exact, whole_windows,
                    model.num_layers * max(1, model.num_kv_heads // tp), model.head_dim, 2,
                    model.sliding_window if exact else None)
