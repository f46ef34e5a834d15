"""A llama.cpp server replica: fixed slots, a FIFO queue, prompts chunked into shared steps.

What one iteration of the server does (tools/server/server-context.cpp, update_slots() and
pre_decode() in llama.cpp 0c1e570, the version rkvprof builds):
  1. every slot that is generating adds its one next token to the batch, in slot order;
  2. then slots still processing a prompt add prompt tokens, in slot order, until the batch
     holds n_batch tokens (a prompt longer than what is left continues next iteration);
  3. the batch is one llama_decode (split by llama.cpp into n_ubatch physical batches);
  4. a slot whose prompt ended in this batch samples its first token; every generating slot
     samples its next one; a slot that reached its n_predict is released.
New requests are handed to free slots between iterations (the least recently used free slot,
as the server picks when no prompt cache matches; a slot's id is its llama.cpp sequence id, so
which slots decode together decides how the step is cut into ubatches, simulator/ubatch.py); when no slot is free they wait in FIFO
order. Without a unified KV cache each slot holds ctx_size / n_parallel tokens, and a request
that cannot fit its slot's context is rejected before it queues (simulation.simulate
checks prompt + output against the slot context; llama.cpp refuses a prompt longer than the
slot and cuts generation at its end); with kv_unified a slot may use the whole context and
the queue head waits until its prompt + output fits in the cells the active slots leave free.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np
import simpy

from rkvsim.models import Method, ModelSpec, kv_bytes_per_token

from rkvsim.simulator.cost_model import CostModel, StepBatch
from rkvsim.simulator.kv_memory import KVLayout
from rkvsim.simulator.records import RequestLog, StepLog
from rkvsim.simulator.slots_config import SlotsSchedulerConfig

_EMPTY = np.zeros(0, np.int64)


def slot_layout(model: ModelSpec, method: Method, cfg: SlotsSchedulerConfig) -> KVLayout:
    """The server's KV cells as a layout of one-token blocks (so reports read the same)."""
    per_token = kv_bytes_per_token(model, method)
    return KVLayout(method=method, block_size=1, block_bytes=per_token, num_blocks=cfg.ctx_size,
                    overhead_blocks=0.0, capacity_bytes=per_token * cfg.ctx_size,
                    weight_bytes_per_rank=model.weight_bytes)


class Slot:
    __slots__ = ("index", "rid", "prompt", "output", "done_prompt", "generated", "last_used", "last_token", "itl_max")

    def __init__(self, index: int):
        self.index = index
        self.rid = -1            # -1: idle
        self.prompt = self.output = self.done_prompt = self.generated = 0
        self.last_used = -1.0
        self.last_token = self.itl_max = 0.0

    @property
    def busy(self) -> bool:
        return self.rid >= 0

    @property
    def cells(self) -> int:
        """KV cells the slot's request will hold at its end (reserved on admission if unified)."""
        return self.prompt + self.output


