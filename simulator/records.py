"""What a run records: per-request arrays indexed by request id, per-step series per replica,
and a streaming histogram of inter-token latencies (storing every token's gap would cost
gigabytes on million-request runs)."""
from __future__ import annotations

from array import array

import numpy as np

# 1% wide log bins from 10 us to 10^4 s: percentiles good to 1%.
ITL_EDGES = np.geomspace(1e-5, 1e4, 2085)


class RequestLog:
    def __init__(self, prompt: np.ndarray, output: np.ndarray):
        n = len(prompt)
        self.prompt = prompt.astype(np.int64)
        self.output = output.astype(np.int64)
        nan = lambda: np.full(n, np.nan)  # noqa: E731
        self.arrival, self.first_sched, self.first_token, self.finish, self.itl_max, self.last_token = (
            nan(), nan(), nan(), nan(), nan(), nan())
        self.generated = np.zeros(n, np.int64)
        self.preemptions = np.zeros(n, np.int64)
        self.replica = np.full(n, -1, np.int64)
        self.rejected = np.zeros(n, bool)
        self.reject_reason: dict[int, str] = {}
        self.prefill_tokens = 0  # all prefill work, recomputation included
        # Prefix caching: tokens found cached at admissions, tokens looked up, and per request
        # the prompt tokens cached at its first admission.
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        self.cached_prompt = np.zeros(n, np.int64)
        self._itl_hist = np.zeros(len(ITL_EDGES) + 1, np.int64)
        self._itl_buf: list[np.ndarray] = []
        self._itl_wbuf: list[tuple[np.ndarray, np.ndarray]] = []
        self._itl_gap, self._itl_count = array("d"), array("q")
        self._itl_buffered = 0

    def add_itls(self, itl: np.ndarray) -> None:
        # Binning every step costs more than the step itself; bin in bulk instead.
        self._itl_buf.append(itl)
        self._itl_buffered += len(itl)
        if self._itl_buffered > 200_000:
            self._flush_itls()

    def add_itl_counts(self, itl: np.ndarray, counts: np.ndarray) -> None:
        """Gaps itl[j] seen counts[j] times each (a skipped run's steps: one gap per step,
        shared by every request decoding in it)."""
        self._itl_wbuf.append((itl, counts))
        self._itl_buffered += len(itl)
        if self._itl_buffered > 200_000:
            self._flush_itls()

    def add_itl_repeated(self, gap: float, count: int) -> None:
        """One gap seen `count` times (a step in which every request decoding had its last token
        at the same time): what add_itls of `count` copies would bin, without an array."""
        self._itl_gap.append(gap)
        self._itl_count.append(count)
        self._itl_buffered += 1
        if self._itl_buffered > 200_000:
            self._flush_itls()

    def _flush_itls(self) -> None:
        if self._itl_buf:
            x = np.concatenate(self._itl_buf)
            self._itl_hist += np.bincount(ITL_EDGES.searchsorted(x), minlength=len(self._itl_hist))
        weighted = self._itl_wbuf
        if self._itl_gap:
            weighted = weighted + [(np.frombuffer(self._itl_gap), np.frombuffer(self._itl_count, np.int64))]
        if weighted:
            x = np.concatenate([v for v, _c in weighted])
            w = np.concatenate([c for _v, c in weighted]).astype(np.float64)   # counts: exact in float64
            self._itl_hist += np.bincount(ITL_EDGES.searchsorted(x), weights=w,
                                          minlength=len(self._itl_hist)).astype(np.int64)
        self._itl_buf, self._itl_wbuf, self._itl_buffered = [], [], 0
        self._itl_gap, self._itl_count = array("d"), array("q")

    @property
    def itl_hist(self) -> np.ndarray:
        self._flush_itls()
        return self._itl_hist

    def reject(self, rid: int, reason: str) -> None:
        self.rejected[rid] = True
        self.reject_reason[rid] = reason


class StepLog:
    """One row per engine iteration of one replica."""

    def __init__(self):
        self.t_end = array("d")
        self.dt = array("d")
        self.batch = array("l")
        self.kv_fraction = array("d")
        self.prefill_tokens = array("l")

    def add(self, t_end: float, dt: float, batch: int, kv_fraction: float, prefill_tokens: int) -> None:
        self.t_end.append(t_end)
        self.dt.append(dt)
        self.batch.append(batch)
        self.kv_fraction.append(kv_fraction)
        self.prefill_tokens.append(prefill_tokens)

    def extend(self, t_end: np.ndarray, dt: np.ndarray, batch: np.ndarray, kv_fraction: np.ndarray) -> None:
        """Rows of decode-only steps (no prefill tokens), in bulk."""
        self.t_end.frombytes(np.ascontiguousarray(t_end, np.float64).tobytes())
        self.dt.frombytes(np.ascontiguousarray(dt, np.float64).tobytes())
        self.batch.frombytes(np.ascontiguousarray(batch, np.dtype(f"i{self.batch.itemsize}")).tobytes())
        self.kv_fraction.frombytes(np.ascontiguousarray(kv_fraction, np.float64).tobytes())
        self.prefill_tokens.frombytes(bytes(len(t_end) * self.prefill_tokens.itemsize))   # zeros

    def __len__(self) -> int:
        return len(self.t_end)
