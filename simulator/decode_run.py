"""Event skipping: K decode-only steps of one replica advanced in one SimPy event.

Between two scheduling events the batch of a replica is fixed and every decoding request grows
by one token per step, so the next K steps are known in advance: their costs (the cost model's
`decode_run`, exact integer sums over its lookup tables), their times (the same sequential
additions SimPy makes), the blocks each request holds at each step, and the step at which each
request finishes. `plan_run` works that out and picks K as the first of:
  - a completion, when a completion can change what happens next: another request is waiting
    (its slot or blocks may now be free), or a completion feeds the workload (closed loop,
    sessions); otherwise finishing requests simply leave the run;
  - a step whose blocks no longer fit (the step that would preempt is scheduled normally);
  - with requests waiting and a running slot free, a step that frees blocks (an admission may
    now fit; with every slot taken only a completion makes room, and that bounds the run already);
  - a length cap that bounds the arrays (K x batch elements);
and none is taken when the first bounds leave fewer than MIN_RUN steps (stepping them costs less).
Arrivals are not known in advance in a closed loop or a fleet, so they are not a bound: the
dispatcher brings every replica up to date (`Replica.sync`) before the router reads it, and the
replica that receives the request ends its run after the step in progress (a run cut short is
still exact: the cut steps are re-planned by the scheduler's own rules). A run that starts with
requests waiting is sealed: arrivals neither bound nor cut it. The queue head could not be
admitted at its first step, and every policy admits first come, first served, stopping at the
first request that does not fit, so until something the run is bounded by (a completion, a
freed block, LMDeploy's next prefill attempt) changes, the head still does not fit and nothing
behind it is looked at, however many requests join the tail.

Why the scheduler would do nothing else during such a run: a decode-only step was planned, so
nothing waiting could be admitted then; without a completion or a freed block no slot or block
becomes free, and the token budget is unchanged, so the admission checks of every policy
(vllm-v1, vllm-v0, lmdeploy) keep failing, with one exception: under vLLM's prefix cache a
growth that evicts a cached block can cut the queue head's chain of hits, and when its chunk is
capped (the token budget, long_prefill_token_threshold) the blocks it would have to take back
from the free queue behind the cut stop counting: one eviction can lower its cost by more than
the one block it used. So with a slot free and a head that has hits, a run ends before the
first step whose growth reaches past the keyless free blocks (`evict_room`).

Pure numpy; the replica applies a run (simulator/replica.py, `_apply_run`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rkvsim.simulator.lookup import array_max, array_min, array_sum

# Largest K x batch of one run's arrays: long runs at small batches, short at large ones.
RUN_ELEMENTS = 1 << 15
# Shortest run worth planning: planning and applying a run costs about what several single
# steps do, so a shorter one is stepped (exact either way). Instruction counts misjudge it: a run
# is a few dozen small numpy calls, each a fresh array, and runs at fewer instructions per second
# than the steps it replaces (bench_sim.py --rate 3, runs from 6 steps: at 20,000 requests under
# callgrind, step by step 20.91 G instructions against skipping's 18.11 G; at 100,000, step by
# step 12.6 s twice against 13.5 and 14.7 s, alternating). So it is set by wall time, alternating
# (2026-12-08, after single steps stopped touching every column for their gap and completion
# check): bench_sim.py --requests 100000 --rate 3 from 6 / 12 / 20 steps / never: 13.6, 13.2 /
# 12.0, 12.3 / 12.2, 12.2 / 13.0, 12.7 s; CPU s per bench_sweep.py point (points 6-45, in
# process) from 6 / 12 / 16: 0.236, 0.236 / 0.229, 0.227 / 0.244, 0.238. Again once a vLLM v1
# step wrote nothing to the columns (Replica._lag), the same two measures from 12 / 20 / 24 /
# 32 / 40 / 64 steps / never: 9.16, 9.42 / 8.13, 8.61 / 8.40, 8.04 / 7.69, 7.89 / 7.69, 7.71 /
# 7.96 / 7.77, 7.86 s; 0.226 / - / 0.216, 0.215 / 0.223, 0.223 / 0.226, 0.224 / 0.264 / 0.405.
MIN_RUN = 32
# ... on a replica whose most frequent step is Replica.run's short path (vLLM v1 on a layout of
# ceil(context / block size) blocks: FP16, FP8), often finished without an event: there a run
# must be longer to pay. bench_sim.py --requests 100000 --rate 3 from 32 / 64 / never: 6.75,
# 6.40 / 6.37, 6.23 / 6.36, 6.14 s (alternating); the sweep's points from 32 / 64 with one
# threshold for all: 0.231, 0.233 / 0.264, 0.257 CPU s.
MIN_RUN_PASSING = 64


@dataclass
class Run:
    rid: np.ndarray       # (n,) request of each decode column at the run's start, in column order
    ctx: np.ndarray       # (n,) context before step 1
    gen: np.ndarray       # (n,) tokens generated before step 1
    rem: np.ndarray       # (n,) steps until each finishes (it finishes at step rem)
    blocks: np.ndarray    # (K, n) blocks each request holds once step k is planned
    t: np.ndarray         # (K,) end time of each step
    dt: np.ndarray        # (K,) duration of each step
    nd: np.ndarray        # (K,) requests decoding in each step
    end: int              # steps in the run (a submit can cut it down, unless sealed)
    used_plan: np.ndarray | None = None  # (K,) counted blocks in use once step k is planned
    used_fin: np.ndarray | None = None   # (K,) ... once step k has finished
    grow: np.ndarray | None = None       # (K - 1, n) blocks planned at step k + 2 (0 once finished)
    fin: int = 0          # steps applied (finished) so far
    planned: int = 1      # steps planned so far (the scheduler planned step 1)
    alive: np.ndarray = field(default=None)  # (n,) not yet finished (applied)
    sealed: bool = False  # arrivals here change nothing before its end (module docstring)

    def __post_init__(self):
        if self.alive is None:
            self.alive = np.ones(len(self.rid), bool)


def plan_run(rid, ctx, gen, out, prompt, need1, layout, cost, used: int, waiting: bool, quiet: bool,
             pooled: bool, now: float, horizon_steps: int = 1 << 30, until: float = np.inf,
             slots_full: bool = False, admission_steps: int = 1 << 30,
             evict_room: int | None = None, min_run: int = MIN_RUN) -> Run | None:
    """The longest exact run from a planned decode-only step (need1: its blocks), or None when
    it would be a single step. used: blocks in use after that plan. quiet: completions change
    nothing outside the replica (open-loop arrivals). horizon_steps: about how many steps
    until the next arrival (a run is cut there; computing further would be wasted). until: the
    time of the next request known to come here (a lone replica's next open-loop arrival): the
    run ends with the step in progress then, where its submit would cut it (Replica.submit), so
    that the arrival needs no interrupt. With requests waiting the run is sealed and neither
    applies (module docstring). slots_full: the batch holds max_batch_size requests, so no
    policy admits before a completion, whatever blocks free up. admission_steps: steps before
    the scheduler next tries the queue with what may have changed (LMDeploy's counter).
    evict_room: blocks the run's growth may take before one is evicted from the prefix cache
    (the pool's keyless free blocks), where an eviction may let the queue head in (module
    docstring); None where it cannot. min_run: the shortest run worth taking (MIN_RUN)."""
    n = len(rid)
    rem = out - gen
    calm = quiet and not waiting
    frees_admit = waiting and not slots_full
    if waiting:                                              # sealed: arrivals bound nothing
        horizon_steps, until = 1 << 30, np.inf
    k = min(max(2, RUN_ELEMENTS // n), int(array_max(rem) if calm else array_min(rem)), horizon_steps,
            admission_steps)
    if k < min_run:
        return None
    if frees_admit and (layout.decode_blocks_vec(prompt, ctx + 2) < need1).any():
        return None             # step 2 frees blocks (a group folds, a window moves): see below
    steps = np.arange(1, k + 1)
    blocks = layout.decode_blocks_vec(prompt[None, :], ctx[None, :] + steps[:, None])
    assert blocks[0].tolist() == need1.tolist(), "the run's first step disagrees with the scheduler's plan"
    full = int(array_min(rem)) >= k                         # nobody finishes inside the run
    live = None if full else rem[None, :] >= steps[:, None]
    grow = blocks[1:] - blocks[:-1]                         # row j: growth planned at step j + 2
    if not full:
        grow *= live[1:]
    if frees_admit:
        shrink = (grow < 0).any(axis=1).nonzero()[0]
        if len(shrink):
            k = min(k, int(shrink[0]) + 1)
            if k < 2:
                return None
    used_plan = used_fin = None
    k0 = len(steps)                                   # the arrays' length; k is cut below
    if pooled:
        # The pool frees a shared block only with its last holder: bound use by growth alone
        # (a bound that never falls: over only if its last value is).
        up = np.zeros(k0, np.int64)                         # growth through each step
        array_sum(np.maximum(grow, 0), 1).cumsum(out=up[1:])
        over = (used + up > layout.num_blocks).nonzero()[0] if used + int(up[-1]) > layout.num_blocks else ()
        if evict_room is not None and frees_admit and int(up[-1]) > evict_room:
            # (growth alone: a shrink in between only adds keyless blocks, so this is early enough)
            k = min(k, int((up > evict_room).nonzero()[0][0]))
    else:
        rel = np.zeros(k0 + 1, np.int64)                   # blocks released at each step's finish
        cols = (rem <= k0).nonzero()[0]
        if len(cols):
            np.add.at(rel, rem[cols], blocks[rem[cols] - 1, cols])
        rel = rel[1:]
        # planned at step j: what was in use, plus the growth planned through j, less the
        # releases of the steps before it
        used_plan = np.empty(k0, np.int64)
        used_plan[0] = used
        used_plan[1:] = used + array_sum(grow, 1).cumsum() - rel[:-1].cumsum()
        used_fin = used_plan - rel
        over = (used_plan > layout.num_blocks).nonzero()[0]
    if len(over):
        k = min(k, int(over[0]))
    if k < 2:
        return None
    dt = cost.decode_run(ctx, prompt, rem, k)
    if dt is None:
        return None
    t = np.empty(len(dt) + 1)
    t[0], t[1:] = now, dt
    t = t.cumsum()[1:]                             # sequential sums: SimPy's now + delay, step by step
    if until < t[-1]:
        cut = int(t.searchsorted(until, "right")) + 1   # the same cut Replica.submit makes
        if cut < k:
            if cut < 2:
                return None
            k, t, dt = cut, t[:cut], dt[:cut]
    nd = np.full(k, n) if full else array_sum(live[:k], 1)
    return Run(rid, ctx, gen, rem, blocks[:k], t, dt, nd, k,
               used_plan[:k] if used_plan is not None else None, used_fin[:k] if used_fin is not None else None,
               grow[:k - 1], sealed=waiting)


def timeout_at(env, target: float):
    """An event that fires at exactly `target`. A timeout fires at now + delay, and for some
    (now, target) no delay makes that sum round to target (ties to even skip every other value),
    so the event goes into the queue at the absolute time, as Environment.schedule would put it
    (simpy 4: the queue holds (time, priority, id, event)). Event skipping needs this: the step
    that ends a run must end at the very float it ends at step by step."""
    import heapq

    import simpy
    from simpy.events import NORMAL

    assert target >= env.now, f"an event in the past ({target} < {env.now})"
    ev = simpy.Event(env)
    ev._ok, ev._value = True, None
    heapq.heappush(env._queue, (target, NORMAL, next(env._eid), ev))
    return ev
