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


def block_keys(segments, n_blocks: int, block_size: int) -> list[int]:
    """Keys of the first n_blocks full blocks of a request made of `segments` [(id, tokens)]."""
    keys: list[int] = []
    node, seg_end = 0, 0
    it = iter(segments)
    for i in range(n_blocks):
        last = (i + 1) * block_size - 1
        while last >= seg_end:
            sid, n = next(it)
            node = hash((node, sid))
            seg_end += n
        keys.append(hash((node, i)))
    return keys


class BlockPool:
    """Physical KV blocks: reference counts, the free queue (LRU eviction of cached blocks) and
    the key -> block map of cached full blocks."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.ref = [0] * num_blocks
        self.key_of: dict[int, int] = {}
        self.block_of: dict[int, int] = {}
        self.evictions = 0
        self.refs = 0            # sum of reference counts (the replica's ledger checks it)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

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
                del self.free[b]
            self.ref[b] += 1
        self.refs += len(blocks)

    def allocate(self, n: int) -> list[int]:
        free, key_of, ref = self.free, self.key_of, self.ref
        assert n <= len(free), f"allocating {n} blocks with {len(free)} free"
        out = []
        for _ in range(n):
            b = free.popitem(last=False)[0]
            if key_of:
                k = key_of.pop(b, None)
                if k is not None:
                    del self.block_of[k]
                    self.evictions += 1
            assert ref[b] == 0, f"block {b} reused while referenced"
            ref[b] = 1
            out.append(b)
        self.refs += n
        return out

    def release(self, blocks: list[int]) -> None:
        # Tail first; a block with no key goes to the head of the queue (nothing to keep), a
        # cached one to the tail (block_pool.free_blocks, as upstream since it split the two).
        self.refs -= len(blocks)
        for b in reversed(blocks):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} freed more often than referenced"
            if self.ref[b] == 0:
                self.free[b] = None
                if b not in self.key_of:
                    self.free.move_to_end(b, last=False)

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
        assert set(self.free) == {b for b, r in enumerate(self.ref) if r == 0}
        assert all(self.block_of[k] == b for b, k in self.key_of.items())
