"""rkvsim.kernels: real torch attention kernels, one small module per KV-cache method.

Interface (see factory.Kernel): `make_kernel(method).prefill(q, k, v) -> (out, cache)`,
`.extend(q, k_new, v_new, cache, last=True) -> (out, cache)` (chunked prefill: c >= 1 new
tokens attending causally over the cache plus themselves; last=False while more chunks of
the prompt follow) and `.decode(q, k_new, v_new, cache) -> (out, cache)`, q (B,Hq,n,d),
k/v (B,Hkv,n,d), Hq a multiple of Hkv, causal prefill. Every cache has `num_tokens` (tokens
held per sequence) and `nbytes` (bytes held in its tensors). After an unchunked prefill
and decode it equals
B * Hkv * rkvsim.models.kv_bytes_per_head(method, d, prompt_len, total_len, dtype_bytes);
after a chunked prefill each module's docstring says what it holds (GEAR: one correction
segment per chunk that quantizes; H2O/SnapKV: the whole prompt until its last chunk).
Eviction caches also carry `positions` (B,Hkv,n): original positions of kept tokens,
bookkeeping that nbytes does not count.

Modules: fp16, kivi, gear, streaming (StreamingLLM), h2o, snapkv; shared helpers in
common (shapes, bytes, gathers), attention (fused SDPA / explicit softmax with attention
mass), quant (group quantizer, bit packing), evicted (the eviction cache).

Compression-side steps, callable alone so a profiler can time them:
- quant.quantize_keys / quant.quantize_values / quant.dequantize, quant.pack_bits / unpack_bits
- kivi.quantize_segment(k, v, method): KIVI group quantization of a block
- kivi.quantize_on_append(cache, method): decode-time quantization of the oldest G tokens
- gear.compress_segment(x, method, keys): outlier extraction + quantization + low rank
- gear.low_rank(residual, rank): the low-rank factorisation alone
- gear.quantize_on_append(cache, method): decode-time GEAR compression of the oldest G
- gear.apply_corrections(x, terms): reconstruction (low-rank add + outlier scatter)
- attention.attention_with_mass(q, k, v, q_offset): explicit attention + per-key mass
- h2o.update_scores(scores, mass), h2o.keep_slots(scores, method), h2o.evict(cache, method)
- snapkv.votes(q, k, method), snapkv.select(q, k, method): prefill-time selection
- streaming.evict(cache, method)
"""
from rkvsim.kernels import attention, common, fp16, gear, h2o, kivi, quant, snapkv, streaming
from rkvsim.kernels.factory import MODULES, Kernel, make_kernel

__all__ = ["make_kernel", "Kernel", "MODULES", "attention", "common", "quant", "fp16", "kivi",
           "gear", "streaming", "h2o", "snapkv"]
