"""FP16: the uncompressed baseline; every token's K and V in the model's dtype."""
from rkvsim.models.method_specs._dense import per_rank
from rkvsim.models.methods import BASELINE, MethodSpec


def _bytes(m, head_dim, prompt, total, dtype_bytes):
    return total * (2 * head_dim * dtype_bytes)


def _token_bytes(m, model, tp, dtype_bytes):
    return per_rank(model, tp, (2 * model.head_dim * dtype_bytes))


SPEC = MethodSpec(
    kind="fp16", family=BASELINE, doc=__doc__,
    aliases={"none": {}, "baseline": {}, "fp": {}},
    engine_names=("None", "fp16"),
    kernel="fp16",
    bytes_per_head=_bytes, token_bytes=_token_bytes,
    prefix_sharing=lambda m, length, n: n,
    prefix_why="a token's K/V depends only on the tokens before it: equal prefixes, equal blocks",
)
