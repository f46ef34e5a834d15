"""llama.cpp's KV-cache types (-ctk/-ctv): the "method" of a llama.cpp server, block-quantized by
ggml, no residual window, no eviction. q8_0: 32 int8 + one fp16 scale = 34 bytes per 32 values;
q4_0: 32 4-bit values + one fp16 scale = 18 bytes per 32. Costs come from an engine profile
(simulator/llamacpp_cost.py), so there is no torch kernel."""
from rkvsim.models.method_specs._dense import per_rank
from rkvsim.models.methods import ENGINE_KV, MethodSpec

# (values per block, bytes per block) as ggml stores them.
GGML_BLOCK = {"f16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18)}


def row_bytes(kv_type: str, n: int) -> int:
    """Bytes of n values (one token's K or V for one head) stored as a llama.cpp KV type."""
    per, size = GGML_BLOCK[kv_type]
    return -(-n // per) * size


def _spec(kv_type: str) -> MethodSpec:
    def _bytes(m, head_dim, prompt, total, dtype_bytes):
        return total * 2 * row_bytes(kv_type, head_dim)

    def _token_bytes(m, model, tp, dtype_bytes):
        return per_rank(model, tp, 2 * row_bytes(kv_type, model.head_dim))

    return MethodSpec(kind=kv_type, family=ENGINE_KV, doc=__doc__, kernel=None,
                      bytes_per_head=_bytes, token_bytes=_token_bytes, prefix_sharing=lambda m, length, n: n,
                      prefix_why="ggml block quantization is per row of 32 values of one token: "
                                 "equal prefixes, equal cells")


SPECS = [_spec(t) for t in GGML_BLOCK]
