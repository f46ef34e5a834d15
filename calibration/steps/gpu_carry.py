"""Carrying a GPU's measured dense operators to a GPU nobody profiled.

A dense operator's time on the profiled GPU is scaled by the datasheet roofline of its work
(FLOPs, element-wise FLOPs, bytes) on the target over that on the source, its fixed part (the
physics law's constant: launch and tail) kept (compile.carry_time). The donor is the profiled
GPU of the same memory kind first (HBM or GDDR: element-wise kernels reach a different share of
bandwidth on each), then the nearest by peak FLOP/s and bandwidth, both on a log scale.

How far it can be trusted is measured on the GPUs that do have tables (`rkvsim validate-transfer`,
its dense table, validation/gpu_transfer.py): every shape of one measured GPU's tables predicted
from another's fit carried this way; the README quotes the figures.
"""
from __future__ import annotations

import math

import numpy as np

from rkvsim.models import HardwareSpec

# Element-wise FLOP/s as a share of the tensor-core peak, as the roofline prior states it
# (simulator/roofline.py): only the ratio between GPUs matters here, so one stated share serves all.
VECTOR_SHARE = 0.25


def dense_roofline_s(work: dict, hw: HardwareSpec) -> np.ndarray:
    """max(tensor FLOPs / peak + element-wise FLOPs / vector peak, bytes / bandwidth)."""
    c = np.asarray(work["flops"], np.float64) / hw.dense_flops \
        + np.asarray(work["vflops"], np.float64) / (hw.dense_flops * VECTOR_SHARE)
    m = np.asarray(work["bytes"], np.float64) / hw.mem_bandwidth
    return np.maximum(c, m)


def dense_ratio(work: dict, src: HardwareSpec, dst: HardwareSpec) -> np.ndarray:
    """Datasheet roofline of `work` on dst over src: what carries a measured dense time."""
    t_src = dense_roofline_s(work, src)
    return np.where(t_src > 0, dense_roofline_s(work, dst) / np.maximum(t_src, 1e-30),
                    src.mem_bandwidth / dst.mem_bandwidth)


def distance(a: HardwareSpec, b: HardwareSpec) -> tuple[int, float]:
    """(0 when the memory kind matches, else 1; |log FLOP/s ratio| + |log bandwidth ratio|)."""
    return (0 if a.memory == b.memory else 1,
            abs(math.log(a.dense_flops / b.dense_flops)) + abs(math.log(a.mem_bandwidth / b.mem_bandwidth)))


def rank_donors(dst: HardwareSpec, candidates: list[HardwareSpec]) -> list[HardwareSpec]:
    """Candidates nearest first (ties by name, so the choice never depends on listing order)."""
    return sorted((c for c in candidates if c.name != dst.name), key=lambda c: (distance(dst, c), c.name))
