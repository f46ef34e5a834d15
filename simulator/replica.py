"""One serving replica (a TP group): continuous batching over a paged KV block pool.

The iteration loop is a SimPy process: form a batch, ask the cost model how long the
step takes, advance simulated time, apply the step. Decoding requests live in packed
numpy columns so that a step costs a handful of vector ops whatever the batch size;
prefills and finishes are handled per request (they happen once per request).

How a batch is formed is the scheduler policy's (simulator/policies.py), each rule citing
the upstream file it follows:
- vllm-v1 (`_plan_v1`): vllm/v1/core/sched/scheduler.py, Scheduler.schedule.
- vllm-v0 (`_plan_v0`): vLLM V0's scheduler as rkvsim modelled it first (FCFS; without chunked
  prefill a step is prefill-only when a waiting request can be admitted; with it every step
  carries all decodes plus prefill chunks; the most recently admitted decode is preempted).
- lmdeploy (`_plan_lmdeploy`): lmdeploy/pytorch/paging/scheduler.py and engine/engine.py.
A preempted request is recomputed later (its prompt and generated tokens are prefilled again).
Under prefix caching (vllm-v1) the blocks are real block ids in a BlockPool
(simulator/prefix_cache.py); otherwise they are counted.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable

import numpy as np
import simpy

from rkvsim.simulator.config import SchedulerConfig
from rkvsim.simulator.cost_model import CostModel, StepBatch
from rkvsim.simulator.kv_memory import KVLayout
from rkvsim.simulator.prefix_cache import BlockPool, block_keys
from rkvsim.simulator.records import RequestLog, StepLog

_EMPTY = np.zeros(0, np.int64)


class Replica:
    # Rows of the packed decode columns; ctx and gen are adjacent so one op advances both.
    # SEQ: admission order (vLLM v1's `running` list order; its tail is preempted first).
    CTX, GEN, RID, PLEN, OUT, BLK, SEQ = range(7)
    LAST, ITLMAX = range(2)

    def __init__(self, env: simpy.Environment, index: int, layout: KVLayout, cost: CostModel,
                 cfg: SchedulerConfig, log: RequestLog, on_done: Callable[[int], None], content=None):
        self.env, self.index, self.layout, self.cost, self.cfg, self.log = env, index, layout, cost, cfg, log
        self.on_done = on_done
        self.steps = StepLog()
        self.waiting: deque[int] = deque()
        # prefilling requests: [rid, tokens done, tokens to prefill, blocks held, admission seq]
        self.prefilling: list[list[int]] = []
        cap = cfg.max_batch_size
        self.D = np.zeros((7, cap), np.int64)
        self.F = np.zeros((2, cap))  # latest token time, largest inter-token gap so far
        self.policy = cfg.policy
        # Admission watermark: blocks kept free for running requests to grow into. vLLM V0
        # (vllm/core/block_manager.py, can_allocate) keeps 1%, at least one block; V1 keeps none by
        # default (its optional watermark, kv_cache_manager.py, applies to waiting and preempted
        # requests while others are scheduled); LMDeploy keeps none.
        # A watermark that is set keeps at least one block (V0's 1% of a small pool is not 0).
        w = cfg.watermark
        self.watermark = max(1, math.floor(w * layout.num_blocks + 1e-9)) if w else 0
        self.n_dec = 0
        self.blocks_used = 0
        self.outstanding = 0
        self.seq = 0
        self.prefill_counter = 0      # lmdeploy: decode steps left before prefill is tried again
        # Prefix caching: real block ids; `content(rid)` -> the request's segments [(id, tokens)].
        self.pool = BlockPool(layout.num_blocks) if self.policy == "vllm-v1" and cfg.enable_prefix_caching else None
        self.content = content
        self.held: dict[int, list[int]] = {}
        self._keys: dict[int, list[int]] = {}
        self._pub: dict[int, int] = {}          # blocks of each request already published
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
        plan_step = {"vllm-v1": self._plan_v1, "vllm-v0": self._plan_v0, "lmdeploy": self._plan_lmdeploy}[self.policy]
        while True:
            plan = plan_step()
            if plan is None and self.waiting and not self.n_dec and not self.prefilling:
                # Nothing runs and the head of the queue still does not fit: it never will (a
                # recompute of an evicting cache re-prefills its whole context). Reject it rather
                # than wait forever.
                self._reject_head()
                continue
            if plan is None:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            chunks, dec_need, n = plan
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
            n_before = self.n_dec
            if n:
                self._finish_decode_step(n, dec_need, now)
            for entry, chunk in chunks:
                entry[1] += chunk
            if chunks:
                self._finish_prefills(now)
            # The block ledger balances whenever a request joined, left or moved on.
            assert not (chunks or self.n_dec != n_before) or self._ledger() == self.blocks_used, \
                f"replica {self.index}: blocks_used {self.blocks_used} != blocks held {self._ledger()}"
            assert 0 <= self.blocks_used <= self.layout.num_blocks, f"replica {self.index}: {self.blocks_used} blocks used"
            self.steps.add(now, dt, n + len(chunks), self.kv_fraction, new_tokens)

    def _reject_head(self) -> None:
        rid = self.waiting.popleft()
        total = int(self.log.prompt[rid] + self.log.generated[rid])
        self.log.reject(rid, f"needs {self.layout.prefill_blocks(total)} KV blocks to (re)compute its {total}-token "
                             f"context, the replica has {self.layout.num_blocks}")
        self.outstanding -= 1
        self.on_done(rid)

    def _ledger(self) -> int:
        """Blocks held by the running and prefilling requests (what blocks_used must equal):
        with prefix caching, the distinct blocks they reference (shared blocks count once)."""
        if self.pool is not None:
            assert len(self.held) == self.n_dec + len(self.prefilling), "a running request without a block list"
            assert sum(map(len, self.held.values())) == self.pool.refs, "reference counts do not match the blocks held"
            return self.pool.used
        return int(self.D[self.BLK, :self.n_dec].sum()) + sum(e[3] for e in self.prefilling)

    # ---- blocks: counted, or real ids in the pool (prefix caching) -------------------
    def _free_blocks(self) -> int:
        return self.layout.num_blocks - self.blocks_used

    def _grow(self, rid: int, n: int) -> None:
        """Give request `rid` n more blocks (n < 0: free its last -n, or for a sliding window
        the oldest past the sink)."""
        pool = self.pool
        if pool is None:
            self.blocks_used += n
            return
        bl = self.held[rid]
        if n > 0:
            bl.extend(pool.allocate(n))
            self.blocks_used += n
            return
        if n < 0:
            if self.layout.window is not None and self.layout.whole_windows:
                at = min(self.layout.sink_blocks, len(bl) + n)
                drop = bl[at:at - n]
                del bl[at:at - n]
            else:
                drop = bl[n:]
                del bl[n:]
            self.pool.release(drop)
        self.blocks_used = self.pool.used

    def _apply_growth(self, extra_dec: np.ndarray, extra_pre: list[tuple[int, int]]) -> None:
        """Give the first len(extra_dec) decodes and the prefills [(blocks, rid)] their block changes:
        every shrink (a quantizer's residual folding into packed groups, a window moving on)
        before any growth, since the planner's check is net."""
        if self.pool is None:
            self.blocks_used += int(extra_dec.sum()) + sum(x for x, _rid in extra_pre)
            return
        nz = np.flatnonzero(extra_dec)
        grows = list(zip(extra_dec[nz].tolist(), self.D[self.RID, nz].tolist())) + extra_pre
        grows.sort(key=lambda g: g[0] > 0)      # shrinks first, order kept otherwise
        for x, rid in grows:
            self._grow(rid, x)

    def _release(self, rid: int, blocks: int, ctx: int) -> None:
        """Free everything `rid` holds (it finished or was preempted); cached blocks keep their keys."""
        if self.pool is None:
            self.blocks_used -= blocks
        else:
            self._publish(rid, ctx)
            self.pool.release(self.held.pop(rid))
            self._keys.pop(rid, None)
            self._pub.pop(rid, None)
            self.blocks_used = self.pool.used
        assert self.blocks_used >= 0, f"replica {self.index}: freed more blocks than held"

    def _shareable_blocks(self, length: int, n_tokens: int) -> int:
        spec, lay = self.layout.method.spec, self.layout
        if spec.prefix_sharing is None or (lay.model_window is not None and length > lay.model_window):
            return 0
        return int(spec.prefix_sharing(lay.method, length, n_tokens)) // lay.block_size

    def _block_keys(self, rid: int, n: int) -> list[int]:
        keys = self._keys.get(rid)
        if keys is None or len(keys) < n:
            # Without a content description every request's text is its own. (A tuple id: no int
            # segment id of simulator/content.py can equal it, and CPython hashes -1 like -2.)
            segs = self.content(rid) if self.content is not None else (
                ((7, rid), int(self.log.prompt[rid] + self.log.output[rid])),)
            keys = block_keys(segs, n, self.layout.block_size)
            self._keys[rid] = keys
        return keys[:n]

    def _publish(self, rid: int, ctx: int) -> None:
        # vllm/v1/core/kv_cache_manager.py allocate_slots -> cache_blocks: full blocks of computed
        # tokens are cached when they are scheduled; here, those the method holds in shareable form.
        # Prompt blocks are published when their chunk is scheduled; generated ones when the
        # request leaves (only its own recompute or its session's next turn can reuse them, and
        # both come later), which keeps the decode step free of per-request work.
        n = self._shareable_blocks(ctx, ctx)
        bl = self.held.get(rid)
        start = self._pub.get(rid, 0)
        if bl and n > start:
            n = min(n, len(bl))
            self.pool.publish(bl[start:n], self._block_keys(rid, n)[start:])
            self._pub[rid] = n

    # ---- vLLM V1 -----------------------------------------------------------------------
    def _plan_v1(self):
        """vllm/v1/core/sched/scheduler.py, Scheduler.schedule: one token budget, spent on the
        running requests in their order first (a decode takes 1 token, a partial prefill the
        rest of its prompt, capped by long_prefill_token_threshold and the budget), then on
        waiting requests in FCFS order. A running request that cannot get its blocks preempts
        the tail of `running` (the latest admitted, partial prefills included) until it fits or
        is itself the victim; a step that preempted admits nobody."""
        cfg, lay, D = self.cfg, self.layout, self.D
        budget = cfg.max_batched_tokens
        thr = cfg.long_prefill_token_threshold
        n = self.n_dec
        pre = self.prefilling
        want = [min(e[2] - e[1], thr) if thr else e[2] - e[1] for e in pre] if pre else []
        takes = want
        k = n                                       # decodes scheduled (the first k columns)
        if n + (sum(want) if pre else 0) > budget:
            order = sorted([(int(D[self.SEQ, i]), 0, i) for i in range(n)] + [(e[4], 1, j) for j, e in enumerate(pre)])
            left, sched_dec, takes = budget, np.zeros(n, bool), [0] * len(pre)
            for _seq, kind, i in order:
                if left <= 0:
                    break
                if kind == 0:
                    sched_dec[i] = True
                    left -= 1
                else:
                    takes[i] = min(want[i], left)
                    left -= takes[i]
            k = int(sched_dec.sum())
            if k < n:
                self._front(sched_dec)
        need = lay.decode_blocks_vec(D[self.PLEN, :k], D[self.CTX, :k] + 1) if k else _EMPTY
        extra_dec = need - D[self.BLK, :k] if k else _EMPTY
        extra_pre = [lay.prefill_blocks(e[1] + t) - e[3] if t else 0 for e, t in zip(pre, takes)] if pre else []
        total = int(extra_dec.sum()) + (sum(extra_pre) if pre else 0)
        victims = []
        if total > self._free_blocks():
            # Pop the tail of `running` (highest admission seq) until the rest fits. Under the
            # pool a victim frees only the blocks no one else references.
            tail = sorted([(int(D[self.SEQ, i]), 0, i) for i in range(self.n_dec)] +
                          [(e[4], 1, j) for j, e in enumerate(pre)], reverse=True)
            free = self._free_blocks()
            refs: dict[int, int] = {}
            for vic in tail:
                if total <= free:
                    break
                _seq, kind, i = vic
                victims.append(vic)
                rid = int(D[self.RID, i]) if kind == 0 else pre[i][0]
                if self.pool is None:
                    free += int(D[self.BLK, i]) if kind == 0 else pre[i][3]
                else:
                    for b in self.held[rid]:
                        r = refs.get(b, self.pool.ref[b]) - 1
                        refs[b] = r
                        free += r == 0
                if kind == 0:
                    if i < k:
                        total -= int(extra_dec[i])
                else:
                    total -= extra_pre[i]
            drop_dec = np.zeros(self.n_dec, bool)
            drop_pre = {i for _s, kind, i in victims if kind == 1}
            for _s, kind, i in victims:
                if kind == 0:
                    drop_dec[i] = True
            keep_pre = [j for j in range(len(pre)) if j not in drop_pre]
            takes = [takes[j] for j in keep_pre]
            extra_pre = [extra_pre[j] for j in keep_pre]
            kept_k = int((~drop_dec[:k]).sum())
            need = need[~drop_dec[:k]]
            extra_dec = extra_dec[~drop_dec[:k]]
            self._preempt_v1(victims, drop_dec, drop_pre)
            k = kept_k
        self._apply_growth(extra_dec, [(x, e[0]) for e, t, x in zip(self.prefilling, takes, extra_pre) if t and x])
        if k:
            D[self.BLK, :k] = need
        chunks = []
        for e, t, x in zip(self.prefilling, takes, extra_pre):
            if t:
                e[3] += x
                if self.pool is not None:
                    self._publish(e[0], e[1] + t)
                chunks.append((e, t))
        budget -= k + sum(takes)
        if not victims:
            self._admit_v1(budget, chunks, busy=bool(k or chunks))
        if not chunks and not k:
            return None
        return chunks, (need if k else None), k

    def _admit_v1(self, budget: int, chunks: list, busy: bool = False) -> None:
        """Scheduler.schedule's waiting loop: FCFS while budget and running slots last; the
        prefix cache's hit (at most all but the last prompt token, whole blocks) is computed
        already; a request whose blocks do not fit stops admission (it never preempts)."""
        cfg, lay, log = self.cfg, self.layout, self.log
        while self.waiting and budget > 0 and self.n_dec + len(self.prefilling) < cfg.max_batch_size:
            rid = self.waiting[0]
            total = int(log.prompt[rid] + log.generated[rid])
            hit_blocks: list[int] = []
            if self.pool is not None:
                n_hit = self._shareable_blocks(total, total - 1)
                if n_hit:
                    hit_blocks = self.pool.lookup(self._block_keys(rid, n_hit))
            computed = len(hit_blocks) * lay.block_size
            new = total - computed
            if cfg.long_prefill_token_threshold:
                new = min(new, cfg.long_prefill_token_threshold)
            if not cfg.chunked_prefill and new > budget:
                break
            take = min(new, budget)
            need = lay.prefill_blocks(computed + take)
            fresh = need - len(hit_blocks)
            evictable = self.pool.evictable(hit_blocks) if hit_blocks else 0
            if fresh + evictable > self._free_blocks() - (self.watermark if busy or chunks else 0):
                break
            self.waiting.popleft()
            if self.pool is not None:
                self.pool.touch(hit_blocks)
                self.blocks_used = self.pool.used
                self.held[rid] = list(hit_blocks)
                self._pub[rid] = len(hit_blocks)
                self._grow(rid, fresh)
                self._publish(rid, computed + take)
                log.prefix_hit_tokens += computed
                log.prefix_query_tokens += total
                if log.preemptions[rid] == 0:
                    log.cached_prompt[rid] = computed
            else:
                self.blocks_used += need
            self._start(rid, computed, total, need, take, chunks)
            budget -= take

    def _start(self, rid: int, done: int, total: int, blocks: int, take: int, chunks: list) -> None:
        """An admitted request joins the prefills (its tokens `done` already cached) with a first
        chunk of `take` tokens this step."""
        assert rid not in (e[0] for e in self.prefilling), f"request {rid} admitted twice"
        self.seq += 1
        entry = [rid, done, total, blocks, self.seq]
        self.prefilling.append(entry)
        chunks.append((entry, take))
        if np.isnan(self.log.first_sched[rid]):
            self.log.first_sched[rid] = self.env.now

    def _preempt_v1(self, victims: list, drop_dec: np.ndarray, drop_pre: set) -> None:
        """Preempt `victims` [(seq, 0 decode | 1 prefill, index)], given tail first: each goes to
        the front of the queue in that order (vLLM pops the tail and prepends each victim), so the
        earliest admitted ends up first."""
        D, F = self.D, self.F
        for _seq, kind, i in victims:
            if kind == 0:
                self._requeue_decode(i)
            else:
                rid, done, _total, blocks, _s = self.prefilling[i]
                self._release(rid, blocks, done)
                self.log.preemptions[rid] += 1
                self.waiting.appendleft(rid)
        if drop_pre:
            self.prefilling = [e for j, e in enumerate(self.prefilling) if j not in drop_pre]
        if drop_dec.any():
            keep = ~drop_dec
            m, n = int(keep.sum()), self.n_dec
            D[:, :m] = D[:, :n][:, keep]
            F[:, :m] = F[:, :n][:, keep]
            self.n_dec = m

    def _front(self, mask: np.ndarray) -> None:
        """Reorder the decode columns so those in `mask` come first (order kept within each part)."""
        n = self.n_dec
        idx = np.concatenate([np.flatnonzero(mask), np.flatnonzero(~mask)])
        self.D[:, :n] = self.D[:, idx]
        self.F[:, :n] = self.F[:, idx]

    def _preempt_prefill_at(self, j: int) -> None:
        rid, done, _total, blocks, _seq = self.prefilling.pop(j)
        self._release(rid, blocks, done)
        self.log.preemptions[rid] += 1
        self.waiting.appendleft(rid)

    # ---- LMDeploy ----------------------------------------------------------------------
    def _plan_lmdeploy(self):
        """LMDeploy's PyTorch engine: a step is all-prefill or all-decode (schedule(is_prefill)).
        engine.py's loop: is_prefill when nothing runs or its counter is down to 0; the counter is
        reset to `prefill_interval` at each prefill attempt and counts down every step, so
        prefill_interval - 1 decode steps separate two attempts. paging/scheduler.py
        _schedule_prefill admits waiting requests oldest first, the first always and more while
        their prompts stay within max_prefill_token_num, each with blocks for its whole prompt; it
        never evicts a running request to admit one. _schedule_decoding grows running requests
        oldest first; when blocks run out the newest running request is evicted and recomputed."""
        cfg, lay, log = self.cfg, self.layout, self.log
        if self.prefill_counter <= 0 or not self.n_dec:
            self.prefill_counter = cfg.prefill_interval
            chunks, tokens = [], 0
            while self.waiting and self.n_dec + len(chunks) < cfg.max_batch_size:
                rid = self.waiting[0]
                total = int(log.prompt[rid] + log.generated[rid])
                if chunks and tokens + total > cfg.max_batched_tokens:
                    break
                need = lay.prefill_blocks(total)
                if need > self._free_blocks() - (self.watermark if self.n_dec or chunks else 0):
                    break
                self.waiting.popleft()
                self.blocks_used += need
                self._start(rid, 0, total, need, total, chunks)
                tokens += total
            if chunks:
                self.prefill_counter -= 1
                return chunks, None, 0
        if not self.n_dec:
            return None
        self.prefill_counter -= 1
        need = self._reserve_decode()
        if not self.n_dec:
            return self._plan_lmdeploy()    # every decode was evicted: try their prefill instead
        return [], need, self.n_dec

    # ---- vLLM V0 (today's numbers) ----------------------------------------------------
    def _plan_v0(self):
        """Returns (prefill chunks [(entry, tokens)], decode block needs or None, decodes), or None if idle."""
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
                    self._preempt_prefill_at(len(self.prefilling) - 1)
                    return self._plan_v0()
                return None
            return chunks, dec_need, (self.n_dec if dec_need is not None else 0)
        chunks: list = []
        self._admit(cfg.max_batched_tokens, chunks, chunked=False)
        if chunks:
            return chunks, None, 0
        if self.n_dec:
            return [], self._reserve_decode(), self.n_dec
        return None

    def _admit(self, budget: int, chunks: list, chunked: bool) -> None:
        log, lay = self.log, self.layout
        while self.waiting and budget > 0 and self.n_dec + len(self.prefilling) < self.cfg.max_batch_size:
            rid = self.waiting[0]
            total = int(log.prompt[rid] + log.generated[rid])
            take = min(total, budget) if chunked else total
            if take > budget:
                break
            need = lay.prefill_blocks(take)
            busy = self.n_dec or self.prefilling
            if self.blocks_used + need > lay.num_blocks - (self.watermark if busy else 0):
                break
            self.waiting.popleft()
            self.blocks_used += need
            self._start(rid, 0, total, need, take, chunks)
            budget -= take

    def _grow_prefill(self, entry: list[int], budget: int) -> int:
        take = min(entry[2] - entry[1], budget)
        need = self.layout.prefill_blocks(entry[1] + take)
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
        need = lay.decode_blocks_vec(D[self.PLEN, :n], D[self.CTX, :n] + 1)
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
        self._requeue_decode(self.n_dec - 1)
        self.n_dec -= 1

    def _requeue_decode(self, i: int) -> None:
        """Decode column i is preempted: what it generated is kept for its recompute, its blocks
        are freed, it goes to the front of the queue (the caller drops the column)."""
        D, F, log = self.D, self.F, self.log
        rid = int(D[self.RID, i])
        log.generated[rid] = D[self.GEN, i]
        log.preemptions[rid] += 1
        log.last_token[rid] = F[self.LAST, i]
        log.itl_max[rid] = np.fmax(log.itl_max[rid], F[self.ITLMAX, i])
        self._release(rid, int(D[self.BLK, i]), int(D[self.CTX, i]))
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
                self._release(rid, int(D[self.BLK, i]), int(D[self.CTX, i]))
                self._complete(rid, int(D[self.GEN, i]), now)
            total = self.n_dec
            keep = np.ones(total, bool)
            keep[:n] = ~done
            m = int(keep.sum())
            D[:, :m] = D[:, :total][:, keep]
            F[:, :m] = F[:, :total][:, keep]
            self.n_dec = m

    def _finish_prefills(self, now: float) -> None:
        log, lay, D, F = self.log, self.layout, self.D, self.F
        still = []
        for entry in self.prefilling:
            rid, done, total, blocks, seq = entry
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
                self._release(rid, blocks, total)
                self._complete(rid, gen, now)
                continue
            # Eviction and SnapKV selection shrink the cache once the prompt is attended.
            keep_blocks = lay.decode_blocks(total, total)
            assert keep_blocks <= blocks, f"request {rid}: eviction grew its cache ({blocks} -> {keep_blocks} blocks)"
            self._grow(rid, keep_blocks - blocks)
            i = self.n_dec
            assert i < self.cfg.max_batch_size, f"replica {self.index}: more than max_batch_size running"
            D[:, i] = (total, gen, rid, total, log.output[rid], keep_blocks, seq)  # CTX GEN RID PLEN OUT BLK SEQ
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
