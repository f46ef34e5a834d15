"""Running sweep tasks: in local worker processes, or as Ray tasks on a local Ray started for the
sweep or an existing cluster. Both call planning.tasks.run_task with the same arguments and hand
each result to `on_done` in the driver as soon as it finishes (the driver writes the part)."""
from __future__ import annotations

import os
from typing import Callable, Sequence

from rkvsim.planning.tasks import run_task

Call = tuple[str, tuple]          # (task id, run_task arguments)


class BackendError(RuntimeError):
    pass


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def local_pool(workers: int):
    """Worker processes to hand several run_local calls (a plan's rounds): each keeps what it
    compiled and fitted (cost tables, the inflation model) from one round to the next."""
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(max_workers=workers)


def run_local(calls: Sequence[Call], on_done: Callable[[str, list], None], workers: int, pool=None) -> None:
    """Run the calls in `workers` processes (in this one for 1), or in `pool` (local_pool) when
    given, which is left running for the caller's next calls."""
    if workers <= 1 and pool is None:
        # In-process: no pool start-up, and the same code path as a worker.
        for tid, args in calls:
            on_done(tid, run_task(*args))
        return
    from concurrent.futures import FIRST_COMPLETED, wait
    ex = pool if pool is not None else local_pool(workers)
    try:
        # A bounded window of submitted tasks: results come back in completion order, and a
        # kill loses at most the tasks in flight.
        it = iter(calls)
        inflight = {}
        for tid, args in it:
            inflight[ex.submit(run_task, *args)] = tid
            if len(inflight) >= 4 * workers:
                break
        while inflight:
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for f in finished:
                tid = inflight.pop(f)
                on_done(tid, f.result())
                nxt = next(it, None)
                if nxt is not None:
                    inflight[ex.submit(run_task, *nxt[1])] = nxt[0]
    finally:
        if pool is None:
            ex.shutdown(wait=False, cancel_futures=True)


def run_ray(calls: Sequence[Call], on_done: Callable[[str, list], None], workers: int,
            address: str | None = None) -> None:
    try:
        import ray
    except ImportError:
        raise BackendError("--backend ray: ray is not installed; pip install 'rkvsim[ray]'") from None
    started = False
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=workers, **kw)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(run_task)
        base_refs: dict[int, object] = {}
        pending = {}
        for tid, args in calls:
            base, rest = args[0], args[1:]
            ref = base_refs.setdefault(id(base), ray.put(base))  # one copy of the base scenario
            pending[remote.remote(ref, *rest)] = tid
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=min(len(pending), 8), timeout=0.5)
            if not ready:
                ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                tid = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise BackendError(f"task {tid} failed on Ray: {e.cause if hasattr(e, 'cause') else e}") from None
                on_done(tid, rows)
    finally:
        for ref in list(locals().get("pending", {})):
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
