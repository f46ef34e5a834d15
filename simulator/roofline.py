"""Roofline building blocks for the step-cost prior: stated efficiencies, one operator's
time, and KV-cache arithmetic vectorised over a batch of requests.

Nothing here is fitted. Every constant is a stated prior that a profile (calibration/)
replaces; results that use it say "roofline-prior (uncalibrated)".

The KV arithmetic mirrors models/kv_bytes.py (the single source of truth) term by term so
that the cost model can evaluate a whole batch with a handful of numpy operations;
tests/test_cost_model.py checks it against models.kv_bytes exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from rkvsim.models import HardwareSpec, Method, cached_tokens_vec
from rkvsim.models.kv_bytes import INDEX_BYTES, SCORE_BYTES


@dataclass(frozen=True)
class RooflineEfficiency:
    """Fractions of datasheet peaks real kernels reach, and fixed costs. Stated, not fitted."""
    compute: float = 0.6            # share of dense tensor-core FLOP/s a GEMM / flash kernel sustains
    memory: float = 0.75            # share of DRAM bandwidth a streaming kernel sustains
    # Element-wise work (norms, RoPE, (de)quantization, softmax, top-k) runs on CUDA cores, not
    # tensor cores: non-tensor fp16/fp32 FLOP/s as a share of hw.dense_flops. A6000: 38.7/154.8.
    vector_flops_ratio: float = 0.25
    launch_s: float = 5e-6          # per kernel launch (no CUDA graphs assumed)
    step_overhead_s: float = 2e-3   # per engine iteration: scheduler, input prep, sampling sync (CPU)
    per_seq_overhead_s: float = 2e-6  # per sequence in the step: block tables, detokenise, bookkeeping
    # Compression-side work, per element of K or V touched:
    dequant_flops: float = 4.0      # unpack (shift/mask), int->half, fma with scale and zero-point
    quant_flops: float = 6.0        # min/max reduce, scale, round, clamp, pack
    softmax_flops: float = 5.0      # max, sub, exp, sum, div per score
    topk_flops: float = 8.0         # radix select: a few passes of compare/count per candidate
    # Share of the dequantized fp16 KV that round-trips through DRAM (written by a dequantize
    # kernel, read back by an FP16 attention kernel). 0 = fully fused dequant-in-attention;
    # 1 = dequantize-then-SDPA, as in the KIVI/GEAR reference code. 0.25 is a middle prior
    # (partially fused / tile-wise workspaces that spill), not a measurement. This is the term
    # that can make quantized attention slower than FP16 when the KV is small.
    dequant_roundtrip: float = 0.25
    gear_power_iters: int = 3       # power-iteration steps of GEAR's low-rank fit (each: 2 passes)
    sector_bytes: int = 32          # DRAM access granularity of a scattered (outlier) access


def default_efficiency(hw: HardwareSpec) -> RooflineEfficiency:
    """Defaults, adjusted where the hardware kind makes a default meaningless: on a CPU the
    spec's FLOP/s already are vector FLOP/s and kernel "launches" are function calls."""
    eff = RooflineEfficiency()
    if hw.name == "cpu":
        eff = replace(eff, vector_flops_ratio=1.0, launch_s=1e-6, step_overhead_s=5e-4)
    return eff


class Roofline:
    """time(op) = max(tensor_flops/F + vector_flops/Fv, bytes/B) + kernels * launch."""

    def __init__(self, hw: HardwareSpec, eff: RooflineEfficiency):
        self.inv_f = 1.0 / (hw.dense_flops * eff.compute)
        self.inv_fv = 1.0 / (hw.dense_flops * eff.vector_flops_ratio * eff.compute)
        self.inv_b = 1.0 / (hw.mem_bandwidth * eff.memory)
        self.launch = eff.launch_s

    def op(self, flops: float, vflops: float, nbytes: float, kernels: float = 1.0) -> float:
        c = flops * self.inv_f + vflops * self.inv_fv
        m = nbytes * self.inv_b
        return (c if c > m else m) + kernels * self.launch


