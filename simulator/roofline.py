"""Roofline building blocks for the step-cost prior: stated efficiencies, one operator's
time, and KV-cache arithmetic vectorised over a batch of requests.

Nothing here is fitted. Every constant is a stated prior that a profile (calibration/)
replaces; results that use it say "roofline-prior (uncalibrated)".

The KV arithmetic is each method's spec (models/method_specs/), whose formulas take arrays, so
the cost model evaluates a whole batch with the very formula the block manager and the kernels'
`nbytes` use.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from rkvsim.models import HardwareSpec


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
    """Ring all-reduce: 2(tp-1)/tp of the buffer crosses each link, 2(tp-1) latency hops, at the
    slowest hop's figures (PCIe once the ring leaves the NVLink domain)."""
    if tp <= 1:
        return 0.0
    bw, lat = hw.ring_link(tp)
    return 2.0 * (tp - 1) / tp * nbytes / bw + 2 * (tp - 1) * lat
