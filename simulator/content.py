"""What requests' prompts are made of, for prefix caching: shared system prompts and multi-turn
sessions (workload.shared_prefix, workload.sessions). A request is a list of segments
(id, tokens); equal ids are equal text (simulator/prefix_cache.py keys blocks by them).

Segment ids: system prompt g is 2*n + g; request r's own question is 2*r and its reply 2*r + 1,
where n is the number of requests. A reply of another length than the workload's (a method that
answers longer) is other text, so it gets an id that no history holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Structure:
    prompt: np.ndarray                 # full prompt tokens per request (system prompt, history included)
    prefix: list                       # per request: its prompt's segments [(id, tokens)]
    parent: np.ndarray                 # the previous turn of a session, or -1
    reply_base: np.ndarray             # the workload's reply lengths (what later turns' history holds)
    other_reply: int                   # id offset of replies that differ from the history's


def build_structure(cfg, question: np.ndarray, output: np.ndarray, rng: np.random.Generator) -> Structure | None:
    """Prompts of a shared-prefix or session workload from the sampled lengths (`question` is the
    sampled prompt length). None when the workload has neither: every request is its own text."""
    sp, ss = cfg.shared_prefix, cfg.sessions
    if sp is None and ss is None:
        return None
    n = len(question)
    groups = sp.groups if sp is not None else 0
    group = rng.integers(0, groups, size=n) if sp is not None else None
    parent = np.full(n, -1, np.int64)
    prompt = np.zeros(n, np.int64)
    prefix: list = [None] * n
    turns = ss.turns if ss is not None else 1
    for r in range(n):
        head = r - r % turns
        if ss is not None and r > head:
            p = r - 1
            parent[r] = p
            segs = prefix[p] + [(2 * p + 1, int(output[p])), (2 * r, int(question[r]))]
        else:
            g = int(group[head]) if group is not None else -1
            segs = ([(2 * n + g, sp.tokens)] if g >= 0 else []) + [(2 * r, int(question[r]))]
        prefix[r] = segs
        prompt[r] = sum(t for _, t in segs)
    return Structure(prompt, prefix, parent, output.astype(np.int64), 2 * n * (groups + 1))


def content_of(st: Structure, output: np.ndarray):
    """content(rid) for a replica: the prompt's segments, then the reply as generated (`output`)."""
    def content(rid: int):
        o = int(output[rid])
        rid_reply = 2 * rid + 1 if o == st.reply_base[rid] else 2 * rid + 1 + st.other_reply
        return st.prefix[rid] + [(rid_reply, o)]
    return content