class SlotReplica:
    """Same surface as replica.Replica (submit, waiting, outstanding, kv_fraction, routed_kv, steps)."""

    def __init__(self, env: simpy.Environment, index: int, layout: KVLayout, cost: CostModel,
                 cfg: SlotsSchedulerConfig, log: RequestLog, on_done: Callable[[int], None]):
        self.env, self.index, self.layout, self.cost, self.cfg, self.log = env, index, layout, cost, cfg, log
        self.on_done = on_done
        self.steps = StepLog()
        self.waiting: deque[int] = deque()
        self.slots = [Slot(i) for i in range(cfg.n_parallel)]
        # A warmed server: every slot used once, slot 0 longest ago (validate-serving warms them so).
        for s in self.slots:
            s.last_used = float(s.index - cfg.n_parallel)
        self.outstanding = 0
        self.cells_used = 0        # KV cells holding tokens now (all slots)
        self.cells_reserved = 0    # prompt + output of every active request (unified admission)
        self.max_active = 0        # most slots busy at once (the invariant the tests check)
        self._wake: simpy.Event | None = None
        self.process = env.process(self.run())

    @property
    def kv_fraction(self) -> float:
        return self.cells_used / self.layout.num_blocks

    routed_kv = kv_fraction       # no runs here: the router always sees the state itself

    @property
    def active(self) -> int:
        return sum(1 for s in self.slots if s.busy)

    # The paged replica's state names, so checks written for it read a slot replica too:
    # blocks are one-token cells here.
    @property
    def blocks_used(self) -> int:
        return self.cells_used

    @property
    def n_dec(self) -> int:
        return sum(1 for s in self.slots if s.busy and s.done_prompt == s.prompt)

    @property
    def prefilling(self) -> list[Slot]:
        return [s for s in self.slots if s.busy and s.done_prompt < s.prompt]

    def submit(self, rid: int) -> None:
        self.waiting.append(rid)
        self.outstanding += 1
        self.log.replica[rid] = self.index
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    # ---- between iterations: hand queued requests to free slots (FIFO) ---------------
    def _launch(self) -> None:
        log, cfg = self.log, self.cfg
        while self.waiting:
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            rid = self.waiting[0]
            p, o = int(log.prompt[rid]), int(log.output[rid])
            if cfg.kv_unified and self.cells_reserved + p + o > cfg.ctx_size:
                return      # FIFO: the head waits for cells; nobody overtakes it
            self.waiting.popleft()
            # llama-server's LRU pick: the oldest last use; among equals the highest slot index.
            s = min(free, key=lambda x: (x.last_used, -x.index))
            assert not s.busy and all(x.rid != rid for x in self.slots), f"request {rid} given a second slot"
            s.rid, s.prompt, s.output, s.done_prompt, s.generated = rid, p, o, 0, 0
            s.itl_max = 0.0
            self.cells_reserved += p + o
            log.first_sched[rid] = self.env.now
        self.max_active = max(self.max_active, self.active)

    # ---- the iteration loop ----------------------------------------------------------
    def run(self):
        env, cfg = self.env, self.cfg
        while True:
            self._launch()
            self.max_active = max(self.max_active, self.active)
            dec = [s for s in self.slots if s.busy and s.done_prompt == s.prompt]
            budget = cfg.step_tokens - len(dec)
            chunks: list[tuple[Slot, int]] = []
            for s in self.slots:
                if budget <= 0:
                    break
                if s.busy and s.done_prompt < s.prompt:
                    take = min(s.prompt - s.done_prompt, budget)
                    chunks.append((s, take))
                    budget -= take
            if not dec and not chunks:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            batch = StepBatch(
                prefill_new=np.array([c for _, c in chunks], np.int64) if chunks else _EMPTY,
                prefill_past=np.array([s.done_prompt for s, _ in chunks], np.int64) if chunks else _EMPTY,
                prefill_done=np.array([s.done_prompt + c >= s.prompt for s, c in chunks], bool) if chunks else None,
                # The token fed for a generating slot attends its whole context, itself included.
                decode_ctx=np.array([s.prompt + s.generated for s in dec], np.int64) if dec else _EMPTY,
                decode_prompt=np.array([s.prompt for s in dec], np.int64) if dec else _EMPTY,
                decode_seq=np.array([s.index for s in dec], np.int64) if dec else _EMPTY,
                prefill_seq=np.array([s.index for s, _ in chunks], np.int64) if chunks else _EMPTY,
            )
            dt = self.cost.step_time(batch)
            yield env.timeout(dt)
            self._apply(dec, chunks, env.now, dt)

    def _apply(self, dec: list[Slot], chunks: list[tuple[Slot, int]], now: float, dt: float) -> None:
        log = self.log
        new_tokens = sum(c for _, c in chunks)
        log.prefill_tokens += new_tokens
        self.cells_used += len(dec) + new_tokens
        assert self.cells_used <= self.layout.num_blocks, f"{self.cells_used} KV cells used of {self.layout.num_blocks}"
        if dec:
            itl = np.array([now - s.last_token for s in dec])
            log.add_itls(itl)
        for s, gap in zip(dec, itl if dec else ()):
            s.generated += 1
            s.itl_max = max(s.itl_max, float(gap))
            s.last_token = now
            if s.generated >= s.output:
                self._release(s, now)
        for s, c in chunks:
            s.done_prompt += c
            if s.done_prompt >= s.prompt:
                # The iteration that ends the prompt samples the first token.
                s.generated = 1
                s.last_token = now
                log.first_token[s.rid] = now
                if s.generated >= s.output:
                    self._release(s, now)
        self.steps.add(now, dt, len(dec) + len(chunks), self.kv_fraction, new_tokens)

    def _release(self, s: Slot, now: float) -> None:
        log, rid = self.log, s.rid
        assert rid >= 0 and np.isnan(log.finish[rid]), f"slot {s.index} released twice"
        log.generated[rid] = s.generated
        log.finish[rid] = now
        log.itl_max[rid] = s.itl_max if s.generated > 1 else np.nan
        # The last sampled token is never fed back, so the request held prompt + output - 1 cells.
        self.cells_used -= s.prompt + s.generated - 1
        self.cells_reserved -= s.prompt + s.output
        assert self.cells_used >= 0 and self.cells_reserved >= 0, "freed more KV cells than held"
        s.rid, s.last_used = -1, now
        self.outstanding -= 1
        self.on_done(rid)

