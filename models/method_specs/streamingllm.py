"""StreamingLLM (Xiao et al., 2024): the first `sink` tokens and the most recent `recent` tokens;
the window applies from the first prefill chunk on."""
import numpy as np

from rkvsim.models.method_specs._eviction import split_budget
from rkvsim.models.method_specs._dense import per_rank
from rkvsim.models.methods import EVICTING, MethodSpec


def _bytes(m, head_dim, prompt, total, dtype_bytes):
    return np.minimum(total, m.sink + m.recent) * (2 * head_dim * dtype_bytes)


def _token_bytes(m, model, tp, dtype_bytes):
    return per_rank(model, tp, (2 * model.head_dim * dtype_bytes))


SPEC = MethodSpec(
    kind="streamingllm", family=EVICTING, doc=__doc__,
    settings={"sink": 64, "recent": 448},
    number=lambda m: m.sink + m.recent, from_number=split_budget("sink", 64),
    aliases={"stream": {}, "streaming": {}, "streaming-llm": {}},
    engine_names=("StreamingLLM", "stream"),
    kernel="streaming",
    paper_scores=lambda m: rf"^streamingllm_.*_c{m.sink + m.recent}_w\d+_",
    bytes_per_head=_bytes, token_bytes=_token_bytes,
    token_cap=lambda m: m.sink + m.recent, cap_in_prefill=True,
    fp16_attention_stand_in=True,
    window=lambda m: (m.sink, m.recent),
    prefix_sharing=lambda m, length, n: np.where(length <= m.sink + m.recent, n, 0),
    prefix_why="plain fp16 KV until the sequence passes its cap; past it the window has dropped the middle and "
               "re-positioned what it keeps, so the cache no longer equals another request's prefix: private",
)
