"""The block pool against vLLM's free queue written plainly: one queue of block ids, every block
named, every release going through publish-then-free. The pool keeps blocks of requests nobody
else can look up as counts (allocate_anon, release_anon, name); this checks that renaming is
never observable: the same blocks in use, the same evictions, the same hits, and a free queue of
the same shape (keyless, reachable under which key, unreachable) after every operation."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rkvsim.simulator.prefix_cache import BlockPool

UNREACHABLE = "unreachable"


class PlainQueue:
    """vllm/v1/core/block_pool.py as one list, head first: a freed block with a key goes to the
    tail, one without to the head; popping a cached block from the head evicts its key."""

    def __init__(self, n: int):
        self.queue = list(range(n))
        self.ref = [0] * n
        self.key_of: dict[int, object] = {}
        self.block_of: dict[object, int] = {}
        self.evictions = 0

    @property
    def used(self) -> int:
        return len(self.ref) - len(self.queue)

    def allocate(self, n: int) -> list[int]:
        out, self.queue = self.queue[:n], self.queue[n:]
        for b in out:
            if b in self.key_of:
                k = self.key_of.pop(b)
                if k != UNREACHABLE:
                    del self.block_of[k]
                self.evictions += 1
            self.ref[b] = 1
        return out

    def lookup(self, keys) -> list[int]:
        out = []
        for k in keys:
            if k not in self.block_of:
                break
            out.append(self.block_of[k])
        return out

    def touch(self, blocks) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                self.queue.remove(b)
            self.ref[b] += 1

    def publish(self, blocks, keys, reachable: bool = True) -> None:
        for b, k in zip(blocks, keys):
            if not reachable:
                self.key_of[b] = UNREACHABLE
            elif b not in self.key_of and k not in self.block_of:
                self.key_of[b], self.block_of[k] = k, b

    def release(self, blocks) -> None:
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.key_of:
                    self.queue.append(b)
                else:
                    self.queue.insert(0, b)

    def shape(self) -> list:
        return [self.key_of.get(b) for b in self.queue]


def shape(pool: BlockPool) -> list:
    return [None if b is None else UNREACHABLE if b == -1 else pool.key_of[b] for b in pool.free]


ops = st.lists(st.tuples(st.sampled_from(["admit", "admit_anon", "grow", "finish", "preempt"]),
                         st.integers(0, 7), st.integers(0, 6), st.integers(0, 2)), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_blocks=st.integers(1, 24), ops=ops)
def test_property_blocks_held_as_counts_are_never_observable(n_blocks, ops):
    pool, ref = BlockPool(n_blocks), PlainQueue(n_blocks)
    # holders: name -> (text, blocks in the plain queue, ids in the pool or None, count held as one)
    holders: dict[int, list] = {}
    serial = 0
    for op, pick, n, text in ops:
        live = sorted(holders)
        free = n_blocks - ref.used
        if op in ("admit", "admit_anon"):
            serial += 1
            keys = [(text, i) for i in range(n)]
            # Only a named request looks its text up (a counted one's text is its own: no hit).
            hits = ref.lookup(keys) if op == "admit" else []
            hit_ids = pool.lookup(keys) if op == "admit" else []
            assert len(hits) == len(hit_ids)
            fresh = n - len(hits)
            if fresh + sum(ref.ref[b] == 0 for b in hits) > free:
                continue
            assert pool.evictable(hit_ids) == sum(ref.ref[b] == 0 for b in hits)
            ref.touch(hits)
            pool.touch(hit_ids)
            blocks = hits + ref.allocate(fresh)
            if op == "admit":
                ids = hit_ids + pool.allocate(fresh)
                ref.publish(blocks, keys)
                pool.publish(ids, keys)
                holders[serial] = [text, blocks, ids, 0]
            else:
                pool.allocate_anon(fresh)
                holders[serial] = [text, blocks, None, fresh]
        elif not live:
            continue
        else:
            h = live[pick % len(live)]
            text, blocks, ids, count = holders[h]
            if op == "grow":
                n = min(n, free)
                blocks += ref.allocate(n)
                if ids is None:
                    pool.allocate_anon(n)
                    holders[h][3] += n
                else:
                    ids += pool.allocate(n)
            elif op == "finish":
                # A counted request's full blocks get keys nobody can reach; a named one's were
                # published as they came.
                keyed = min(n, len(blocks))
                if ids is None:
                    ref.publish(blocks[:keyed], [None] * keyed, reachable=False)
                    pool.release_anon(count, keyed)
                else:
                    pool.release(ids)
                ref.release(blocks)
                del holders[h]
            else:                          # preempt: publish under its text's keys, then free
                keys = [(text, i) for i in range(len(blocks))]
                if ids is None:
                    ids = pool.name(count)
                ref.publish(blocks, keys)
                pool.publish(ids, keys)
                ref.release(blocks)
                pool.release(ids)
                del holders[h]
        pool.check()
        assert pool.used == ref.used and pool.evictions == ref.evictions
        assert pool.refs == sum(ref.ref) and shape(pool) == ref.shape()
        for t in range(3):
            probe = [(t, i) for i in range(8)]
            assert len(pool.lookup(probe)) == len(ref.lookup(probe))


def test_a_run_of_unreachable_blocks_is_evicted_from_its_head():
    pool = BlockPool(6)
    pool.allocate_anon(4)
    a = pool.allocate(2)
    pool.publish(a, [1, 2])
    pool.release_anon(4, 3)                 # queue: [keyless, u, u, u]
    pool.release(a)                         # queue: [keyless, u, u, u, a1, a0]... tail first
    assert pool.free[:4] == [None, -1, -1, -1] and pool.used == 0 and pool.n_cached == 5
    pool.allocate_anon(3)                   # the keyless block, then two unreachable ones
    assert pool.evictions == 2 and pool.free[0] == -1 and pool.lookup([1, 2]) == a
    pool.allocate_anon(2)                   # the last unreachable one, then a's last block (key 2)
    assert pool.evictions == 4 and pool.lookup([1]) == [a[0]] and pool.lookup([2]) == []
    pool.check()
    with pytest.raises(AssertionError):
        pool.release_anon(6, 0)             # more than is held as a count
