"""Which replica gets an arriving request.

Policies:
  round_robin, least_outstanding   simple load balancing
  least_kv            the paper's baseline: the replica with the least KV memory in use
  compression_aware   the replica with the lowest predicted end-to-end latency: its queue, the
                      request's prefill time there, and its predicted response length under that
                      replica's method divided by that replica's predicted decode rate
  oracle              the same estimate with the true response lengths: the upper bound

Every policy skips replicas that cannot hold the request (a fleet may mix methods, and a
4-bit cache holds a request an FP16 one cannot); `pick` returns None when none can.

The predictive policies run inside the SimPy loop, once per request, so everything that can
be is computed before the simulation starts (`RouteContext`, built by simulator/fleet.py):
per (replica configuration, request) feasibility, prefill seconds and predicted lengths, and
per configuration a table of decode-step seconds over (batch size, context). Per request the
estimate is a few scalar lookups plus numpy reductions over that replica's running batch.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rkvsim.simulator.replica import Replica

POLICIES = ("round_robin", "least_outstanding", "least_kv", "compression_aware", "oracle")
PREDICTIVE = ("compression_aware", "oracle")


@dataclass
class DecodeTable:
    """Seconds of one decode step with `b` requests at mean context `ctx`, bilinear between grid
    points (log batch x context): the step cost a request will share while it decodes."""
    batch: list[float]            # grid of log(batch size), ascending
    ctx: list[float]              # grid of context lengths, ascending
    step_s: list[list[float]]     # [batch index][ctx index]

    def __call__(self, b: int, ctx: float) -> float:
        x, y = np.log(max(b, 1)), ctx
        i = min(max(bisect_right(self.batch, x) - 1, 0), len(self.batch) - 2)
        j = min(max(bisect_right(self.ctx, y) - 1, 0), len(self.ctx) - 2)
        bx = self.batch
        tx = min(max((x - bx[i]) / (bx[i + 1] - bx[i]), 0.0), 1.0)
        cy = self.ctx
        ty = min(max((y - cy[j]) / (cy[j + 1] - cy[j]), 0.0), 1.0)
        s = self.step_s
        lo = s[i][j] + (s[i][j + 1] - s[i][j]) * ty
        hi = s[i + 1][j] + (s[i + 1][j + 1] - s[i + 1][j]) * ty
        return lo + (hi - lo) * tx


@dataclass
class RouteContext:
    """Per-request inputs of routing, indexed [configuration, request id]."""
    config_of: list[int]          # replica index -> configuration index
    fits: np.ndarray              # bool: the configuration's KV pool and context window hold the request
    prefill_s: np.ndarray         # the request's prefill step alone on that configuration
    length: np.ndarray            # response tokens the policy believes (predicted, or true for the oracle)
    mean_prefill_s: np.ndarray    # per configuration: mean of prefill_s (a queued request's prefill)
    mean_blocks: np.ndarray       # per configuration: mean KV blocks a queued request claims
    decode: list[DecodeTable]     # per configuration


class Router:
    def __init__(self, replicas: Sequence[Replica], policy: str, ctx: RouteContext | None = None):
        if policy not in POLICIES:
            raise ValueError(f"router: unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        if policy in PREDICTIVE and ctx is None:
            raise ValueError(f"router: {policy} needs length predictions; run the scenario through "
                             "rkvsim.simulator.pipeline.run_scenario")
        self.replicas = list(replicas)
        self.policy = policy
        self.ctx = ctx
        self._next = 0
        self.estimates = 0   # predictive decisions made (for tests and reports)

    def candidates(self, rid: int | None) -> list[Replica]:
        if self.ctx is None or rid is None:
            return self.replicas
        fits, cfg = self.ctx.fits, self.ctx.config_of
        return [r for r in self.replicas if fits[cfg[r.index], rid]]

    def pick(self, rid: int | None = None) -> Replica | None:
        """The replica for request `rid`, or None when no replica can hold it."""
        reps = self.candidates(rid)
        if len(reps) <= 1:
            return reps[0] if reps else None
        if self.policy == "round_robin":
            # Rotate over the whole fleet so that one infeasible replica does not skew the cycle.
            for _ in range(len(self.replicas)):
                r = self.replicas[self._next % len(self.replicas)]
                self._next += 1
                if r in reps:
                    return r
        if self.policy == "least_outstanding":
            return min(reps, key=lambda r: (r.outstanding, r.index))
        if self.policy == "least_kv":
            # The paper's baseline: the replica with the least KV memory in use; queued requests
            # break ties, since they will claim memory next.
            return min(reps, key=lambda r: (r.routed_kv, len(r.waiting), r.index))
        self.estimates += 1
        return min(reps, key=lambda r: (self.estimate_e2e(r, rid), r.index))

    def estimate_e2e(self, r: Replica, rid: int) -> float:
        """Predicted seconds from now until `rid` finishes if sent to replica `r`."""
        c = self.ctx.config_of[r.index]
        ctx = self.ctx
        lay = r.layout
        n = r.n_dec
        n_wait = len(r.waiting)
        n_pre = len(r.prefilling)
        cap = r.cfg.max_batch_size
        length = float(ctx.length[c, rid])
        prompt = float(r.log.prompt[rid])
        # Context the request shares its decode steps with: the running batch's mean, with this
        # request counted at the middle of its own decode.
        ctx_sum = float(r.D[r.CTX, :n].sum()) if n else 0.0
        mean_ctx = (ctx_sum + prompt + length / 2) / (n + 1)
        step = ctx.decode[c](min(n + n_pre + n_wait + 1, cap), mean_ctx)
        # Queued requests are prefilled first (FCFS), each in a prefill step of its own.
        wait = n_wait * float(ctx.mean_prefill_s[c])
        # Until slots and blocks free up, the request cannot be admitted: wait for the running
        # requests with the least predicted work left to finish.
        slots_short = n + n_pre + n_wait + 1 - cap
        need = lay.prefill_blocks(int(prompt)) + n_wait * float(ctx.mean_blocks[c])
        blocks_short = r.blocks_used + need - lay.num_blocks
        if (slots_short > 0 or blocks_short > 0) and n:
            rids = r.D[r.RID, :n]
            left = np.maximum(ctx.length[c, rids] - r.D[r.GEN, :n], 1.0)
            order = np.argsort(left, kind="stable")
            freed = np.cumsum(r.D[r.BLK, :n][order])
            k = max(int(slots_short), int(np.searchsorted(freed, blocks_short)) + 1 if blocks_short > 0 else 0)
            wait += float(left[order[min(k, n) - 1]]) * step
        return wait + float(ctx.prefill_s[c, rid]) + length * step
