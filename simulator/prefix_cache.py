"""Prefix caching as vLLM v1 does it, at the granularity the scheduler sees: blocks.

vllm/v1/core/block_pool.py (BlockPool) and kv_cache_manager.py: every full block of a request
gets a key chained over its content and everything before it (kv_cache_utils.hash_block_tokens
hashes the parent block's hash with the block's token ids); a new request reuses the longest run
of cached keys at the start of its prompt; blocks carry reference counts; a freed block goes to
the tail of one free queue and keeps its key until it is popped from the head for reuse (that
pop evicts the key), so the least recently freed cached block is evicted first; a request frees
its blocks tail first so that its last blocks are evicted before its first ones, and blocks
without a key go to the head, to be reused before any cached one.

Content is described, not tokenised: a request is a list of segments (id, tokens); equal ids are
equal text. A block's key is the hash of the chain of segment ids up to its last token and its
index, which equals two blocks exactly when their token prefixes are equal. Python hashes ints
and tuples of ints the same way in every process, so runs reproduce.
"""
from __future__ import annotations

from collections import OrderedDict

# The key of a cached block no request can look up (see BlockPool.release_unreachable). CPython
# never hashes anything to -1, so no block key equals it.
UNREACHABLE = -1


def block_keys(segments, n_blocks: int, block_size: int) -> list[int]:
    """Keys of the first n_blocks full blocks of a request made of `segments` [(id, tokens)]: a
    block's key chains the ids of the segments up to the one holding its last token."""
    keys: list[int] = []
    node, seg_end = 0, 0
    for sid, n in segments:
        if len(keys) >= n_blocks:
            break
        node = hash((node, sid))
        seg_end += n
        hi = min(seg_end // block_size, n_blocks)        # blocks whose last token is in this segment
        keys.extend([hash((node, i)) for i in range(len(keys), hi)])
    return keys


class BlockPool:
    """Physical KV blocks: reference counts, the free queue (LRU eviction of cached blocks) and
    the key -> block map of cached full blocks.

    vLLM's one free queue always reads [blocks without a key ..., cached blocks, least recently
    freed first]: a block without a key is put at the head and a cached one at the tail, and a
    block gets a key only while held. So it is kept as those two parts: `bare`, a stack whose
    end is the head of the queue (allocation slices it instead of popping block by block), and
    `cached`, in queue order. Both pop the same blocks, in the same order, as the single queue."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.bare: list[int] = list(range(num_blocks - 1, -1, -1))
        self.cached: OrderedDict[int, None] = OrderedDict()
        self.ref = [0] * num_blocks
        self.key_of: dict[int, int] = {}
        self.block_of: dict[int, int] = {}
        self.evictions = 0
        self.refs = 0            # sum of reference counts (the replica's ledger checks it)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.bare) - len(self.cached)

    @property
    def free(self) -> list[int]:
        """The free queue, head first (tests and checks; the pool never builds it)."""
        return self.bare[::-1] + list(self.cached)

    def lookup(self, keys: list[int]) -> list[int]:
        """Blocks holding the longest cached run of `keys` from the start."""
        out = []
        for k in keys:
            b = self.block_of.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def evictable(self, blocks: list[int]) -> int:
        """How many of these cached blocks sit in the free queue (touching them takes them out)."""
        return sum(1 for b in blocks if self.ref[b] == 0)

    def touch(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                del self.cached[b]             # a hit is cached: it is never in `bare`
            self.ref[b] += 1
        self.refs += len(blocks)

    def allocate(self, n: int) -> list[int]:
        bare, ref = self.bare, self.ref
        assert n <= len(bare) + len(self.cached), f"allocating {n} blocks with {self.num_blocks - self.used} free"
        m = min(n, len(bare))
        cut = len(bare) - m
        out = bare[cut:]
        out.reverse()                                  # the head of the queue first
        del bare[cut:]
        if m < n:
            cached, key_of, block_of = self.cached, self.key_of, self.block_of
            for _ in range(n - m):
                b = cached.popitem(last=False)[0]
                k = key_of.pop(b)
                if k != UNREACHABLE:
                    del block_of[k]
                self.evictions += 1
                out.append(b)
        for b in out:
            assert ref[b] == 0, f"block {b} reused while referenced"
            ref[b] = 1
        self.refs += n
        return out

    def release(self, blocks: list[int]) -> None:
        # Tail first; a block with no key goes to the head of the queue (nothing to keep), a
        # cached one to the tail (block_pool.free_blocks, as upstream since it split the two).
        ref, key_of = self.ref, self.key_of
        self.refs -= len(blocks)
        for b in reversed(blocks):
            ref[b] -= 1
            assert ref[b] >= 0, f"block {b} freed more often than referenced"
            if ref[b] == 0:
                if b in key_of:
                    self.cached[b] = None
                else:
                    self.bare.append(b)

    def release_unreachable(self, blocks: list[int], n: int) -> None:
        """publish(blocks[:n], their keys) then release(blocks) for a request held alone (every
        reference count 1) whose first n blocks get keys nobody can ever look up (a request
        that has finished, with text of its own): the blocks take the same places in the free
        queue (cached ones to the tail, last block first; the others to the head) and are
        evicted and counted the same, with no key computed or mapped."""
        ref = self.ref
        for b in blocks:
            assert ref[b] == 1, f"block {b} shared or free at an unreachable release"
            ref[b] = 0
        self.refs -= len(blocks)
        key_of = self.key_of
        assert not any(b in key_of for b in blocks[:n]), "an unreachable release of published blocks"
        key_of.update(dict.fromkeys(blocks[:n], UNREACHABLE))
        self.bare.extend(reversed(blocks[n:]))
        self.cached.update(dict.fromkeys(reversed(blocks[:n])))

    def publish(self, blocks: list[int], keys: list[int]) -> None:
        """Cache full blocks under their keys (a key already cached keeps its first block)."""
        for b, k in zip(blocks, keys):
            if b in self.key_of or k in self.block_of:
                continue
            self.key_of[b] = k
            self.block_of[k] = b

    def check(self) -> None:
        """Invariants (tests): free blocks are exactly those with no reference; maps agree."""
        assert all(r >= 0 for r in self.ref) and sum(self.ref) == self.refs
        free = self.free
        assert set(free) == {b for b, r in enumerate(self.ref) if r == 0} and len(free) == len(set(free))
        assert all(b in self.key_of for b in self.cached) and not any(b in self.key_of for b in self.bare)
        assert all(self.block_of[k] == b for b, k in self.key_of.items() if k != UNREACHABLE)
        assert all(self.key_of.get(b) == k for k, b in self.block_of.items())
