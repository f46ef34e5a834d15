"""Which replica gets an arriving request."""
from __future__ import annotations

from typing import Sequence

from .replica import Replica

POLICIES = ("round_robin", "least_outstanding", "least_kv")


class Router:
    def __init__(self, replicas: Sequence[Replica], policy: str):
        if policy not in POLICIES:
            raise ValueError(f"router: unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        self.replicas = list(replicas)
        self.policy = policy
        self._next = 0

    def pick(self) -> Replica:
        reps = self.replicas
        if len(reps) == 1:
            return reps[0]
        if self.policy == "round_robin":
            r = reps[self._next % len(reps)]
            self._next += 1
            return r
        if self.policy == "least_outstanding":
            return min(reps, key=lambda r: (r.outstanding, r.index))
        # The paper's baseline: the replica with the least KV memory in use; queued requests
        # break ties, since they will claim memory next.
        return min(reps, key=lambda r: (r.kv_fraction, len(r.waiting), r.index))
