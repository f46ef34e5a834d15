"""Time one callable: CUDA events on a GPU, wall clock on a CPU; warm-up, repeats, spread."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 10
    # Stop repeating once this much time has been spent on the configuration (and at least
    # min_repeats were taken): slow configurations get fewer, fast ones more samples.
    budget_s: float = 1.0


@dataclass(frozen=True)
class TimingStats:
    median: float
    p10: float
    p90: float
    mean: float
    std: float
    min: float
    max: float
    repeats: int

    @classmethod
    def from_samples(cls, samples: list[float]) -> "TimingStats":
        a = np.asarray(samples, dtype=float)
        p10, med, p90 = np.percentile(a, [10, 50, 90])
        return cls(float(med), float(p10), float(p90), float(a.mean()), float(a.std()),
                   float(a.min()), float(a.max()), len(a))

    def as_row(self) -> dict:
        return {"time_s_median": self.median, "time_s_p10": self.p10, "time_s_p90": self.p90,
                "time_s_mean": self.mean, "time_s_std": self.std, "time_s_min": self.min,
                "time_s_max": self.max, "repeats": self.repeats}


def _cpu_sample(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cuda_sample(fn: Callable[[], object]) -> float:
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    # Events time the GPU work itself; synchronising on `end` waits for it without adding
    # the host-side launch gap of the next repeat.
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(fn: Callable[[], object], policy: TimingPolicy, device: str = "cpu") -> TimingStats:
    """Run fn warm-up times untimed, then time it repeatedly under the policy."""
    import torch
    cuda = device.startswith("cuda")
    sample = _cuda_sample if cuda else _cpu_sample
    with torch.inference_mode():
        for _ in range(policy.warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
        samples: list[float] = []
        spent = 0.0
        while len(samples) < policy.max_repeats:
            s = sample(fn)
            samples.append(s)
            spent += s
            if len(samples) >= policy.min_repeats and spent >= policy.budget_s:
                break
    return TimingStats.from_samples(samples)
