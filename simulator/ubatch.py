"""How llama.cpp cuts one llama_decode batch into the physical batches (ubatches) it computes.

A server iteration is one llama_decode call, but the cost is paid per ubatch: every ubatch
reads all the weights once, and small ubatches use the CPU's matrix kernels poorly. llama.cpp
(src/llama-kv-cache.cpp, init_batch; src/llama-batch.cpp, split_equal / split_simple at
commit 0c1e570) splits as follows:
  * one KV stream (kv_unified, or a single sequence slot): consecutive runs of n_ubatch tokens
    in batch order (split_simple);
  * one stream per slot (the server's default, and llama-batched-bench's): split_equal with
    `sequential`: walking the unused tokens in batch order, a ubatch takes the sequence of the
    first one, then each later sequence whose id is exactly one more than the last taken; it
    then takes the same number of tokens from every taken sequence, as many as the shortest
    has left, while n_seqs x tokens stays within n_ubatch.
So decode tokens of slots {0, 1, 3} are two ubatches ({0, 1} and {3}), and a prompt that joins
decodes is cut into one token beside them and the rest on its own.

A batch here is a list of (sequence id, tokens) segments in batch order, as the server adds
them: one token per generating slot in slot order, then prompt chunks in slot order.
Returns, per ubatch, the (sequence id, tokens) it takes from each sequence.
"""
from __future__ import annotations


def split_simple(segments: list[tuple[int, int]], n_ubatch: int) -> list[list[tuple[int, int]]]:
    out: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    room = n_ubatch
    for seq, n in segments:
        while n > 0:
            take = min(n, room)
            cur.append((seq, take))
            n -= take
            room -= take
            if room == 0:
                out.append(cur)
                cur, room = [], n_ubatch
    if cur:
        out.append(cur)
    return out


def split_equal(segments: list[tuple[int, int]], n_ubatch: int) -> list[list[tuple[int, int]]]:
    # Tokens left per sequence, and the batch position of each sequence's first unused token
    # (a sequence's tokens are used front to back, so that is its first segment with tokens left).
    left: dict[int, int] = {}
    order: list[int] = []            # sequences by the position of their first token
    for seq, n in segments:
        if n <= 0:
            continue
        if seq not in left:
            left[seq] = 0
            order.append(seq)
        left[seq] += n
    out: list[list[tuple[int, int]]] = []
    while any(left[s] > 0 for s in order):
        taken: list[int] = []
        for seq in order:
            if left[seq] == 0:
                continue
            if not taken or seq == taken[-1] + 1:
                taken.append(seq)
                if len(taken) > n_ubatch:
                    break
        per = min(min(left[s] for s in taken), max(1, n_ubatch // len(taken)))
        out.append([(s, per) for s in taken])
        for s in taken:
            left[s] -= per
    return out


def split(segments: list[tuple[int, int]], n_ubatch: int, streams: int) -> list[list[tuple[int, int]]]:
    return split_simple(segments, n_ubatch) if streams == 1 else split_equal(segments, n_ubatch)
