"""Accelerators from public datasheet figures.

Dense FLOP/s are tensor-core fp16/bf16 without sparsity, accumulate in fp32 (what cuBLAS uses
for fp16 GEMMs). Bandwidths in bytes/s. Interconnect bandwidth is per direction, per GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

GB = 1e9
GiB = 1024**3


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    memory_bytes: float
    mem_bandwidth: float        # bytes/s
    dense_flops: float          # fp16/bf16 FLOP/s
    interconnect: str
    link_bandwidth: float       # bytes/s per direction between two devices
    link_latency_s: float
    # Matches the device name torch reports (e.g. 'NVIDIA RTX A6000') so that a profile can be
    # checked against the hardware it claims to be for.
    device_pattern: str = ""
    # Topology: how many GPUs one NVLink/NVSwitch domain joins (1: no NVLink, `link_*` is PCIe). A TP group larger than
    # that crosses PCIe, so its ring runs at the PCIe figures (an A6000 NVLink bridge joins two).
    nvlink_group: int = 1
    pcie_bandwidth: float = 25 * GB      # PCIe 4.0 x16, achievable per direction
    pcie_latency_s: float = 10e-6
    # Vidur's measured collectives for this GPU's kind of host (calibration/data/comm/), if any.
    network: str | None = None
    # DRAM kind: "hbm" (stacked, wide), "gddr" (graphics boards) or "dram" (a CPU host). Element-wise
    # kernels reach a different share of bandwidth on each (calibration/steps/gpu_carry.py picks a
    # donor GPU of the same kind first).
    memory: str = "gddr"
    # Streaming multiprocessors (0: not a GPU). A GEMM runs its output tiles in waves of one tile per
    # SM, so its time steps up where the tile count passes a multiple of this (calibration/steps/fit.py).
    sm_count: int = 0

    def crosses_pcie(self, workers: int) -> bool:
        """Whether a ring over `workers` GPUs leaves the NVLink domain (group 1: the link is the only path)."""
        return self.nvlink_group > 1 and workers > self.nvlink_group

    def ring_link(self, workers: int) -> tuple[float, float]:
        """(bandwidth, latency) of the slowest hop of a ring over `workers` GPUs."""
        if self.crosses_pcie(workers):
            return self.pcie_bandwidth, self.pcie_latency_s
        return self.link_bandwidth, self.link_latency_s


HARDWARE: dict[str, HardwareSpec] = {
    h.name: h
    for h in [
        HardwareSpec("a6000", 48 * GB, 768 * GB, 154.8e12, "nvlink-bridge", 56.25 * GB, 5e-6, r"a6000",
                     nvlink_group=2, sm_count=84),
        HardwareSpec("a40", 48 * GB, 696 * GB, 149.7e12, "nvlink-bridge", 56.25 * GB, 5e-6, r"\ba40\b",
                     nvlink_group=2, network="a40_pairwise_nvlink", sm_count=84),
        HardwareSpec("a100-40g", 40 * GB, 1555 * GB, 312e12, "nvlink3", 300 * GB, 3e-6, r"a100.*(40|pcie)",
                     nvlink_group=8, network="a100_dgx", memory="hbm", sm_count=108),
        HardwareSpec("a100-80g", 80 * GB, 2039 * GB, 312e12, "nvlink3", 300 * GB, 3e-6, r"a100.*80",
                     nvlink_group=8, network="a100_dgx", memory="hbm", sm_count=108),
        HardwareSpec("h100-sxm", 80 * GB, 3350 * GB, 989.4e12, "nvlink4", 450 * GB, 2.5e-6, r"h100",
                     nvlink_group=8, network="h100_dgx", memory="hbm", sm_count=132),
        HardwareSpec("h200", 141 * GB, 4800 * GB, 989.4e12, "nvlink4", 450 * GB, 2.5e-6, r"h200",
                     nvlink_group=8, network="h100_dgx", memory="hbm", sm_count=132),
        HardwareSpec("l40s", 48 * GB, 864 * GB, 362.05e12, "pcie4", 32 * GB, 10e-6, r"l40s", sm_count=142),
        HardwareSpec("l4", 24 * GB, 300 * GB, 121e12, "pcie4", 32 * GB, 10e-6, r"\bl4\b", sm_count=58),
        HardwareSpec("rtx-4090", 24 * GB, 1008 * GB, 82.6e12, "pcie4", 32 * GB, 10e-6, r"4090", sm_count=128),
        # A nominal 2-core AVX2 host (fp32 FMA, 2 x 3 GHz x 32 FLOP/cycle) with DDR4 bandwidth;
        # CPU profiles measured by rkvprof replace these guesses.
        HardwareSpec("cpu", 24 * GiB, 20 * GB, 0.192e12, "shared-memory", 10 * GB, 1e-6, r"cpu", memory="dram"),
    ]
}

_ALIASES = {
    "rtx-a6000": "a6000", "nvidia-rtx-a6000": "a6000", "a100": "a100-80g", "a100-sxm": "a100-80g",
    "h100": "h100-sxm", "h100-80g": "h100-sxm", "nvidia-a40": "a40", "4090": "rtx-4090", "rtx4090": "rtx-4090",
}


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def resolve_hardware(name: str) -> HardwareSpec:
    k = _key(name)
    k = _ALIASES.get(k, k)
    if k in HARDWARE:
        return HARDWARE[k]
    raise KeyError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}")


def hardware_for_device(device_name: str) -> HardwareSpec | None:
    """The spec whose pattern matches a torch device name, or None."""
    low = device_name.lower()
    for spec in HARDWARE.values():
        if spec.device_pattern and re.search(spec.device_pattern, low):
            return spec
    return None