def ring_allreduce_s(nbytes: float, tp: int, hw: HardwareSpec) -> float:
    """Ring all-reduce: 2(tp-1)/tp of the buffer crosses each link, 2(tp-1) latency hops."""
    if tp <= 1:
        return 0.0
    return 2.0 * (tp - 1) / tp * nbytes / hw.link_bandwidth + 2 * (tp - 1) * hw.link_latency_s


# ---- KV-cache arithmetic, vectorised (mirrors models/kv_bytes.py) ------------------------

def quantized_tokens_vec(method: Method, n: np.ndarray) -> np.ndarray:
    """models.quantized_tokens over an int64 array."""
    g, r = method.group_size, method.residual
    return np.maximum(n - r, 0) // g * g


def quant_bytes_per_token(method: Method, head_dim: int, dtype_bytes: int) -> float:
    """Payload + scales/zeros of ONE quantized token (K and V, one head). Exact because the
    quantized count is always a multiple of the group size."""
    g = method.group_size
    payload = 2 * head_dim * method.bits / 8
    key_params = head_dim * 2 * dtype_bytes / g
    value_params = -(-head_dim // g) * 2 * dtype_bytes
    return payload + key_params + value_params


def gear_rank_vec(method: Method, n_s: np.ndarray, head_dim: int) -> np.ndarray:
    # Same float expression as math.ceil(rank_frac * min(n_s, d)) so the results match bit for bit.
    return np.maximum(1, np.ceil(method.rank_frac * np.minimum(n_s, head_dim))).astype(np.int64)


def gear_outliers_vec(method: Method, n_s: np.ndarray, head_dim: int) -> np.ndarray:
    """Outliers of ONE of K or V for a segment of n_s tokens (0 for an empty segment)."""
    return np.ceil(method.outlier_frac * n_s * head_dim).astype(np.int64)


def gear_segment_bytes_vec(method: Method, n_s: np.ndarray, head_dim: int, dtype_bytes: int) -> np.ndarray:
    """models.kv_bytes.gear_segment_bytes over an array (0 where n_s == 0)."""
    rank = gear_rank_vec(method, n_s, head_dim)
    low_rank = (n_s + head_dim) * rank * dtype_bytes
    outliers = gear_outliers_vec(method, n_s, head_dim) * (dtype_bytes + INDEX_BYTES)
    return np.where(n_s > 0, 2 * (low_rank + outliers), 0)


def kv_bytes_per_head_vec(method: Method, head_dim: int, prompt: np.ndarray, total: np.ndarray,
                          dtype_bytes: int = 2) -> np.ndarray:
    """models.kv_bytes_per_head over arrays, exact (integer arithmetic). Multiply by
    num_layers * kv heads per rank for models.kv_bytes. Requires total >= prompt."""
    prompt = np.asarray(prompt, np.int64)
    total = np.asarray(total, np.int64)
    full = 2 * head_dim * dtype_bytes
    if method.kind in ("kivi", "gear"):
        g = method.group_size
        n_q = quantized_tokens_vec(method, total)
        payload = 2 * n_q * head_dim * method.bits // 8
        params = (n_q // g) * head_dim * 2 * dtype_bytes + n_q * (-(-head_dim // g)) * 2 * dtype_bytes
        b = (total - n_q) * full + payload + params
        if method.kind == "gear":
            first = quantized_tokens_vec(method, prompt)
            later = (n_q - first) // g
            seg_g = int(gear_segment_bytes_vec(method, np.array([g]), head_dim, dtype_bytes)[0])
            b = b + gear_segment_bytes_vec(method, first, head_dim, dtype_bytes) + later * seg_g
        return b
    n = cached_tokens_vec(method, prompt, total)
    return n * (full + (SCORE_BYTES if method.kind == "h2o" else 0))
