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
(simulator/prefix_cache.py), except those of a request whose text nobody else can look up,
held there as a count until it is preempted (see _own_text); otherwise they are counted.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from typing import Callable

import numpy as np
import simpy

from rkvsim.simulator.config import SchedulerConfig
from rkvsim.simulator.cost_model import CostModel, StepBatch
from rkvsim.simulator.decode_run import MIN_RUN, MIN_RUN_PASSING, Run, plan_run, timeout_at
from rkvsim.simulator.kv_memory import KVLayout
from rkvsim.simulator.lookup import array_min, array_sum, int_sum
from rkvsim.simulator.prefix_cache import BlockPool, block_keys
from rkvsim.simulator.records import RequestLog, StepLog

_EMPTY = np.zeros(0, np.int64)


def _fmax(a: float, b: float) -> float:
    """np.fmax of two floats (the larger; a NaN loses to a number) without a numpy call."""
    return b if a != a or b > a else a


class Replica:
    # Rows of the packed decode columns; ctx and gen are adjacent so one op advances both.
    # SEQ: admission order (vLLM v1's `running` list order; its tail is preempted first).
    CTX, GEN, RID, PLEN, OUT, BLK, SEQ = range(7)
    LAST, ITLMAX = range(2)
    # Event-skipping state (set in __init__; defaults here for replicas built without it in tests).
    preempted = 0
    spread = 1
    _run: Run | None = None
    _kv_seen: float | None = None
    # Kept beside the decode columns so that a step touches no column it need not: when not
    # None, every column's latest token came at _last_at (F[LAST] holds it too), so a step that
    # decodes them all has one gap; _rem_lb, a lower bound on the tokens any column has left
    # (exact unless a step left columns out), so a step that brings none to 0 needs no
    # completion check; _ctx_sum, the sum of their contexts (the CTX row).
    _last_at: float | None = None
    _rem_lb = 1 << 30
    _ctx_sum = 0
    # Lazy columns (vllm-v1): a decode step that every column takes with one shared gap writes
    # nothing to the columns. It counts in _lag, the steps _flush will add to CTX and GEN (a
    # column that joins meanwhile is stored less _lag, and _jt holds the _lag it joined at);
    # their last token came at _last_at; _gk, _gv: the largest gap from each lazy step on, as
    # (step, gap) with the gaps decreasing. Joins and completions read and write the columns as
    # _flush would leave them; everything else that reads or changes a column calls _flush
    # first. Where a request holds ceil(context / block_size) blocks (_cross), the plan takes
    # its growth from _cnt, the columns counted by context modulo block_size as of lazy step
    # _cnt_t0 (of _tick, the lazy steps so far), and BLK is left for _flush to recompute
    # (_blk_stale; _blk_behind, the blocks the row is behind in all; _planned: a step planned
    # so, in progress, whose block the columns hold).
    _lazy = False
    _cross = False
    _lag = 0
    _gk: list[int] = ()      # (lists from __init__; only a lazy replica appends)
    _gv: list[float] = ()
    _jt: np.ndarray | None = None
    _tick = 0
    _cnt: list[int] | None = None
    _cnt_t0 = 0
    _blk_stale = False
    _blk_behind = 0
    _no_run_before = -math.inf
    _refused = 0
    _fast = False
    min_run = MIN_RUN
    _planned = 0

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
        self._ones = np.ones(cap, np.int64)
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
        # A method whose blocks are never shared (spec.prefix_sharing None: GEAR, H2O, SnapKV)
        # publishes no key, so no admission hits and no cached block is evicted: block ids would
        # only count, which the counted path does with the same numbers at a fraction of the work.
        self.caching = self.policy == "vllm-v1" and cfg.enable_prefix_caching
        self.pool = BlockPool(layout.num_blocks) if self.caching and layout.method.spec.prefix_sharing is not None \
            else None
        self.content = content
        # Text of its own (no content description): a request's keys can be looked up by its own
        # recompute alone, so until it is first preempted its blocks need no ids. It holds them
        # as a count (`counted`, BlockPool.allocate_anon: how many is its BLK, or its prefill
        # entry's blocks, as without a pool); its first `_hw` blocks are those _publish has
        # published. When it is preempted, or frees a published block (_frees_published), its
        # blocks are named and it goes on as any other (_name_counted); when it finishes, its
        # published blocks go to the free queue as one run of keys nobody can reach
        # (BlockPool.release_anon). (Not even a window's: its own recompute, chunk by chunk,
        # publishes under the keys of its first blocks while they are cached.)
        self._own_text = self.pool is not None and content is None
        self._share = layout.method.spec.prefix_sharing
        self._drop_floor = self._drop_floor_of(layout)
        self.held: dict[int, list[int]] = {}
        self.counted: set[int] = set()
        self._hw: dict[int, int] = {}           # counted: how many of its first blocks are published
        self._keys: dict[int, list[int]] = {}
        self._pub: dict[int, int] = {}          # blocks of each request already published
        self._wake: simpy.Event | None = None
        # Event skipping (simulator/decode_run.py): on unless step_by_step or the cost model
        # cannot cost a run; `quiet` (set by the simulation) when a completion feeds nothing back.
        self.skip = hasattr(cost, "decode_run")
        self._decode_step = getattr(cost, "decode_step", None)   # step_time of a decode-only step
        self._mixed_step = getattr(cost, "mixed_step", None)     # ... of a step with prefill chunks
        # Where every cache holds its whole context, the decodes' held tokens are _ctx_sum + n.
        self._by_sum = getattr(cost, "holds_whole_context", False)
        self._lazy = self.policy == "vllm-v1"
        self._cross = self._lazy and layout.ceil_blocks
        self._jt = np.zeros(cap, np.int64)
        # Replica.run's short path for the most frequent step; the shortest run worth planning
        # (decode_run.py) is longer where it makes single steps cheap.
        self._fast = self._cross and (self._by_sum or self._decode_step is not None)
        self.min_run = MIN_RUN_PASSING if self._fast else MIN_RUN
        self._gk, self._gv = [], []
        self.quiet = False
        self.horizon = None      # has .time_ahead(k): the k-th next arrival anywhere
        self.spread = 1          # replicas sharing the arrivals (a run is cut by a request sent here)
        self._run: Run | None = None
        self.runs = self.run_steps = 0   # runs taken and the steps they covered (bench and tests)
        self.passed = 0                  # steps finished in passing, without an event (Replica.run)
        self.preempted = 0               # preemptions so far (a plan that preempted starts no run)
        self.process = env.process(self.run())

    # ---- routing-visible state -------------------------------------------------------
    @property
    def kv_fraction(self) -> float:
        return self.blocks_used / self.layout.num_blocks

    @property
    def routed_kv(self) -> float:
        """kv_fraction as a router sees it now: inside a run whose steps since the last applied one
        were only counted (sync with `reads`), the count."""
        return self.kv_fraction if self._kv_seen is None else self._kv_seen

    def submit(self, rid: int) -> None:
        run = self._run
        if run is not None and not run.sealed:
            # The request is seen when the step in progress ends, as step by step (the steps
            # before it are applied when the run ends, or when someone reads this replica).
            cut = min(int(run.t.searchsorted(self.env.now, "right")), run.end) + 1
            if cut < run.end:
                run.end = cut
                self.process.interrupt()
        self.waiting.append(rid)
        self.outstanding += 1
        self.log.replica[rid] = self.index
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _steps_to_horizon(self, now: float | None = None) -> int:
        """About how many steps until the next arrival here, from the last step's duration (a guess:
        too few only means another run starts there, too many only wasted arrays). now: the time
        the replica is at, if ahead of the clock (a step finished in passing, Replica.run)."""
        h = self.horizon.time_ahead(self.spread) if self.horizon is not None else math.inf
        if h == math.inf or not len(self.steps):
            return 1 << 30
        return int((h - (self.env.now if now is None else now)) / max(self.steps.dt[-1], 1e-9) * 1.25) + 2

    def _run_horizon(self, n: int, now: float | None = None) -> int | None:
        """_steps_to_horizon for planning a run from the n decoding columns, or None where plan_run
        would refuse it anyway, before anything is copied: with nobody waiting (the run would not
        be sealed), an arrival due in fewer than min_run steps (between arrivals at short gaps this
        is most decode steps); where a completion ends the run (someone waits, or completions feed
        the workload), a completion due that soon."""
        horizon = self._steps_to_horizon(now)
        least = self.min_run
        if not self.waiting and horizon < least:
            return None
        if (self.waiting or not self.quiet) and self._rem_lb < least and \
                int(array_min(self.D[self.OUT, :n] - self.D[self.GEN, :n])) - self._lag < least:
            return None
        return horizon

    def _no_run(self, n: int, at: float) -> int | None:
        """_run_horizon for the step at `at` where nobody waits. Where it is None because the next
        arrival is too close (on a quiet replica), no run is tried again before that arrival, and
        after r such refusals in a row not before the 2^(r-1)-th next one, at most the 8th
        (_no_run_before): which steps try a run changes no number, only the time spent trying,
        and where arrivals come faster than runs pay, trying at each costs a tenth of the loop."""
        horizon = self._run_horizon(n, at)
        if horizon is None and self.quiet and self.horizon is not None:
            self._refused = min(self._refused + 1, 4)
            h = self.horizon.time_ahead(self.spread << (self._refused - 1))
            self._no_run_before = h if h != math.inf else self.horizon.time_ahead(self.spread)
        else:
            self._refused = 0
        return horizon

    def _next_here(self) -> float:
        """When the next request known in advance comes to this replica: alone, the next
        open-loop arrival (every request comes here); behind a router it is not known."""
        if self.spread != 1 or self.horizon is None:
            return math.inf
        return self.horizon.time_ahead(1)

    def _steps_to_admission(self) -> int:
        """Steps a run may take before the scheduler next tries to admit the queue head with
        what may have changed: every step for vLLM (the admission check is monotone within a
        run, decode_run.py); LMDeploy tries only when its counter has run out, and by then a
        completion may have freed a slot, so the run stops before that step."""
        if self.policy != "lmdeploy" or not self.waiting:
            return 1 << 30
        return max(self.prefill_counter, 0) + 1

    def _evict_room(self) -> int | None:
        """Blocks a run may allocate before it evicts a cached block (the pool's keyless free
        blocks), when an eviction could let the waiting queue's head in: it has prefix-cache hits
        (decode_run.py); None otherwise. A run publishes nothing, so a head without hits now has
        none until the run ends."""
        if self.pool is None or not self.waiting:
            return None
        rid = self.waiting[0]
        hits = self._prefix_hits(rid, int(self.log.prompt[rid] + self.log.generated[rid]))
        return self.pool.bare if hits else None

    def sync(self, reads: str | None = None) -> None:
        """Bring the state up to now inside a run: steps ended by now applied, the step in
        progress planned (what a router reading this replica would see step by step).
        reads: what the router reads, when it reads only load ("kv": routed_kv and the queue;
        "outstanding"). If the steps since the last applied one finish nobody and (with the
        prefix cache) free no block, none of that changes but the blocks the run's growth takes:
        those are counted, and the steps are applied later (at the run's end, or a later sync),
        the same as now. Applying part of a run costs most of what the whole run costs."""
        run = self._run
        if run is None:
            self._flush()                               # a router may read the columns
            return
        j = min(int(run.t.searchsorted(self.env.now, "right")), run.end)
        if j <= run.fin:
            return
        if reads is not None:
            seen = self._blocks_after(run, j, reads)
            if seen is not None:
                self._kv_seen = seen / self.layout.num_blocks
                return
        self._apply_run(run, j)

    def _blocks_after(self, run: Run, j: int, reads: str = "outstanding") -> int | None:
        """blocks_used once steps up to j are applied (and step j + 1 planned), when no request
        finishes in steps fin+1..j; with the prefix cache, also none of the growth planned
        meanwhile is a shrink (a freed block may be shared); else None. Counted blocks are in the
        run's sums, finishes included: a router reading only "kv" (blocks and the queue, which a
        run leaves alone) gets them whoever finished."""
        if self.pool is None and reads == "kv":
            return int(run.used_plan[j] if j < run.end else run.used_fin[j - 1])
        cols = run.alive.nonzero()[0]
        rem = run.rem[cols]
        if ((rem > run.fin) & (rem <= j)).any():
            return None
        nxt = j < run.end
        last_plan = j + 1 if nxt else j
        if self.pool is None:
            return int(run.used_plan[last_plan - 1] if nxt else run.used_fin[j - 1])
        p0 = run.planned + 1
        if last_plan < p0:
            return self.pool.used
        grow = run.grow[p0 - 2:last_plan - 1, cols]
        if (grow < 0).any():
            return None
        return self.pool.used + int(array_sum(grow, None))

    def settled(self) -> float:
        """The time up to which this replica's log is final: now, or inside a run the end of its
        last applied step (the steps after it, completions included, end no earlier)."""
        run = self._run
        if run is None:
            return self.env.now
        return float(run.t[run.fin - 1]) if run.fin else float(run.t[0] - run.dt[0])

    # ---- the event loop --------------------------------------------------------------
    def run(self):
        env = self.env
        plan_step = {"vllm-v1": self._plan_v1, "vllm-v0": self._plan_v0, "lmdeploy": self._plan_lmdeploy}[self.policy]
        budget, fast = self.cfg.max_batched_tokens, self._fast
        # Where a step of that kind ends before anything else in the simulation happens (the
        # event queue's next time) and its completions schedule nothing (quiet), no event can
        # tell it from a step in which the clock moved: it is finished in passing, at `ahead`,
        # the end time its timeout would have had (the same addition). The clock catches up
        # (decode_run.timeout_at) at the next step that yields or before the general path runs.
        ahead = None
        while True:
            n = self.n_dec
            at = env.now if ahead is None else ahead
            if fast and n and not self.waiting and not self.prefilling and not self.held and \
                    self._last_at is not None and n <= budget and \
                    not (self.skip and at >= self._no_run_before and self._no_run(n, at) is not None):
                # The most frequent step, _plan_v1's and the loop's below with what they would find
                # decided: every column decodes, nobody waits or prefills, no run is tried.
                if self._plan_short():
                    dt = self._step_time((), n)
                    now = at + dt
                    if self.quiet and now < env.peek():
                        ahead = now
                        self.passed += 1
                    else:
                        yield env.timeout(dt) if ahead is None else timeout_at(env, now)
                        ahead = None
                        assert env.now == now, "a step ended off its time"
                    self._finish_decode_step(n, None, now)
                    self._log_step(now, dt, n, 0, self.n_dec != n)
                    continue
            if ahead is not None:
                yield timeout_at(env, ahead)
                ahead = None
            pre_before = self.preempted
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
            # A plan that preempted may not have tried admission (vllm-v1 admits nobody in that
            # step; vllm-v0 without chunking admitted before it preempted), and the victim's blocks
            # are free now: the next plan may admit, so it is not the start of a run.
            # A prompt part-way through its prefill that got no chunk (vllm-v0: its blocks did not
            # fit) continues once blocks free up, so it, too, rules a run out.
            if self.skip and not chunks and n and n == self.n_dec and not self.prefilling and \
                    (self.preempted == pre_before or not self.waiting) and \
                    (horizon := self._run_horizon(n)) is not None:
                self._flush()
                self._planned = 0
                if dec_need is None:                    # a lazy plan: the columns hold its blocks now
                    dec_need = D[self.BLK, :n].copy()
                Dc = D[:, :n].copy()                    # the run keeps the batch as it starts
                run = plan_run(Dc[self.RID], Dc[self.CTX], Dc[self.GEN], Dc[self.OUT], Dc[self.PLEN],
                               dec_need, self.layout, self.cost,
                               self.blocks_used, bool(self.waiting), self.quiet, self.pool is not None, env.now,
                               horizon, self._next_here(),
                               n >= self.cfg.max_batch_size, self._steps_to_admission(), self._evict_room(),
                               self.min_run)
                if run is not None:
                    self._run = run
                    while True:
                        target = float(run.t[run.end - 1])
                        try:
                            yield timeout_at(env, target)
                            break
                        except simpy.Interrupt:
                            continue                     # cut short by a submit: wake earlier
                    self._apply_run(run, run.end)
                    self._run = None
                    self.runs += 1
                    self.run_steps += run.end
                    continue
            dt = self._step_time(chunks, n)
            yield env.timeout(dt)
            now = env.now
            new_tokens = sum(t for _e, t in chunks)
            self.log.prefill_tokens += new_tokens
            n_before = self.n_dec
            if n:
                self._finish_decode_step(n, dec_need, now)
            for entry, chunk in chunks:
                entry[1] += chunk
            if chunks:
                self._finish_prefills(now)
            self._log_step(now, dt, n + len(chunks), new_tokens, bool(chunks) or self.n_dec != n_before)

    def _step_time(self, chunks: list, n: int) -> float:
        """Seconds of a step of prefill `chunks` [(entry, tokens)] beside the first n decodes."""
        D = self.D
        if chunks:                                       # each chunk: tokens, tokens before it, prompt done
            new = [t for _e, t in chunks]
            past = [e[1] for e, _t in chunks]
            done = [e[1] + t >= e[2] for e, t in chunks]
        if self._by_sum and (chunks or n):               # no array of contexts to build
            # The first n columns decode (all of them, or a v1 budget's front), a token more each.
            held = (self._ctx_sum if n == self.n_dec else int_sum(D[self.CTX, :n])) + n if n else 0
            return self.cost.mixed_step_held(new, past, sum(done), n, held) if chunks else \
                self.cost.decode_step_held(n, held)
        if chunks and self._mixed_step is not None:      # no StepBatch to build either
            return self._mixed_step(new, past, sum(done), D[self.CTX, :n] + (1 + self._lag) if n else _EMPTY,
                                    D[self.PLEN, :n] if n else _EMPTY)
        if chunks or not n or self._decode_step is None:
            return self.cost.step_time(StepBatch(
                prefill_new=np.array(new, np.int64) if chunks else _EMPTY,
                prefill_past=np.array(past, np.int64) if chunks else _EMPTY,
                prefill_done=np.array(done, bool) if chunks else None,
                decode_ctx=D[self.CTX, :n] + (1 + self._lag) if n else _EMPTY,
                decode_prompt=D[self.PLEN, :n] if n else _EMPTY,
            ))
        return self._decode_step(D[self.CTX, :n] + (1 + self._lag), D[self.PLEN, :n])   # no StepBatch either

    def _log_step(self, now: float, dt: float, batch: int, new_tokens: int, moved: bool) -> None:
        """Checks and the step log after a step; moved: a request joined, left or moved on (then
        the block ledger must balance)."""
        assert not moved or self._ledger() == self.blocks_used, \
            f"replica {self.index}: blocks_used {self.blocks_used} != blocks held {self._ledger()}"
        assert 0 <= self.blocks_used <= self.layout.num_blocks, f"replica {self.index}: {self.blocks_used} blocks used"
        self.steps.add(now, dt, batch, self.kv_fraction, new_tokens)

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
            assert len(self.held) + len(self.counted) == self.n_dec + len(self.prefilling), \
                "a running request without blocks"
            # Each request's blocks (shared ones once per holder) are its references.
            assert self._held_blocks() == self.pool.refs, "reference counts do not match the blocks held"
            return self.pool.used
        return self._held_blocks()

    def _held_blocks(self) -> int:
        # (lazy blocks: the row plus the growth it is behind, _flush checks the two agree)
        # (tolist and sum: a numpy reduction costs more on tens of elements)
        return sum(self.D[self.BLK, :self.n_dec].tolist()) + self._blk_behind + sum(e[3] for e in self.prefilling)

    # ---- blocks: counted, or real ids in the pool (prefix caching) -------------------
    def _free_blocks(self) -> int:
        return self.layout.num_blocks - self.blocks_used

    def _grow(self, rid: int, n: int, held: int = -1) -> None:
        """Give request `rid` n more blocks (n < 0: free its last -n, or for a sliding window
        the oldest past the sink; `held`: the blocks it holds before, for a counted request)."""
        pool = self.pool
        if pool is None:
            self.blocks_used += n
            return
        if rid in self.counted:
            if n >= 0:
                pool.allocate_anon(n)
                self.blocks_used += n
                return
            assert held >= -n, f"request {rid} frees {-n} blocks of {held}"
            if not self._frees_published(self._hw.get(rid, 0), held, n):
                pool.release_anon(-n, 0)
                self.blocks_used = pool.used
                return
            self._name_counted(rid, held)
        bl = self.held[rid]
        if n > 0:
            bl.extend(pool.allocate(n))
            self.blocks_used += n
            return
        if n < 0:
            span = self._dropped(len(bl), n)
            drop = bl[span]
            del bl[span]
            self.pool.release(drop)
        self.blocks_used = self.pool.used

    @staticmethod
    def _drop_floor_of(layout: KVLayout) -> int:
        """A shrink by -n of a request holding `held` blocks frees -n of them from index
        min(floor, held + n): its last -n, or for a whole-block sliding window the oldest past
        the sink (the floor is the sink's blocks)."""
        return layout.sink_blocks if layout.window is not None and layout.whole_windows else 1 << 62

    def _frees_published(self, hw: int, held: int, n: int) -> bool:
        """Whether a shrink by -n of a request holding `held` blocks, whose first `hw` are
        published, frees one of those (_drop_floor_of)."""
        return min(self._drop_floor, held + n) < hw

    def _dropped(self, held: int, n: int) -> slice:
        """Which of a request's `held` blocks (ids in order) a shrink by -n frees (_drop_floor_of)."""
        at = min(self._drop_floor, held + n)
        return slice(at, at - n)

    def _apply_growth(self, extra_dec: np.ndarray, extra_pre: list[tuple[int, int]], total: int | None = None) -> None:
        """Give the first len(extra_dec) decodes and the prefills [(blocks, rid)] their block changes:
        every shrink (a quantizer's residual folding into packed groups, a window moving on)
        before any growth, since the planner's check is net. total: their sum, if known."""
        if total is None:
            total = int_sum(extra_dec) + sum(x for x, _rid in extra_pre)
        if self.pool is None:
            self.blocks_used += total
            return
        if not self.held and (not self.layout.decode_shrinks or not len(extra_dec) or array_min(extra_dec) >= 0) \
                and (not extra_pre or all(x > 0 for x, _rid in extra_pre)):
            # Counted requests growing only: one allocation of the total is all the pool sees.
            if total:
                self.pool.allocate_anon(total)
                self.blocks_used = self.pool.used
            return
        nz = extra_dec.nonzero()[0]
        grows = list(zip(extra_dec[nz].tolist(), self.D[self.RID, nz].tolist())) + extra_pre
        if not grows:
            return
        if min(grows)[0] < 0:
            # (the blocks each holds before: decodes' BLK, prefills' entries)
            nd, blk = len(nz), self.D[self.BLK]
            pre = {e[0]: e[3] for e in self.prefilling} if len(grows) > nd else None
            for j, (x, rid) in enumerate(grows):    # shrinks first, order kept otherwise
                if x < 0:
                    self._grow(rid, x, int(blk[nz[j]]) if j < nd else pre[rid])
            grows = [g for g in grows if g[0] > 0]
        self._allocate_in_order(grows)
        self.blocks_used = self.pool.used

    def _allocate_in_order(self, grows: list[tuple[int, int]]) -> None:
        """Give each (blocks, rid) its blocks from one allocation, in list order: the free queue
        pops the same blocks as one allocation per request would."""
        pool, held = self.pool, self.held
        pool.allocate_anon(sum(x for x, _rid in grows))
        if held:                                # counted requests need nothing more
            for x, rid in grows:
                if rid in held:
                    held[rid].extend(pool.name(x))

    def _release(self, rid: int, blocks: int, ctx: int, done: bool = False) -> None:
        """Free everything `rid` holds (it finished: done, or was preempted); cached blocks keep their keys."""
        if self.pool is None:
            self.blocks_used -= blocks
        else:
            self._publish(rid, ctx, blocks)
            if rid in self.counted:
                if done:                             # its keys can never be looked up again
                    self.counted.remove(rid)
                    self.pool.release_anon(blocks, self._hw.pop(rid, 0))
                else:                                # preempted: its recompute will look them up
                    self._name_counted(rid, blocks)
            if rid in self.held:
                self.pool.release(self.held.pop(rid))
            self._keys.pop(rid, None)
            self._pub.pop(rid, None)
            self.blocks_used = self.pool.used
        assert self.blocks_used >= 0, f"replica {self.index}: freed more blocks than held"

    def _counts(self, rid: int) -> bool:
        """Whether `rid`, being admitted, holds its blocks as a count (see __init__, _own_text):
        until it is first preempted."""
        return self._own_text and self.log.preemptions[rid] == 0

    def _name_counted(self, rid: int, n: int) -> None:
        """A counted request's n blocks get ids, its published ones their keys: from here on it
        is held and published as any other."""
        self.counted.remove(rid)
        hw = self._hw.pop(rid, 0)
        self.held[rid] = ids = self.pool.name(n)
        if hw:
            keys = self._block_keys(rid, hw)
            assert not any(k in self.pool.block_of for k in keys), "a counted request's key is cached twice"
            self.pool.publish(ids[:hw], keys)

    def _shareable_blocks(self, length: int, n_tokens: int) -> int:
        share, lay = self._share, self.layout
        if share is None or (lay.model_window is not None and length > lay.model_window):
            return 0
        return int(share(lay.method, length, n_tokens)) // lay.block_size

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

    def _publish(self, rid: int, ctx: int, held: int = 0) -> None:
        # vllm/v1/core/kv_cache_manager.py allocate_slots -> cache_blocks: full blocks of computed
        # tokens are cached when they are scheduled; here, those the method holds in shareable form.
        # Prompt blocks are published when their chunk is scheduled; generated ones when the
        # request leaves (only its own recompute or its session's next turn can reuse them, and
        # both come later), which keeps the decode step free of per-request work.
        n = self._shareable_blocks(ctx, ctx)
        start = self._pub.get(rid, 0)
        if rid in self.counted:                 # held: the blocks it holds
            if held and n > start:
                n = min(n, held)
                # pool.publish(blocks start..n-1) below: a block past the text's last full block
                # gets no key (zip), and publishing starts where it last ended (start >= _hw).
                hw = min(n, int(self.log.prompt[rid] + self.log.output[rid]) // self.layout.block_size)
                if hw > self._hw.get(rid, 0):
                    self._hw[rid] = hw
                self._pub[rid] = n
            return
        bl = self.held.get(rid)
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
            self._flush()
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
        extra_pre = [lay.prefill_blocks(e[1] + t) - e[3] if t else 0 for e, t in zip(pre, takes)] if pre else []
        need = None                                 # None: a lazy plan (the class), its growth counted
        if k == n and self._cross and not self.held and k and (not pre or min(extra_pre) >= 0):
            dec_grow = self._crossers()
            total = dec_grow + (sum(extra_pre) if pre else 0)
            extra_dec = _EMPTY
            if total > self._free_blocks():         # someone is preempted: the columns are needed
                need = self._plan_blocks(k)
                extra_dec = need - D[self.BLK, :k]
                total = int_sum(extra_dec) + (sum(extra_pre) if pre else 0)
        else:
            need = self._plan_blocks(k)
            extra_dec = need - D[self.BLK, :k] if k else _EMPTY
            total = int_sum(extra_dec) + (sum(extra_pre) if pre else 0)
        cred_dec, cred_pre = extra_dec, extra_pre         # each one's net change to the blocks in use
        if self.held and ((k and array_min(extra_dec) < 0) or any(x < 0 for x in extra_pre)):
            cred_dec, cred_pre = self._shrink_credit(extra_dec, extra_pre, pre)
            total = int_sum(cred_dec) + sum(cred_pre)
        victims = []
        if total > self._free_blocks():
            self._flush()
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
                if self.pool is None or rid in self.counted:     # held as a count: all of it frees
                    free += int(D[self.BLK, i]) if kind == 0 else pre[i][3]
                else:
                    free += self.pool.would_free(self.held[rid], refs)
                if kind == 0:
                    if i < k:
                        total -= int(cred_dec[i])
                else:
                    total -= cred_pre[i]
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
        self._apply_growth(extra_dec, [(x, e[0]) for e, t, x in zip(self.prefilling, takes, extra_pre) if t and x],
                           None if victims or self.held else total)
        if need is None:
            if k:
                self._planned_lazily(dec_grow)
        elif k:
            D[self.BLK, :k] = need
        chunks = []
        for e, t, x in zip(self.prefilling, takes, extra_pre):
            if t:
                e[3] += x
                if self.pool is not None:
                    self._publish(e[0], e[1] + t, e[3])
                chunks.append((e, t))
        budget -= k + sum(takes)
        if not victims:
            self._admit_v1(budget, chunks, busy=bool(k or chunks))
        if not chunks and not k:
            return None
        return chunks, (need if k else None), k

    def _plan_blocks(self, k: int) -> np.ndarray:
        """Blocks each of the first k decodes holds once this step is planned (the lazy steps
        counted in, and a lazy plan's blocks written out first)."""
        if not k:
            return _EMPTY
        if self._blk_stale:
            self._flush()
        D = self.D
        return self.layout.decode_blocks_vec(D[self.PLEN, :k], D[self.CTX, :k] + (self._lag + 1))

    def _plan_short(self) -> bool:
        """_plan_v1 of a step in which every column decodes and nobody waits or prefills (lazily:
        its blocks counted, _crossers), where they fit (else False, and nothing is done): counted
        requests growing only, so _apply_growth's one allocation."""
        grow = self._crossers()
        if grow > self._free_blocks():
            return False
        self._apply_growth(_EMPTY, [], grow)
        self._planned_lazily(grow)
        return True

    def _planned_lazily(self, grow: int) -> None:
        """The decodes were planned a step (taking `grow` blocks) without writing BLK (_flush)."""
        self._blk_stale, self._planned = True, 1
        self._blk_behind += grow

    def _shrink_credit(self, extra_dec: np.ndarray, extra_pre: list, pre: list) -> tuple[np.ndarray, list]:
        """extra_dec and extra_pre with each shrink of a request holding block ids replaced by
        minus the blocks its drop really frees: a dropped block another request still references
        stays in use. vllm/v1/core/kv_cache_manager.py allocate_slots frees the blocks a sliding
        window skips (remove_skipped_blocks) before it compares what it must allocate with the
        pool's free blocks, so a shared block falling out of one request's window frees nothing
        then. Each block is credited to the last of its holders to drop it (a conservative count
        if that one is preempted instead: its credit goes, and what its release frees is counted
        from the pool's own references)."""
        D, refs = self.D, {}

        def frees(rid: int, x: int) -> int:
            bl = self.held.get(rid)
            if bl is None:                             # counted: its blocks are its own
                return -x
            return self.pool.would_free(bl[self._dropped(len(bl), x)], refs)

        cred_dec = extra_dec.copy()
        for i in (extra_dec < 0).nonzero()[0].tolist():
            cred_dec[i] = -frees(int(D[self.RID, i]), int(extra_dec[i]))
        cred_pre = [-frees(e[0], x) if x < 0 else x for e, x in zip(pre, extra_pre)]
        return cred_dec, cred_pre

    def _prefix_hits(self, rid: int, total: int) -> list[int]:
        """The cached blocks a waiting request of `total` tokens would reuse: the prefix cache's
        hit, at most all but the last token, whole blocks."""
        if self.pool is None or self._counts(rid):       # nothing of it is cached
            return []
        n_hit = self._shareable_blocks(total, total - 1)
        return self.pool.lookup(self._block_keys(rid, n_hit)) if n_hit else []

    def _admit_v1(self, budget: int, chunks: list, busy: bool = False) -> None:
        """Scheduler.schedule's waiting loop: FCFS while budget and running slots last; the
        prefix cache's hit (at most all but the last prompt token, whole blocks) is computed
        already; a request whose blocks do not fit stops admission (it never preempts)."""
        cfg, lay, log = self.cfg, self.layout, self.log
        while self.waiting and budget > 0 and self.n_dec + len(self.prefilling) < cfg.max_batch_size:
            rid = self.waiting[0]
            total = int(log.prompt[rid] + log.generated[rid])
            hit_blocks = self._prefix_hits(rid, total)
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
                if self._counts(rid):
                    self.counted.add(rid)
                else:
                    self.held[rid] = list(hit_blocks)
                self._pub[rid] = len(hit_blocks)
                self._grow(rid, fresh)
                self._publish(rid, computed + take, need)
                log.prefix_hit_tokens += computed
                log.prefix_query_tokens += total
                if log.preemptions[rid] == 0:
                    log.cached_prompt[rid] = computed
            else:
                self.blocks_used += need
                if self.caching:
                    log.prefix_query_tokens += total      # looked up, never found (nothing is shared)
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
        if math.isnan(self.log.first_sched[rid]):
            self.log.first_sched[rid] = self.env.now

    def _preempt_v1(self, victims: list, drop_dec: np.ndarray, drop_pre: set) -> None:
        """Preempt `victims` [(seq, 0 decode | 1 prefill, index)], given tail first: each goes to
        the front of the queue in that order (vLLM pops the tail and prepends each victim), so the
        earliest admitted ends up first."""
        for _seq, kind, i in victims:
            if kind == 0:
                self._requeue_decode(i)
            else:
                rid, done, _total, blocks, _s = self.prefilling[i]
                self._requeue(rid, blocks, done)
        if drop_pre:
            self.prefilling = [e for j, e in enumerate(self.prefilling) if j not in drop_pre]
        if drop_dec.any():
            self._drop_columns(drop_dec)

    def _drop_columns(self, drop: np.ndarray, gone: list[int] | None = None) -> int:
        """Remove the decode columns marked in `drop` (over the first len(drop); `gone`: their
        indices, if known), the others kept in order with their lazy join steps; returns how many
        are left."""
        D, F, jt, total = self.D, self.F, self._jt, self.n_dec
        if gone is None:
            gone = drop.nonzero()[0].tolist()
        if len(gone) == 1:                               # (most often: one shift of the columns after it)
            i, m = gone[0], total - 1
            D[:, i:m] = D[:, i + 1:total]
            F[:, i:m] = F[:, i + 1:total]
            if self._lag:
                jt[i:m] = jt[i + 1:total]
        else:
            keep = np.ones(total, bool)
            keep[:len(drop)] = ~drop
            m = int_sum(keep)
            D[:, :m] = D[:, :total][:, keep]
            F[:, :m] = F[:, :total][:, keep]
            if self._lag:
                jt[:m] = jt[:total][keep]
        self.n_dec = m
        return m

    def _front(self, mask: np.ndarray) -> None:
        """Reorder the decode columns so those in `mask` come first (order kept within each part)."""
        n = self.n_dec
        idx = np.concatenate([mask.nonzero()[0], (~mask).nonzero()[0]])
        self.D[:, :n] = self.D[:, idx]
        self.F[:, :n] = self.F[:, idx]

    def _preempt_prefill_at(self, j: int) -> None:
        rid, done, _total, blocks, _seq = self.prefilling.pop(j)
        self._requeue(rid, blocks, done)

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
        log.last_token[rid] = F[self.LAST, i]
        log.itl_max[rid] = _fmax(log.itl_max[rid], F[self.ITLMAX, i])
        ctx = int(D[self.CTX, i])
        self._ctx_sum -= ctx
        self._cnt = None                                 # (its column leaves: the counts start over)
        self._requeue(rid, int(D[self.BLK, i]), ctx)

    def _requeue(self, rid: int, blocks: int, ctx: int) -> None:
        """`rid` is preempted: counted (before its release, which reads the count), its blocks
        freed, and it goes to the front of the queue."""
        self.log.preemptions[rid] += 1
        self.preempted += 1
        self._release(rid, blocks, ctx)
        self.waiting.appendleft(rid)

    # ---- applying a run of decode steps (simulator/decode_run.py) ------------------------
    def _apply_run(self, run: Run, b: int) -> None:
        """Apply steps fin+1..b of `run` as step by step would have (their plans and finishes in
        order), and the plan of step b + 1 if the run goes on."""
        D, F, log = self.D, self.F, self.log
        assert not (self._lag or self._blk_stale or self._planned), "a run started from lazy columns"
        self._cnt = None
        self._kv_seen = None
        a = run.fin + 1
        nxt = b < run.end                                # plan step b + 1 too
        last_plan = b + 1 if nxt else b
        cols = run.alive.nonzero()[0]                    # run index of each decode column now
        m = len(cols)
        assert m == self.n_dec, f"replica {self.index}: a run lost track of its batch"
        rem = run.rem[cols]
        t = run.t[a - 1:b]
        # Blocks: planned growth of steps planned+1..last_plan, releases at finishes a..b.
        kvf = self._run_blocks(run, cols, a, b, last_plan)
        # Per-step series, as StepLog.add would have written them.
        self.steps.extend(t, run.dt[a - 1:b], run.nd[a - 1:b], kvf)
        # Inter-token gaps: the first step's from each request's last token; later steps share
        # one gap each, counted once per request decoding in it.
        if self._last_at is not None:
            itl1 = float(t[0]) - self._last_at
            log.add_itl_repeated(itl1, m)
        else:
            itl1 = t[0] - F[self.LAST, :m]
            log.add_itls(itl1)
        upto = np.minimum(rem, b)                        # last step of this stretch each decodes in
        mx = np.fmax(F[self.ITLMAX, :m], itl1)
        if b > a:
            gaps = t[1:] - t[:-1]
            log.add_itl_counts(gaps, run.nd[a:b])
            pm = np.maximum.accumulate(gaps)
            far = upto > a
            mx[far] = np.fmax(mx[far], pm[upto[far] - a - 1])
        F[self.ITLMAX, :m] = mx
        F[self.LAST, :m] = run.t[upto - 1]
        D[self.CTX, :m] = run.ctx[cols] + upto
        D[self.GEN, :m] = run.gen[cols] + upto
        done = rem <= b
        bl_row = (last_plan if self.policy == "vllm-v1" else b) - 1   # v1 records blocks at plan, v0/lmdeploy at finish
        D[self.BLK, :m] = run.blocks[np.where(done, rem - 1, bl_row), cols]
        if True in done.tolist():
            order = rem.argsort(kind="stable")       # step by step: by step, then column
            for i in order[:int_sum(done)].tolist():
                rid = int(D[self.RID, i])
                log.itl_max[rid] = _fmax(log.itl_max[rid], F[self.ITLMAX, i])
                # (blocks: counted ones come from the run's sums below, the pool's were released in order)
                self._complete(rid, int(D[self.GEN, i]), float(run.t[rem[i] - 1]))
            self._drop_columns(done)
            run.alive[cols[done]] = False
        m = self.n_dec
        self._last_at = float(t[-1])                     # (those left decoded through step b)
        self._rem_lb = int(array_min(D[self.OUT, :m] - D[self.GEN, :m])) if m else 1 << 30
        self._ctx_sum = int_sum(D[self.CTX, :m])
        if self.pool is None:
            self.blocks_used = int(run.used_plan[last_plan - 1] if nxt else run.used_fin[b - 1])
        if self.policy == "lmdeploy":
            for _ in range(last_plan - run.planned):    # each planned step counts down, resetting at 0
                if self.prefill_counter <= 0:
                    self.prefill_counter = self.cfg.prefill_interval
                self.prefill_counter -= 1
        run.fin, run.planned = b, last_plan
        assert (nxt and self.policy != "vllm-v1") or self._ledger() == self.blocks_used, \
            f"replica {self.index}: blocks_used {self.blocks_used} != blocks held {self._ledger()}"

    def _run_blocks(self, run: Run, cols: np.ndarray, a: int, b: int, last_plan: int) -> np.ndarray:
        """KV fraction after each finished step a..b. Counted blocks come from the run's sums;
        under the prefix cache the pool's operations are replayed in step order (a step's
        shrinks before its growth, its releases after), consecutive growth merged into one
        allocation (the free queue pops the same blocks either way)."""
        nb = self.layout.num_blocks
        if self.pool is None:
            return run.used_fin[a - 1:b] / nb
        pool, rem = self.pool, run.rem[cols]
        rids = run.rid[cols].tolist()
        p0 = run.planned + 1                              # first step whose plan is still to apply
        assert p0 > a, f"replica {self.index}: a run's plans lag its finished steps"
        grow = run.grow[p0 - 2:last_plan - 1, cols]       # empty when every plan is applied
        if not self.held and not self.layout.decode_shrinks:
            # Counted requests that only grow: the growth planned at each step is all it takes.
            per_step = np.zeros(last_plan - a + 2, np.int64)
            per_step[p0 - a:p0 - a + len(grow)] = array_sum(grow, 1)
            return self._run_blocks_counted(run, cols, rids, a, b, last_plan, per_step, None, None)
        ks, ci = grow.nonzero()                           # step-major, column order within a step
        vals = grow[ks, ci]
        ks = ks + p0
        # growth planned at each step a..last_plan (small integer counts: exact through float weights)
        per_step = np.bincount(ks - a, weights=vals, minlength=last_plan - a + 2).astype(np.int64)
        shrinks = self.layout.decode_shrinks and len(vals) and array_min(vals) < 0
        if not self.held and (not shrinks or self._shrinks_unpublished(run, cols, rids, ks, ci, vals)):
            return self._run_blocks_counted(run, cols, rids, a, b, last_plan, per_step, ks, vals if shrinks else None)
        ksl, cil, vl = ks.tolist(), ci.tolist(), vals.tolist()
        shrink_steps = {k for k, x in zip(ksl, vl) if x < 0} if shrinks else set()
        fin_steps = set(rem[(rem >= a) & (rem <= b)].tolist())
        breaks = sorted(shrink_steps | fin_steps)
        pending_total, pending = 0, []
        e = 0                                             # next growth event to queue

        def flush():
            nonlocal pending_total
            if pending_total:
                self._allocate_in_order(pending)
                pending.clear()
                pending_total = 0

        kvf = np.empty(b - a + 1)
        cur, s0 = pool.used, a                            # use after step s0 - 1's finish
        for k in breaks + [None]:
            upto = last_plan if k is None else k
            # Plans of steps before k (and k's own when it only grows) queue their growth.
            while e < len(ksl) and ksl[e] <= upto and (ksl[e] < upto or upto not in shrink_steps):
                pending.append((vl[e], rids[cil[e]]))
                pending_total += vl[e]
                e += 1
            stop = b if k is None else min(k - 1, b)
            if stop >= s0:
                kvf[s0 - a:stop - a + 1] = (cur + per_step[s0 - a:stop - a + 1].cumsum()) / nb
                cur += int(array_sum(per_step[s0 - a:stop - a + 1]))
            if k is None:
                break
            if k in shrink_steps:
                flush()
                here = []
                while e < len(ksl) and ksl[e] == k:
                    here.append((cil[e], vl[e]))
                    e += 1
                for i, x in sorted(here, key=lambda g: g[1] > 0):
                    self._grow(rids[i], x, int(run.blocks[k - 2, cols[i]]))
            if a <= k <= b:
                fin = (rem == k).nonzero()[0].tolist()
                if fin:
                    flush()
                    for i in fin:
                        self._release(rids[i], int(run.blocks[k - 1, cols[i]]), int(run.ctx[cols[i]] + k), True)
                cur = pool.used + pending_total
                kvf[k - a] = cur / nb
            else:
                cur = pool.used + pending_total
            s0 = k + 1
        flush()
        self.blocks_used = pool.used
        return kvf

    def _shrinks_unpublished(self, run: Run, cols, rids: list, ks, ci, vals) -> bool:
        """Whether no shrink of the run frees a block its (counted) request has published, which
        would name it (_grow, _frees_published; what is published stays as it is meanwhile)."""
        if not self._hw:
            return True
        neg = (vals < 0).nonzero()[0]
        c = ci[neg]
        # (the first block each frees, _drop_floor_of)
        first = np.minimum(run.blocks[ks[neg] - 2, cols[c]] + vals[neg], self._drop_floor)
        hw = self._hw
        return all(f >= hw.get(rids[i], 0) for f, i in zip(first.tolist(), c.tolist()))

    def _run_blocks_counted(self, run: Run, cols, rids: list, a: int, b: int, last_plan: int,
                            per_step: np.ndarray, ks, vals) -> np.ndarray:
        """_run_blocks when every request is counted and no shrink frees a published block:
        each request's operation is a count, so a step's shrinks are one release, its growth one
        allocation, growth between events one allocation; the pool's use (hence the KV
        fraction) follows from the sums, and only the order of the operations between
        finishes and shrinks is kept (it decides which cached blocks are evicted)."""
        pool, nb, rem = self.pool, self.layout.num_blocks, run.rem[cols]
        used0 = pool.used
        cum = per_step.cumsum().tolist()                # net growth planned through step a + j
        fin = ((rem >= a) & (rem <= b)).nonzero()[0]
        held = used0 + np.asarray(cum[:b - a + 1], np.int64)
        if len(fin):
            fin = fin[rem[fin].argsort(kind="stable")]    # by step, then column, as step by step
            fk = rem[fin]
            held -= np.bincount(fk - a, weights=run.blocks[fk - 1, cols[fin]], minlength=b - a + 1).astype(np.int64).cumsum()
        else:
            fk = fin
        kvf = held / nb
        shrink: dict[int, tuple[int, int]] = {}          # step -> (blocks freed, blocks grown) there
        if vals is not None:
            neg = vals < 0
            down = np.bincount(ks[neg] - a, weights=-vals[neg]).astype(np.int64)
            up = np.bincount(ks - a, weights=np.maximum(vals, 0), minlength=len(down)).astype(np.int64)
            shrink = {a + j: (d, u) for j, (d, u) in enumerate(zip(down.tolist(), up.tolist())) if d}
        finishing: dict[int, list[int]] = {}
        for i, k in zip(fin.tolist(), fk.tolist()):
            finishing.setdefault(k, []).append(i)

        def finish(k: int) -> None:
            for i in finishing[k]:
                self._release(rids[i], int(run.blocks[k - 1, cols[i]]), int(run.ctx[cols[i]] + k), True)
        # The growth the loop below allocates is all the run's growth (between shrinks it never
        # falls). Where that fits in the pool's keyless free blocks no allocation evicts, and
        # counts commute: one allocation, one release of the shrinks, then the finishes in order.
        grown = sum(up.tolist()) if vals is not None else cum[last_plan - a]
        if grown <= pool.bare:
            if grown:
                pool.allocate_anon(grown)
            if shrink:
                pool.release_anon(sum(d for d, _u in shrink.values()), 0)
            for k in sorted(finishing):
                finish(k)
            self.blocks_used = pool.used
            return kvf
        applied = 0                                       # net growth given to the pool so far
        for k in sorted(shrink.keys() | finishing.keys()):
            if k in shrink:                               # growth before it, its frees, its growth
                d, u = shrink[k]
                if cum[k - 1 - a] > applied:
                    pool.allocate_anon(cum[k - 1 - a] - applied)
                pool.release_anon(d, 0)
                if u:
                    pool.allocate_anon(u)
                applied = cum[k - a]
            if k in finishing:                            # growth through it, then its releases
                if cum[k - a] > applied:
                    pool.allocate_anon(cum[k - a] - applied)
                applied = cum[k - a]
                finish(k)
        if cum[last_plan - a] > applied:
            pool.allocate_anon(cum[last_plan - a] - applied)
        self.blocks_used = pool.used
        return kvf

    # ---- lazy columns ------------------------------------------------------------------
    def _flush(self) -> None:
        """Write the lazy steps to the columns (see the class): after it every column holds what
        step by step would have written. (The crossing counts stay: they count the true contexts.)"""
        n = self.n_dec
        lag = self._lag
        if lag:
            D, F = self.D, self.F
            D[self.CTX:self.GEN + 1, :n] += lag
            F[self.LAST, :n] = self._last_at
            # Each column's largest gap since it joined: the first of the decreasing maxima after
            # its join (none: 0, below any gap).
            at = np.searchsorted(self._gk, self._jt[:n], "right")
            np.maximum(F[self.ITLMAX, :n], np.array(self._gv + [0.0])[at], out=F[self.ITLMAX, :n])
            self._jt[:n] = 0
            self._lag, self._gk, self._gv = 0, [], []
        if self._blk_stale:
            D = self.D
            was = int_sum(D[self.BLK, :n]) + self._blk_behind
            D[self.BLK, :n] = self.layout.decode_blocks_vec(D[self.PLEN, :n], D[self.CTX, :n] + self._planned)
            # The growth counted by context modulo block_size is what the formula gives.
            assert int_sum(D[self.BLK, :n]) == was, f"replica {self.index}: lazy blocks {was} != {int_sum(D[self.BLK, :n])}"
            self._blk_stale, self._blk_behind = False, 0

    def _gap_since(self, jt: int) -> float:
        """The largest gap of the lazy steps after lazy step jt (0.0 if none)."""
        at = bisect_right(self._gk, jt)
        return self._gv[at] if at < len(self._gv) else 0.0

    def _crossers(self) -> int:
        """Blocks the next lazy step of all the columns takes (_cross): one for each column whose
        context is a multiple of block_size now."""
        B = self.layout.block_size
        if self._cnt is None:
            n = self.n_dec
            self._cnt = np.bincount((self.D[self.CTX, :n] + self._lag) % B, minlength=B).tolist()
            self._cnt_t0 = self._tick
        return self._cnt[(self._cnt_t0 - self._tick) % B]

    # ---- applying a finished step ----------------------------------------------------
    def _finish_decode_step(self, n: int, need: np.ndarray, now: float) -> None:
        D, F, log = self.D, self.F, self.log
        if self._lazy and n == self.n_dec and self._last_at is not None:
            # Every column decoded with one gap: nothing is written to the columns (_flush).
            self._planned = 0
            self._lag += 1
            self._tick += 1
            self._ctx_sum += n
            itl = now - self._last_at
            log.add_itl_repeated(itl, n)
            gk, gv = self._gk, self._gv
            while gv and gv[-1] <= itl:                  # (the largest gap from each step on)
                gk.pop()
                gv.pop()
            gk.append(self._lag)
            gv.append(itl)
            self._last_at = now
            self._rem_lb -= 1
            if self._rem_lb > 0:
                return
            self._finish_check(n, now)
            return
        self._flush()                                    # (a lazy plan's blocks counted in)
        self._planned, self._cnt = 0, None
        cg = D[self.CTX:self.GEN + 1, :n]
        cg += self._ones[:n]                             # (cheaper than += 1 on a 2-row view)
        self._ctx_sum += n
        if self.policy != "vllm-v1":                     # v1 recorded them when it planned the step
            D[self.BLK, :n] = need
        whole = n == self.n_dec
        if whole and self._last_at is not None:
            itl = now - self._last_at
            log.add_itl_repeated(itl, n)
        else:
            itl = now - F[self.LAST, :n]
            log.add_itls(itl)
        np.maximum(F[self.ITLMAX, :n], itl, out=F[self.ITLMAX, :n])
        F[self.LAST, :n] = now
        self._last_at = now if whole else None
        self._rem_lb -= 1
        if self._rem_lb > 0:                             # nobody reached its output length
            return
        self._finish_check(n, now)

    def _finish_check(self, n: int, now: float) -> None:
        """Complete the first n columns that have reached their output length (lazy columns
        read as _flush would write them)."""
        D, F, log = self.D, self.F, self.log
        lag, total = self._lag, self.n_dec
        rem = D[self.OUT, :n] - D[self.GEN, :n]          # (stored: less the lazy steps)
        done = rem <= lag
        if True in done.tolist():                       # (done.any() costs 3x as much at small n)
            cnt, B = self._cnt, self.layout.block_size
            gone = done.nonzero()[0].tolist()
            for i in gone:
                rid = int(D[self.RID, i])
                mx = F[self.ITLMAX, i]
                if lag:
                    mx = max(mx, self._gap_since(int(self._jt[i])))
                log.itl_max[rid] = _fmax(log.itl_max[rid], mx)
                ctx = int(D[self.CTX, i]) + lag
                self._ctx_sum -= ctx
                blk = int(D[self.BLK, i])
                if self._blk_stale:
                    behind = self.layout.decode_blocks(int(D[self.PLEN, i]), ctx) - blk
                    self._blk_behind -= behind
                    blk += behind
                if cnt is not None:
                    cnt[(ctx - (self._tick - self._cnt_t0)) % B] -= 1
                self._release(rid, blk, ctx, True)
                self._complete(rid, int(D[self.GEN, i]) + lag, now)
            assert self._lag == lag and self.n_dec == total, "a completion changed the columns it reads"
            m = self._drop_columns(done, gone)
            if not m:
                self._flush()                            # (nothing to write: the lazy state starts over)
                self._rem_lb = 1 << 30
                return
            rem[done] = 1 << 62
        m = self.n_dec
        if n == total:                                   # the columns left are those in rem not done
            self._rem_lb = int(array_min(rem)) - lag
        else:
            self._rem_lb = int(array_min(D[self.OUT, :m] - D[self.GEN, :m])) - lag if m else 1 << 30

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
            if math.isnan(log.first_token[rid]):
                log.first_token[rid] = now
            else:
                itl = now - log.last_token[rid]
                log.add_itls(np.array([itl]))
                log.itl_max[rid] = _fmax(log.itl_max[rid], itl)
            if gen >= log.output[rid]:
                self._release(rid, blocks, total, True)
                self._complete(rid, gen, now)
                continue
            # Eviction and SnapKV selection shrink the cache once the prompt is attended.
            keep_blocks = lay.decode_blocks(total, total)
            assert keep_blocks <= blocks, f"request {rid}: eviction grew its cache ({blocks} -> {keep_blocks} blocks)"
            if keep_blocks != blocks:
                self._grow(rid, keep_blocks - blocks, blocks)
            i = self.n_dec
            assert i < self.cfg.max_batch_size, f"replica {self.index}: more than max_batch_size running"
            if i and self._last_at != now:
                self._flush()                            # (the lazy columns need the shared time)
            # Stored as the lazy columns are: less the lazy steps, which _flush adds to all.
            lag = self._lag
            out = int(log.output[rid])
            D[:, i] = (total - lag, gen - lag, rid, total, out, keep_blocks, seq)  # CTX GEN RID PLEN OUT BLK SEQ
            F[:, i] = (now, 0.0)
            self._jt[i] = lag
            if self._cnt is not None:
                self._cnt[(total - (self._tick - self._cnt_t0)) % lay.block_size] += 1
            self.n_dec += 1
            self._ctx_sum += total
            if not i:                                    # the first column: it sets both
                self._rem_lb, self._last_at = out - gen, now
            else:
                self._rem_lb = min(self._rem_lb, out - gen)
                if self._last_at != now:
                    self._last_at = None
        self.prefilling = still

    def _complete(self, rid: int, gen: int, now: float) -> None:
        assert math.isnan(self.log.finish[rid]), f"request {rid} completed twice"
        assert self.log.replica[rid] == self.index, f"request {rid} completed on a replica it was not sent to"
        self.log.generated[rid] = gen
        self.log.finish[rid] = now
        self.outstanding -= 1
        self.on_done(rid)
