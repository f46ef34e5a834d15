"""Which cores the real engine runs on, and which the load generator gets.

On a small shared host the engine's worker threads meet at a barrier hundreds of times per
step, so a load generator (or anything else) scheduled on one of their cores stalls every
step. The engine is therefore pinned to the first `threads` cores this process may use and
the load generator to the rest; with no core left over (threads = all cores) nothing is
pinned and `split` says so. Linux only (os.sched_setaffinity); elsewhere nothing is pinned.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CoreSplit:
    engine: tuple[int, ...]     # cores of the engine process (empty: not pinned)
    client: tuple[int, ...]     # cores of the load generator (empty: not pinned)

    def as_dict(self) -> dict:
        return {"engine_cpus": list(self.engine), "client_cpus": list(self.client)}


def allowed_cores() -> tuple[int, ...]:
    if not hasattr(os, "sched_getaffinity"):
        return ()
    return tuple(sorted(os.sched_getaffinity(0)))


def split(threads: int, pin: bool = True) -> CoreSplit:
    cores = allowed_cores()
    if not pin or len(cores) <= threads:
        return CoreSplit((), ())
    return CoreSplit(cores[:threads], cores[threads:])


def preexec(cores: tuple[int, ...]):
    """A subprocess preexec_fn pinning the child to `cores` (None when not pinned)."""
    if not cores:
        return None
    return lambda: os.sched_setaffinity(0, set(cores))


@contextlib.contextmanager
def pinned(cores: tuple[int, ...]):
    """Pin the calling thread (and the threads it starts meanwhile) to `cores`; restore after."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
