"""The `workload:` section of a scenario: its schema and pure numpy samplers.

Schema (pydantic v2, unknown keys rejected)::

    workload:
      num_requests: 400
      arrival: {process: poisson, rate: 4.0}          # requests/s
               {process: gamma, rate: 4.0, cv: 3.0}   # cv of the inter-arrival gaps
               {process: constant, rate: 4.0}
               {process: closed_loop, concurrency: 64, think_time_s: 0.0}
               {process: offline}                     # everything at t=0
      prompt: {dist: uniform, low: 2048, high: 4096}
      output: {dist: lognormal, median: 256, sigma: 0.6, min: 16, max: 1024}
      # or, instead of prompt/output, lengths drawn from real data:
      lengths: {source: trace, path: traces/x.csv}
      lengths: {source: sharegpt, max_prompt: 4096, max_output: 2048}

Samplers take a `numpy.random.Generator` and nothing else that is random, so a
scenario's seed fixes every length and arrival. This module is on the simulator's
import path: numpy and the standard library only (ShareGPT is imported lazily).
"""
from __future__ import annotations

import csv
import functools
import os
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

TRACE_PROMPT_COLUMN = "num_prefill_tokens"
TRACE_OUTPUT_COLUMN = "num_decode_tokens"


class _Strict(BaseModel):
    # A typo in a scenario (e.g. `rate_s`) must fail loudly, not fall back to a default.
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- arrivals
class PoissonArrival(_Strict):
    process: Literal["poisson"]
    rate: PositiveFloat = Field(description="mean requests per second")


class GammaArrival(_Strict):
    process: Literal["gamma"]
    rate: PositiveFloat = Field(description="mean requests per second")
    cv: PositiveFloat = Field(description="coefficient of variation of inter-arrival gaps; 1 = Poisson, >1 bursty")


class ConstantArrival(_Strict):
    process: Literal["constant"]
    rate: PositiveFloat = Field(description="requests per second, evenly spaced")


class ClosedLoopArrival(_Strict):
    process: Literal["closed_loop"]
    concurrency: PositiveInt = Field(description="requests kept in flight by the simulator")
    think_time_s: float = Field(0.0, ge=0.0, description="pause between a completion and the next request")


class OfflineArrival(_Strict):
    process: Literal["offline"]


Arrival = Annotated[
    Union[PoissonArrival, GammaArrival, ConstantArrival, ClosedLoopArrival, OfflineArrival],
    Field(discriminator="process"),
]


# ---------------------------------------------------------------- length distributions
class FixedDist(_Strict):
    dist: Literal["fixed"]
    value: PositiveInt


class UniformDist(_Strict):
    """Integers drawn uniformly from [low, high], both inclusive."""
    dist: Literal["uniform"]
    low: PositiveInt
    high: PositiveInt

    @model_validator(mode="after")
    def _ordered(self):
        if self.high < self.low:
            raise ValueError(f"uniform: high ({self.high}) must be >= low ({self.low}); swap them")
        return self


class LognormalDist(_Strict):
    """exp(N(ln median, sigma)), rounded, then clipped to [min, max]."""
    dist: Literal["lognormal"]
    median: PositiveFloat
    sigma: float = Field(ge=0.0, description="std-dev of ln(length); 0 gives the median every time")
    min: PositiveInt = 1
    max: Optional[PositiveInt] = None

    @model_validator(mode="after")
    def _ordered(self):
        if self.max is not None and self.max < self.min:
            raise ValueError(f"lognormal: max ({self.max}) must be >= min ({self.min}); raise max or lower min")
        return self


LengthDist = Annotated[Union[FixedDist, UniformDist, LognormalDist], Field(discriminator="dist")]


# ---------------------------------------------------------------- lengths from data
class _Window(_Strict):
    # Requests longer than these are dropped before sampling (not clipped), so the
    # shape of the distribution inside the window is the data's own.
    max_prompt: Optional[PositiveInt] = None
    max_output: Optional[PositiveInt] = None


