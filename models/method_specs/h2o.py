"""H2O (Zhang et al., 2023): `heavy` tokens with the largest accumulated attention plus the most
recent `recent`; one fp32 accumulated score per cached token and KV head. It holds the whole
prompt while it is prefilled and evicts when the prompt ends."""
import numpy as np

from rkvsim.models.method_specs._eviction import split_budget
from rkvsim.models.method_specs._dense import per_rank
from rkvsim.models.methods import EVICTING, SCORE_BYTES, MethodSpec


def _bytes(m, head_dim, prompt, total, dtype_bytes):
    return np.minimum(total, m.heavy + m.recent) * (2 * head_dim * dtype_bytes + SCORE_BYTES)


def _token_bytes(m, model, tp, dtype_bytes):
    return per_rank(model, tp, (2 * model.head_dim * dtype_bytes + SCORE_BYTES))


SPEC = MethodSpec(
    kind="h2o", family=EVICTING, doc=__doc__,
    settings={"heavy": 64, "recent": 448},
    number=lambda m: m.heavy + m.recent, from_number=split_budget("heavy", 64),
    engine_names=("H2O",),
    kernel="h2o",
    paper_scores=lambda m: rf"^h2o_.*_c{m.heavy + m.recent}_w\d+_",
    bytes_per_head=_bytes, token_bytes=_token_bytes,
    token_cap=lambda m: m.heavy + m.recent,
    score_bytes=SCORE_BYTES, attention_scores=True,
    fp16_attention_stand_in=True,
    prefix_why="which tokens are kept is chosen by the request's own accumulated attention scores, so the kept set differs per request: private",
)
