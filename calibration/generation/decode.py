"""Generation through the kernel attention: one prompt, one or several configs at once.

Several configs of the same prompt decode as one batch (generation/attention.py: RunGroup): the
prompt is prefilled once, then each step feeds every unfinished row its own last token.
All rows sit at the same position at every step, so one position id serves all, and each
row keeps its own per-layer kernel caches (the kernels see batch 1). Finished rows stay
in the batch as idle rows so the batch size, and with it the arithmetic of the dense
layers, is the same from the first step to the last.

Sampling is inverse-CDF with one uniform draw per step from a torch.Generator seeded per
request, so a rerun with the same seed, batch layout, model and library versions gives
the same tokens, and requests sharing a seed share their random stream.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rkvsim.models import Method

from rkvsim.calibration.generation.attention import DEFAULT_KV_DTYPE, KernelRun, RunGroup

STOP = "stop"       # the model emitted an end-of-turn / end-of-text token
LENGTH = "length"   # max_new_tokens reached


@dataclass(frozen=True)
class Request:
    method: Method | str
    temperature: float = 1.0
    seed: int = 0
    top_p: float = 1.0


@dataclass
class Generation:
    token_ids: list[int]     # generated tokens, the stop token excluded
    finish_reason: str       # STOP or LENGTH
    prefill_s: float         # the group's shared prefill
    decode_s: float          # from the end of prefill until this row finished
    cache_nbytes: int        # all layers' cache bytes when the row finished

    @property
    def hit_cap(self) -> bool:
        return self.finish_reason == LENGTH


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token from 1-D logits. temperature 0 is greedy; top_p < 1 keeps the smallest set
    of most likely tokens whose mass reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p   # tokens before the mass reaches top_p, plus one
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    cdf = probs.cumsum(0)
    u = torch.rand((), generator=gen, dtype=torch.float64) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u.reshape(1), right=True)), probs.numel() - 1)


def generate_group(model, prompt_ids: list[int], requests: list[Request | None], *,
                   max_new_tokens: int = 512, stop_ids=(), kv_dtype: torch.dtype = DEFAULT_KV_DTYPE
                   ) -> list[Generation | None]:
    """Generate for each request (None: an idle row, kept for a fixed batch layout).

    The model must already use the kernel attention (generation/attention.py: use_kernels)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    stops = set(int(s) for s in stop_ids)
    n = len(prompt_ids)
    runs = [None if r is None else KernelRun.for_method(r.method, kv_dtype) for r in requests]
    gens = [None if r is None else torch.Generator().manual_seed(r.seed) for r in requests]
    outs: list[list[int]] = [[] for _ in requests]
    results: list[Generation | None] = [None] * len(requests)
    group = RunGroup(list(runs), kv_dtype, shared=True)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = _forward(model, torch.tensor([prompt_ids]), 0, group)
        t1 = time.perf_counter()
        rows = [logits[0]] * len(requests)   # the prefill is shared: same logits for every row
        group.shared = False
        while True:
            now = time.perf_counter() - t1
            for i, req in enumerate(requests):
                if group.runs[i] is None:
                    continue
                tok = sample(rows[i], req.temperature, req.top_p, gens[i])
                done = tok in stops
                if not done:
                    outs[i].append(tok)
                    done = len(outs[i]) == max_new_tokens   # no forward for a token never read
                if done:
                    results[i] = Generation(outs[i], STOP if tok in stops else LENGTH, t1 - t0, now,
                                            group.runs[i].nbytes)
                    group.runs[i] = None   # idle from now on; frees its caches
            if all(r is None for r in group.runs):
                return results
            step = len(next(o for o, r in zip(outs, group.runs) if r is not None))
            ids = torch.tensor([[o[-1] if r is not None else 0] for o, r in zip(outs, group.runs)])
            rows = _forward(model, ids, n + step - 1, group)


def generate(model, prompt_ids: list[int], method: Method | str, *, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 512, seed: int = 0, stop_ids=(),
             kv_dtype: torch.dtype = DEFAULT_KV_DTYPE) -> Generation:
    """One request alone (a group of one row)."""
    return generate_group(model, prompt_ids, [Request(method, temperature, seed, top_p)],
                          max_new_tokens=max_new_tokens, stop_ids=stop_ids, kv_dtype=kv_dtype)[0]


def _forward(model, ids: torch.Tensor, start: int, rkv_run) -> torch.Tensor:
    """Logits (fp32, (B, vocab)) of the last of `ids` per row; the tokens sit at start.."""
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    res = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1, rkv_run=rkv_run)
    return res.logits[:, -1].float()