class TraceLengths(_Window):
    source: Literal["trace"]
    path: str = Field(description="CSV file; relative paths resolve against the scenario's folder, then the cwd")
    prompt_column: str = TRACE_PROMPT_COLUMN
    output_column: str = TRACE_OUTPUT_COLUMN


class ShareGPTLengths(_Window):
    source: Literal["sharegpt"]


LengthSource = Annotated[Union[TraceLengths, ShareGPTLengths], Field(discriminator="source")]


class SharedPrefix(_Strict):
    """Shared system prompts, as inference-perf's shared-prefix workloads: every request's prompt is
    its group's system prompt followed by its own question (the sampled prompt length)."""
    groups: PositiveInt = Field(description="distinct system prompts; each request draws one uniformly")
    tokens: PositiveInt = Field(description="tokens of each system prompt")


class Sessions(_Strict):
    """Multi-turn chat: consecutive requests form sessions of `turns`; a turn's prompt is the previous
    turn's prompt + its reply + a new question (the sampled prompt length), sent `think_time_s` after
    the previous reply ended. The arrival process gives the sessions' first turns."""
    turns: int = Field(ge=2, description="turns per session")
    think_time_s: float = Field(0.0, ge=0.0, description="pause between a reply and the next question")


class WorkloadConfig(_Strict):
    num_requests: PositiveInt
    arrival: Arrival
    prompt: Optional[LengthDist] = None
    output: Optional[LengthDist] = None
    lengths: Optional[LengthSource] = None
    shared_prefix: Optional[SharedPrefix] = None
    sessions: Optional[Sessions] = None

    @model_validator(mode="after")
    def _one_length_source(self):
        has_dists = self.prompt is not None or self.output is not None
        if self.lengths is not None and has_dists:
            raise ValueError("workload: give either `lengths` or `prompt`+`output`, not both; delete one")
        if self.lengths is None and (self.prompt is None or self.output is None):
            missing = "prompt" if self.prompt is None else "output"
            raise ValueError(f"workload.{missing} is missing: give both `prompt` and `output` "
                             "distributions, or a `lengths:` source (trace or sharegpt)")
        if self.sessions is not None and isinstance(self.arrival, (ClosedLoopArrival, OfflineArrival)):
            raise ValueError("workload.sessions: later turns follow their replies, so the arrival process gives "
                             "the first turns; use poisson, gamma or constant")
        return self


