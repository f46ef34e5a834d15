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

from rkvsim.models import HardwareSpec, Method, ModelSpec, kv_bytes_per_token, kv_fixed_overhead


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
    overhead_blocks: float   # fractional blocks every request carries on top of its tokens
    capacity_bytes: float
    weight_bytes_per_rank: float

    def blocks_for(self, cached_tokens: int) -> int:
        if cached_tokens <= 0:
            return 0
        return math.ceil(cached_tokens / self.block_size + self.overhead_blocks)

    def blocks_for_vec(self, cached_tokens: np.ndarray) -> np.ndarray:
        return np.ceil(cached_tokens / self.block_size + self.overhead_blocks).astype(np.int64)

    def peak_blocks(self, prompt: int, output: int) -> int:
        """Most blocks a request ever holds: the whole prompt during prefill (eviction runs
        after the prompt is attended), then its cached tokens while decoding."""
        end = self.method.cached_tokens(prompt, prompt + output)
        return self.blocks_for(max(prompt, end))


class DoesNotFitError(ValueError):
    pass


def kv_layout(model: ModelSpec, hw: HardwareSpec, method: Method, tp: int, block_size: int,
              gpu_memory_utilization: float, max_batched_tokens: int, max_batch_size: int) -> KVLayout:
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
    return KVLayout(method, block_size, block_bytes, num_blocks, overhead, capacity, weights)
