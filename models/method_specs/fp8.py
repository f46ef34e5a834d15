"""FP8 KV cache (e4m3), as vLLM's `--kv-cache-dtype fp8`: every K and V element stored in one byte,
with one scale per layer for all of K (and one for V), or one per KV head (`scale: head`).

The scales are per layer and shared by every request (vLLM reads them from the checkpoint or
computes them once, on the first batch), so a request's cache is its payload alone: 2 * d bytes
per token and head, no full-precision window, nothing evicted. Serving kernels (FlashAttention,
FlashInfer) read the fp8 cache and dequantize in registers, and the cache write quantizes in the
same kernel that stores K/V, so FP8 adds element-wise work but no launch and no fp16 round trip
through DRAM."""
import numpy as np

from rkvsim.models.method_specs._dense import per_rank
from rkvsim.models.methods import QUANTIZING, MethodSpec

PAYLOAD_BYTES = 1   # e4m3


def _check(m) -> None:
    if m.scale not in ("tensor", "head"):
        raise ValueError(f"fp8.scale must be 'tensor' or 'head', got {m.scale!r}")


def _bytes(m, head_dim, prompt, total, dtype_bytes):
    return total * (2 * head_dim * PAYLOAD_BYTES)


def _token_bytes(m, model, tp, dtype_bytes):
    return per_rank(model, tp, (2 * model.head_dim * PAYLOAD_BYTES))


SPEC = MethodSpec(
    kind="fp8", family=QUANTIZING, doc=__doc__,
    settings={"scale": "tensor"}, check=_check,
    number=lambda m: 8,
    name=lambda m: "fp8" if m.scale == "tensor" else "fp8-head",
    aliases={"fp8-e4m3": {}, "fp8_e4m3": {}, "fp8-head": {"scale": "head"}},
    engine_names=("fp8", "fp8_e4m3"),
    kernel="fp8",
    bytes_per_head=_bytes, token_bytes=_token_bytes,
    quantized_tokens=lambda m, n: np.asarray(n) * 1,   # every token, from the first
    quant_bytes_per_token=lambda m, head_dim, dtype_bytes: float(2 * head_dim * PAYLOAD_BYTES),
    fused_dequant=True,
    dequant_flops=2.0,        # convert + scale multiply, in the attention kernel's registers
    quant_flops=3.0,          # scale, saturate, convert, in the cache-write kernel
    quantize_launches=False,
    fp16_attention_stand_in=True,
    prefix_sharing=lambda m, length, n: n,
    prefix_why="each token is cast with static scales (per layer or per KV head, never per request), so equal "
               "prefixes give equal fp8 blocks",
)