# ---------------------------------------------------------------- samplers
def sample_arrivals(arrival, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """Arrival times in seconds (sorted float64, first at t=0), or None for closed_loop.

    Every open-loop process starts at t=0 so that n requests span n-1 gaps and the
    processes are comparable at the same rate.
    """
    if isinstance(arrival, ClosedLoopArrival):
        return None  # the simulator issues the next request when one completes
    if isinstance(arrival, OfflineArrival):
        return np.zeros(n, dtype=np.float64)
    if isinstance(arrival, ConstantArrival):
        return np.arange(n, dtype=np.float64) / arrival.rate
    if isinstance(arrival, PoissonArrival):
        gaps = rng.exponential(1.0 / arrival.rate, size=max(n - 1, 0))
    elif isinstance(arrival, GammaArrival):
        # shape k = 1/cv^2 gives the requested cv; scale keeps the mean gap at 1/rate.
        k = 1.0 / arrival.cv ** 2
        gaps = rng.gamma(k, 1.0 / (arrival.rate * k), size=max(n - 1, 0))
    else:
        raise TypeError(f"unknown arrival process {arrival!r}")
    out = np.zeros(n, dtype=np.float64)
    if n > 1:
        np.cumsum(gaps, out=out[1:])
    return out


def sample_dist(dist, n: int, rng: np.random.Generator) -> np.ndarray:
    """n lengths (int64, >= 1) from one length distribution."""
    if isinstance(dist, FixedDist):
        return np.full(n, dist.value, dtype=np.int64)
    if isinstance(dist, UniformDist):
        return rng.integers(dist.low, dist.high + 1, size=n, dtype=np.int64)
    if isinstance(dist, LognormalDist):
        x = np.rint(rng.lognormal(np.log(dist.median), dist.sigma, size=n))
        hi = dist.max if dist.max is not None else np.inf
        return np.clip(x, max(dist.min, 1), hi).astype(np.int64)
    raise TypeError(f"unknown length distribution {dist!r}")


def sample_lengths(cfg: WorkloadConfig, rng: np.random.Generator,
                   base_dir: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_tokens, output_tokens): int64 arrays of length cfg.num_requests, all >= 1.

    base_dir is the scenario file's folder, used to resolve a relative trace path.
    """
    n = cfg.num_requests
    if cfg.lengths is None:
        return sample_dist(cfg.prompt, n, rng), sample_dist(cfg.output, n, rng)
    src = cfg.lengths
    if isinstance(src, TraceLengths):
        path = resolve_trace_path(src.path, base_dir)
        prompt, output = load_trace(path, src.prompt_column, src.output_column)
        what = f"trace {path}"
    else:
        from rkvsim.calibration.lengths.sharegpt import load_lengths  # lazy: reads a cache file, only when asked for
        prompt, output = load_lengths()
        what = "ShareGPT"
    return draw_pairs(prompt, output, n, rng, src.max_prompt, src.max_output, what)


def draw_pairs(prompt: np.ndarray, output: np.ndarray, n: int, rng: np.random.Generator,
               max_prompt: int | None = None, max_output: int | None = None,
               what: str = "the data") -> tuple[np.ndarray, np.ndarray]:
    """n (prompt, output) rows drawn from a pool, keeping each row's pairing.

    Without replacement when the pool is big enough (every row at most once), with
    replacement otherwise.
    """
    keep = np.ones(len(prompt), dtype=bool)
    if max_prompt is not None:
        keep &= prompt <= max_prompt
    if max_output is not None:
        keep &= output <= max_output
    p, o = prompt[keep], output[keep]
    if len(p) == 0:
        raise ValueError(f"no request in {what} has prompt <= {max_prompt} and output <= {max_output}; "
                         "raise lengths.max_prompt / lengths.max_output")
    idx = rng.choice(len(p), size=n, replace=n > len(p))
    return p[idx].astype(np.int64), o[idx].astype(np.int64)


# ---------------------------------------------------------------- traces
def resolve_trace_path(path: str | os.PathLike, base_dir: Path | str | None = None) -> Path:
    """A trace path as written in a scenario: absolute, or relative to the scenario's
    folder (base_dir) first and the current directory second."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else (
        ([Path(base_dir) / p] if base_dir is not None else []) + [Path.cwd() / p])
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"workload.lengths.path: trace file {str(path)!r} not found (tried {tried}); "
                            "give a path relative to the scenario file or an absolute one")


def load_trace(path: Path | str, prompt_column: str = TRACE_PROMPT_COLUMN,
               output_column: str = TRACE_OUTPUT_COLUMN) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, output) int64 arrays from a CSV trace. Lengths below 1 are raised to 1
    (a request always prefills and decodes at least one token)."""
    path = Path(path).resolve()
    st = path.stat()
    # Keyed on mtime+size so that a sweep re-reads nothing, yet an edited file is re-read.
    p, o = _load_trace_cached(str(path), st.st_mtime_ns, st.st_size, prompt_column, output_column)
    return p.copy(), o.copy()


@functools.lru_cache(maxsize=8)
def _load_trace_cached(path: str, _mtime: int, _size: int, prompt_column: str,
                       output_column: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        cols = []
        for name, key in ((prompt_column, "prompt_column"), (output_column, "output_column")):
            if name not in header:
                raise ValueError(f"trace {path}: no column {name!r} (columns: {', '.join(header)}); "
                                 f"set workload.lengths.{key}")
            cols.append(header.index(name))
        ip, io = cols
        prompt, output = [], []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                prompt.append(float(row[ip]))
                output.append(float(row[io]))
            except (ValueError, IndexError):
                raise ValueError(f"trace {path}, line {lineno}: lengths must be numbers, got {row!r}") from None
    if not prompt:
        raise ValueError(f"trace {path} has no rows")
    to_len = lambda v: np.maximum(np.rint(np.asarray(v)), 1).astype(np.int64)  # noqa: E731
    return to_len(prompt), to_len(output)
