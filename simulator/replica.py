"""One serving replica (a TP group): continuous batching over a paged KV block pool.

The iteration loop is a SimPy process: form a batch, ask the cost model how long the
step takes, advance simulated time, apply the step. Decoding requests live in packed
numpy columns so that a step costs a handful of vector ops whatever the batch size;
prefills and finishes are handled per request (they happen once per request).
Scheduling follows vLLM: FCFS; without chunked prefill a step is prefill-only when a
waiting request can be admitted, else decode-only; with chunked prefill every step
carries all decodes plus prefill chunks up to the token budget. When decodes need
blocks that are not free, the most recently admitted request is preempted and
recomputed later (its prompt and generated tokens are prefilled again).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np
import simpy

from rkvsim.models import cached_tokens_vec

from rkvsim.simulator.config import SchedulerConfig
from rkvsim.simulator.cost_model import CostModel, StepBatch
from rkvsim.simulator.kv_memory import KVLayout
from rkvsim.simulator.records import RequestLog, StepLog

_EMPTY = np.zeros(0, np.int64)


class Replica:
    # Rows of the packed decode columns; ctx and gen are adjacent so one op advances both.
    CTX, GEN, RID, PLEN, OUT, BLK = range(6)
    LAST, ITLMAX = range(2)

    def __init__(self, env: simpy.Environment, index: int, layout: KVLayout, cost: CostModel,
                 cfg: SchedulerConfig, log: RequestLog, on_done: Callable[[int], None]):
        self.env, self.index, self.layout, self.cost, self.cfg, self.log = env, index, layout, cost, cfg, log
        self.on_done = on_done
        self.steps = StepLog()
        self.waiting: deque[int] = deque()
        # prefilling requests: [rid, tokens done, tokens to prefill, blocks held]
        self.prefilling: list[list[int]] = []
        cap = cfg.max_batch_size
        self.D = np.zeros((6, cap), np.int64)
        self.F = np.zeros((2, cap))  # latest token time, largest inter-token gap so far
        # vLLM's admission watermark: keep 1% of blocks free for running requests to grow
        # into, or every admission is paid for by a preemption one step later.
        self.watermark = max(1, layout.num_blocks // 100)
        self.n_dec = 0
        self.blocks_used = 0
        self.outstanding = 0
        self._wake: simpy.Event | None = None
        self.process = env.process(self.run())

    # ---- routing-visible state -------------------------------------------------------
    @property
    def kv_fraction(self) -> float:
        return self.blocks_used / self.layout.num_blocks

    def submit(self, rid: int) -> None:
        self.waiting.append(rid)
        self.outstanding += 1
        self.log.replica[rid] = self.index
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    # ---- the event loop --------------------------------------------------------------
    def run(self):
        env = self.env
        while True:
            plan = self._plan_step()
            if plan is None:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            chunks, dec_need = plan
            n = self.n_dec if dec_need is not None else 0
            D = self.D
            batch = StepBatch(
                prefill_new=np.array([c[1] for c in chunks], np.int64) if chunks else _EMPTY,
                prefill_past=np.array([c[0][1] for c in chunks], np.int64) if chunks else _EMPTY,
                prefill_done=np.array([c[0][1] + c[1] >= c[0][2] for c in chunks], bool) if chunks else None,
                decode_ctx=D[self.CTX, :n] + 1 if n else _EMPTY,
                decode_prompt=D[self.PLEN, :n] if n else _EMPTY,
            )
            dt = self.cost.step_time(batch)
            yield env.timeout(dt)
            now = env.now
            new_tokens = sum(c[1] for c in chunks)
            self.log.prefill_tokens += new_tokens
            if n:
                self._finish_decode_step(n, dec_need, now)
            for entry, chunk in chunks:
                entry[1] += chunk
            if chunks:
                self._finish_prefills(now)
            # The block ledger balances whenever a request joined, left or moved on.
            assert not (chunks or self.n_dec != n) or self._ledger() == self.blocks_used, \
                f"replica {self.index}: blocks_used {self.blocks_used} != blocks held {self._ledger()}"
            assert 0 <= self.blocks_used <= self.layout.num_blocks, f"replica {self.index}: {self.blocks_used} blocks used"
            self.steps.add(now, dt, n + len(chunks), self.kv_fraction, new_tokens)

    def _ledger(self) -> int:
        """Blocks held by the running and prefilling requests (what blocks_used must equal)."""
        return int(self.D[self.BLK, :self.n_dec].sum()) + sum(e[3] for e in self.prefilling)

    # ---- scheduling ------------------------------------------------------------------
    def _plan_step(self):
        """Returns (prefill chunks [(entry, tokens)], decode block needs or None), or None if idle."""
        cfg = self.cfg
        if cfg.chunked_prefill:
            dec_need = self._reserve_decode() if self.n_dec else None
            budget = cfg.max_batched_tokens - self.n_dec
            chunks = []
            for entry in self.prefilling:
                if budget <= 0:
                    break
                take = self._grow_prefill(entry, budget)
                if take:
                    chunks.append((entry, take))
                    budget -= take
            self._admit(budget, chunks, chunked=True)
            if not chunks and dec_need is None:
                if len(self.prefilling) > 1:
                    # Partial prefills hold blocks none of them can grow into: without this
                    # they would wait on each other forever. A lone request always fits.
                    self._preempt_prefill()
                    return self._plan_step()
                return None
            return chunks, dec_need
        chunks: list = []
        self._admit(cfg.max_batched_tokens, chunks, chunked=False)
        if chunks:
            return chunks, None
        if self.n_dec:
            return [], self._reserve_decode()
        return None

    def _admit(self, budget: int, chunks: list, chunked: bool) -> None:
        log, lay = self.log, self.layout
        while self.waiting and budget > 0 and self.n_dec + len(self.prefilling) < self.cfg.max_batch_size:
            rid = self.waiting[0]
            total = int(log.prompt[rid] + log.generated[rid])
            take = min(total, budget) if chunked else total
            if take > budget:
                break
            need = lay.blocks_for(take)
            busy = self.n_dec or self.prefilling
            if self.blocks_used + need > lay.num_blocks - (self.watermark if busy else 0):
                break
            self.waiting.popleft()
            assert rid not in (e[0] for e in self.prefilling), f"request {rid} admitted twice"
            self.blocks_used += need
            entry = [rid, 0, total, need]
            self.prefilling.append(entry)
            chunks.append((entry, take))
            budget -= take
            if np.isnan(log.first_sched[rid]):
                log.first_sched[rid] = self.env.now

    def _grow_prefill(self, entry: list[int], budget: int) -> int:
        take = min(entry[2] - entry[1], budget)
        need = self.layout.blocks_for(entry[1] + take)
        extra = need - entry[3]
        if self.blocks_used + extra > self.layout.num_blocks:
            return 0
        self.blocks_used += extra
        entry[3] = need
        return take

    def _reserve_decode(self) -> np.ndarray:
        """Blocks each decoding request needs after this step; preempts (LIFO) until they fit."""
        lay, D = self.layout, self.D
        n = self.n_dec
        need = lay.blocks_for_vec(cached_tokens_vec(lay.method, D[self.PLEN, :n], D[self.CTX, :n] + 1))
        total = self.blocks_used + int(need.sum() - D[self.BLK, :n].sum())
        while total > lay.num_blocks and n > 0:
            n -= 1
            total -= int(need[n])
            self._preempt_last()
        assert total <= lay.num_blocks, f"replica {self.index}: decodes need {total} of {lay.num_blocks} blocks"
        self.blocks_used = total
        return need[:n]

    def _preempt_last(self) -> None:
        assert self.n_dec > 0, f"replica {self.index}: preempted from an empty batch"
        i = self.n_dec - 1
        D, log = self.D, self.log
        rid = int(D[self.RID, i])
        log.generated[rid] = D[self.GEN, i]
        log.preemptions[rid] += 1
        log.last_token[rid] = self.F[self.LAST, i]
        log.itl_max[rid] = np.fmax(log.itl_max[rid], self.F[self.ITLMAX, i])
        self.blocks_used -= int(D[self.BLK, i])
        assert self.blocks_used >= 0, f"replica {self.index}: freed more blocks than held"
        self.n_dec = i
        self.waiting.appendleft(rid)

    def _preempt_prefill(self) -> None:
        rid, _done, _total, blocks = self.prefilling.pop()
        self.blocks_used -= blocks
        assert self.blocks_used >= 0, f"replica {self.index}: freed more blocks than held"
        self.log.preemptions[rid] += 1
        self.waiting.appendleft(rid)

    # ---- applying a finished step ----------------------------------------------------
    def _finish_decode_step(self, n: int, need: np.ndarray, now: float) -> None:
        D, F, log = self.D, self.F, self.log
        D[self.CTX:self.GEN + 1, :n] += 1
        D[self.BLK, :n] = need
        itl = now - F[self.LAST, :n]
        log.add_itls(itl)
        np.maximum(F[self.ITLMAX, :n], itl, out=F[self.ITLMAX, :n])
        F[self.LAST, :n] = now
        done = D[self.GEN, :n] >= D[self.OUT, :n]
        if done.any():
            for i in np.flatnonzero(done):
                rid = int(D[self.RID, i])
                log.itl_max[rid] = np.fmax(log.itl_max[rid], F[self.ITLMAX, i])
                self._complete(rid, int(D[self.GEN, i]), now)
                self.blocks_used -= int(D[self.BLK, i])
            keep = ~done
            m = int(keep.sum())
            D[:, :m] = D[:, :n][:, keep]
            F[:, :m] = F[:, :n][:, keep]
            self.n_dec = m

    def _finish_prefills(self, now: float) -> None:
        log, lay, D, F = self.log, self.layout, self.D, self.F
        still = []
        for entry in self.prefilling:
            rid, done, total, blocks = entry
            if done < total:
                still.append(entry)
                continue
            # The prefill step emits the next token (the first one, or the one after a recompute).
            gen = int(log.generated[rid]) + 1
            if np.isnan(log.first_token[rid]):
                log.first_token[rid] = now
            else:
                itl = now - log.last_token[rid]
                log.add_itls(np.array([itl]))
                log.itl_max[rid] = np.fmax(log.itl_max[rid], itl)
            if gen >= log.output[rid]:
                self.blocks_used -= blocks
                self._complete(rid, gen, now)
                continue
            # Eviction and SnapKV selection shrink the cache once the prompt is attended.
            cached = lay.method.cached_tokens(total, total)
            keep_blocks = lay.blocks_for(cached)
            assert keep_blocks <= blocks, f"request {rid}: eviction grew its cache ({blocks} -> {keep_blocks} blocks)"
            self.blocks_used -= blocks - keep_blocks
            i = self.n_dec
            assert i < self.cfg.max_batch_size, f"replica {self.index}: more than max_batch_size running"
            D[:, i] = (total, gen, rid, total, log.output[rid], keep_blocks)  # CTX GEN RID PLEN OUT BLK
            F[:, i] = (now, 0.0)
            self.n_dec += 1
        self.prefilling = still

    def _complete(self, rid: int, gen: int, now: float) -> None:
        assert np.isnan(self.log.finish[rid]), f"request {rid} completed twice"
        assert self.log.replica[rid] == self.index, f"request {rid} completed on a replica it was not sent to"
        self.log.generated[rid] = gen
        self.log.finish[rid] = now
        self.outstanding -= 1
        self.on_done(rid)
