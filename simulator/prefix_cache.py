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
    block gets a key only while held. So it is kept as those two parts: `bare`, the blocks with
    no key (a count), and `cached`, in queue order.

    A block needs an id only while something can find it: while it is held by a request whose
    blocks may be published (`allocate`), or while it is cached under a key a lookup can reach.
    A request nobody else can look up (Replica._own_text) holds its blocks as a count
    (`allocate_anon`); when it finishes they go to the queue as one run of unreachable cached
    blocks, an entry of `cached` keyed by a negative serial with its length as value
    (`release_anon`). Ids come from `spare` and go back there when their block loses its name.
    Which id names which block is never observable; the queue pops the same blocks (keyless,
    reachable or unreachable cached) in the same order as vLLM's single queue, so evictions,
    hits and use are the same as with an id for every block."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.bare = num_blocks                      # free blocks without a key: the head of the queue
        self.cached: OrderedDict[int, int | None] = OrderedDict()   # id -> None; -serial -> run length
        self.n_cached = 0                           # blocks in `cached`
        self.spare: list[int] = list(range(num_blocks - 1, -1, -1))  # ids naming no block now
        self.ref = [0] * num_blocks
        self.key_of: dict[int, int] = {}
        self.block_of: dict[int, int] = {}
        self.evictions = 0
        self.refs = 0            # sum of reference counts, held counts included (the replica's ledger checks it)
        self.anon = 0            # blocks held as a count
        self._serial = 0

    @property
    def used(self) -> int:
        return self.num_blocks - self.bare - self.n_cached

    @property
    def free(self) -> list:
        """The free queue, head first (tests and checks): None for a keyless block, an id for a
        cached one, -1 for an unreachable cached one."""
        out: list = [None] * self.bare
        for b, run in self.cached.items():
            out.extend([b] if b >= 0 else [-1] * run)
        return out

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

    def would_free(self, blocks: list[int], pending: dict[int, int]) -> int:
        """How many of these blocks releasing them would free, after the releases already counted
        in `pending` (block -> references left), which this one joins."""
        ref, out = self.ref, 0
        for b in blocks:
            r = pending.get(b, ref[b]) - 1
            pending[b] = r
            out += r == 0
        return out

    def touch(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                del self.cached[b]             # a hit is cached: it is never bare
                self.n_cached -= 1
            self.ref[b] += 1
        self.refs += len(blocks)

    def _take(self, n: int) -> None:
        """Pop n blocks from the head of the free queue: keyless ones first, then cached ones,
        least recently freed first (each evicted and counted; a reachable one's id is spared)."""
        assert n <= self.bare + self.n_cached, f"allocating {n} blocks with {self.num_blocks - self.used} free"
        m = min(n, self.bare)
        self.bare -= m
        n -= m
        if n:
            cached, key_of, block_of = self.cached, self.key_of, self.block_of
            self.n_cached -= n
            self.evictions += n
            while n:
                b = next(iter(cached))
                if b < 0:
                    run = cached[b]
                    if run > n:                  # the head run shortens in place
                        cached[b] = run - n
                        return
                    del cached[b]
                    n -= run
                else:
                    del cached[b]
                    del block_of[key_of.pop(b)]
                    self.spare.append(b)
                    n -= 1

    def _name(self, n: int) -> list[int]:
        spare, ref = self.spare, self.ref
        cut = len(spare) - n
        out = spare[cut:]
        del spare[cut:]
        for b in out:
            assert ref[b] == 0, f"block {b} reused while referenced"
            ref[b] = 1
        return out

    def allocate(self, n: int) -> list[int]:
        """n blocks from the head of the free queue, as ids (blocks that may be published)."""
        self._take(n)
        self.refs += n
        return self._name(n)

    def allocate_anon(self, n: int) -> None:
        """n blocks from the head of the free queue, held as a count (see the class)."""
        if 0 <= n <= self.bare:                  # (_take's first part, the decode step's usual case)
            self.bare -= n
        else:
            self._take(n)
        self.refs += n
        self.anon += n

    def name(self, n: int) -> list[int]:
        """Ids for n blocks held as a count (their request is about to publish them)."""
        assert 0 <= n <= self.anon, f"naming {n} of {self.anon} blocks held as a count"
        self.anon -= n
        return self._name(n)

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
                    self.n_cached += 1
                else:
                    self.bare += 1
                    self.spare.append(b)

    def release_anon(self, n: int, keyed: int) -> None:
        """Release n blocks held as a count by a request that has finished, whose first `keyed`
        would be cached under keys nobody can ever look up: those go to the tail of the queue
        (one run of unreachable blocks, evicted and counted like any cached block), the rest to
        the head, as publish-then-release would put them."""
        assert 0 <= keyed <= n <= self.anon, f"releasing {n} of {self.anon} blocks held as a count"
        self.anon -= n
        self.refs -= n
        self.bare += n - keyed
        if keyed:
            cached = self.cached
            if cached:
                last = next(reversed(cached))
                if last < 0:                     # the tail is a run already: it grows
                    cached[last] += keyed
                    self.n_cached += keyed
                    return
            self._serial += 1
            cached[-self._serial] = keyed
            self.n_cached += keyed

    def publish(self, blocks: list[int], keys: list[int]) -> None:
        """Cache full blocks under their keys (a key already cached keeps its first block)."""
        for b, k in zip(blocks, keys):
            if b in self.key_of or k in self.block_of:
                continue
            self.key_of[b] = k
            self.block_of[k] = b

    def check(self) -> None:
        """Invariants (tests): every block is free, held by id or held as a count, once; an id
        names a held or a reachable cached block, or is spare; maps agree."""
        ref, cached = self.ref, self.cached
        assert all(r >= 0 for r in ref) and sum(ref) + self.anon == self.refs
        named = [b for b in cached if b >= 0]
        held = {b for b, r in enumerate(ref) if r > 0}
        assert all(run > 0 for b, run in cached.items() if b < 0)
        assert self.n_cached == len(named) + sum(run for b, run in cached.items() if b < 0)
        assert len(held) + self.anon == self.used and self.bare >= 0
        assert not held & set(named) and not (held | set(named)) & set(self.spare)
        assert len(held) + len(named) + len(self.spare) == self.num_blocks
        assert set(self.key_of) <= held | set(named) and all(b in self.key_of for b in named)
        assert all(self.block_of[k] == b for b, k in self.key_of.items())
        assert all(self.key_of.get(b) == k for k, b in self.block_of.items())
