"""SnapKV (Li et al., 2024): at the end of prefill the last `window` prompt tokens vote (attention
summed over the window, max-pooled over `kernel` positions) for the `budget` prompt tokens kept;
every generated token is kept. Prompts within the budget are left whole."""
import numpy as np

from rkvsim.models.method_specs._dense import per_rank
from rkvsim.models.methods import PROMPT_COMPRESSING, MethodSpec


def _check(m) -> None:
    if m.budget < m.window:
        raise ValueError("snapkv.budget must be at least snapkv.window")


def _bytes(m, head_dim, prompt, total, dtype_bytes):
    return (np.minimum(prompt, m.budget) + (total - prompt)) * (2 * head_dim * dtype_bytes)


def _token_bytes(m, model, tp, dtype_bytes):
    return per_rank(model, tp, (2 * model.head_dim * dtype_bytes))


SPEC = MethodSpec(
    kind="snapkv", family=PROMPT_COMPRESSING, doc=__doc__,
    settings={"budget": 1024, "window": 32, "kernel": 7}, check=_check,
    number=lambda m: m.budget, from_number=lambda n: {"budget": n},
    engine_names=("SnapKV",),
    kernel="snapkv",
    bytes_per_head=_bytes, token_bytes=_token_bytes,
    prompt_budget=lambda m: m.budget, prompt_vote=True,
    fp16_attention_stand_in=True,
    prefix_why="the prompt tokens kept are voted by the request's last window of queries (its own question), so two requests with one system prompt keep different tokens: private",
)
