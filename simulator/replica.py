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

from .config import SchedulerConfig
from .cost_model import CostModel, StepBatch
from .kv_memory import KVLayout
from .records import RequestLog, StepLog

_EMPTY = np.zeros(0, np.int64)


class Replica:
    COLS = ("rid", "ctx", "plen", "gen", "out", "blocks")

    def __init__(self, env: simpy.Environment, index: int, layout: KVLayout, cost: CostModel,
                 cfg: SchedulerConfig, log: RequestLog, on_done: Callable[[int], None]):
        self.env, self.index, self.layout, self.cost, self.cfg, self.log = env, index, layout, cost, cfg, log
        self.on_done = on_done
        self.steps = StepLog()
        self.waiting: deque[int] = deque()
        # prefilling requests: [rid, tokens done, tokens to prefill, blocks held]
        self.prefilling: list[list[int]] = []
        cap = cfg.max_batch_size
        self.d = {c: np.zeros(cap, np.int64) for c in self.COLS}
        self.d_last = np.zeros(cap)  # time of each decoding request's latest token
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
            d = self.d
            batch = StepBatch(
                prefill_new=np.array([c[1] for c in chunks], np.int64) if chunks else _EMPTY,
                prefill_past=np.array([c[0][1] for c in chunks], np.int64) if chunks else _EMPTY,
                decode_ctx=d["ctx"][:n] + 1 if n else _EMPTY,
                decode_prompt=d["plen"][:n] if n else _EMPTY,
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
            self.steps.add(now, dt, n + len(chunks), self.kv_fraction, new_tokens)

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
            if self.blocks_used + need > lay.num_blocks:
                break
            self.waiting.popleft()
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
        lay, d = self.layout, self.d
        n = self.n_dec
        need = lay.blocks_for_vec(lay.cached_vec(d["plen"][:n], d["ctx"][:n] + 1))
        total = self.blocks_used + int(need.sum() - d["blocks"][:n].sum())
        while total > lay.num_blocks and n > 0:
            n -= 1
            total -= int(need[n])
            self._preempt_last()
        self.blocks_used = total
        return need[:n]

    def _preempt_last(self) -> None:
        i = self.n_dec - 1
        rid = int(self.d["rid"][i])
        self.log.generated[rid] = self.d["gen"][i]
        self.log.preemptions[rid] += 1
        self.log.last_token[rid] = self.d_last[i]
        self.blocks_used -= int(self.d["blocks"][i])
        self.n_dec = i
        self.waiting.appendleft(rid)

    # ---- applying a finished step ----------------------------------------------------
    def _finish_decode_step(self, n: int, need: np.ndarray, now: float) -> None:
        d, log = self.d, self.log
        d["ctx"][:n] += 1
        d["gen"][:n] += 1
        d["blocks"][:n] = need
        itl = now - self.d_last[:n]
        log.add_itls(itl)
        rids = d["rid"][:n]
        log.itl_max[rids] = np.fmax(log.itl_max[rids], itl)
        self.d_last[:n] = now
        done = d["gen"][:n] >= d["out"][:n]
        if done.any():
            for i in np.flatnonzero(done):
                self._complete(int(rids[i]), int(d["gen"][i]), now)
                self.blocks_used -= int(d["blocks"][i])
            keep = ~done
            m = int(keep.sum())
            for c in self.COLS:
                d[c][:m] = d[c][:n][keep]
            self.d_last[:m] = self.d_last[:n][keep]
            self.n_dec = m

    def _finish_prefills(self, now: float) -> None:
        log, lay, d = self.log, self.layout, self.d
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
            self.blocks_used -= blocks - keep_blocks
            i = self.n_dec
            d["rid"][i], d["ctx"][i], d["plen"][i] = rid, total, total
            d["gen"][i], d["out"][i], d["blocks"][i] = gen, log.output[rid], keep_blocks
            self.d_last[i] = now
            self.n_dec += 1
        self.prefilling = still

    def _complete(self, rid: int, gen: int, now: float) -> None:
        self.log.generated[rid] = gen
        self.log.finish[rid] = now
        self.outstanding -= 1
        self.on_done(rid)
