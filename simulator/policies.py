"""Scheduler policies by name: which engine's rules a paged replica follows, and the defaults
that engine ships with. The rules themselves live in replica.py, each citing its upstream file.

- vllm-v1: vLLM's V1 engine (vllm/v1/core/sched/scheduler.py). Chunked prefill always on, one
  token budget shared by running requests first and waiting ones after, preemption of the tail of
  `running`, nothing admitted in a step that preempted, prefix caching on, decode under CUDA graphs.
- vllm-v0: vLLM's V0 engine as rkvsim modelled it before policies had names (same numbers):
  prefill-only steps when a prompt can be admitted, the most recently admitted decode preempted,
  1% admission watermark, the worst-case residual window reserved, the roofline's eager launches
  and constant CPU time.
- lmdeploy: LMDeploy's PyTorch engine (lmdeploy/pytorch/paging/scheduler.py, engine.py), the
  paper's engine: a step is all-prefill or all-decode; waiting prompts are tried every
  `prefill_interval` decode steps (or at once when nothing runs).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyDefaults:
    chunked_prefill: bool
    enable_prefix_caching: bool
    cuda_graphs: bool
    cpu_overhead: str           # "measured" | "prior"
    kv_blocks: str              # "exact" | "reserved"
    eviction_blocks: str        # "whole" | "compacted"
    watermark: float            # share of blocks kept free when admitting (running requests grow into it)
    block_size: int             # tokens per KV block


POLICIES = {
    # vllm/v1/engine/arg_utils: enable_prefix_caching and chunked prefill default on for V1;
    # vllm/config/compilation: CUDA graphs captured unless enforce_eager.
    # vllm/v1/core/kv_cache_manager.py: the watermark is optional and 0 unless set.
    "vllm-v1": PolicyDefaults(True, True, True, "measured", "exact", "whole", 0.0, 16),
    "vllm-v0": PolicyDefaults(False, False, False, "prior", "reserved", "compacted", 0.01, 16),
    # lmdeploy/messages.py PytorchEngineConfig: eager_mode False (CUDA graphs), enable_prefix_caching
    # False, block_size 64, max_prefill_token_num 4096.
    "lmdeploy": PolicyDefaults(False, False, True, "measured", "exact", "whole", 0.0, 64),
}

GIB = 1024 ** 3


def batch_defaults(sc, hw) -> None:
    """Fill max_batch_size and max_batched_tokens left unset with the engine's defaults on this
    hardware (a scheduler's own limits, so they depend on the GPU as upstream's do):
    - vllm-v1: vllm/engine/arg_utils.py (EngineArgs, the V1 batch defaults) for the OpenAI API
      server: GPUs with at least 70 GiB that are not A100s get 8,192 tokens and 1,024 sequences
      per step, others 2,048 tokens and 256 sequences.
    - vllm-v0: 8,192 tokens and 256 sequences (rkvsim's old defaults, for the old numbers).
    - lmdeploy: max_prefill_token_num 4,096 and 256 sequences (PytorchEngineConfig)."""
    if sc.policy == "vllm-v1":
        big = hw.memory_bytes >= 70 * GIB and "a100" not in hw.name
        tokens, seqs = (8192, 1024) if big else (2048, 256)
    elif sc.policy == "lmdeploy":
        tokens, seqs = 4096, 256
    else:
        tokens, seqs = 8192, 256
    if sc.max_batched_tokens is None:
        object.__setattr__(sc, "max_batched_tokens", tokens)
    if sc.max_batch_size is None:
        object.__setattr__(sc, "max_batch_size", seqs)


def scheduler_with(sc, changes: dict | None, hw):
    """The scheduler with an arm's changes: re-validated from the fields the user set, so that a
    changed policy brings its own defaults (`hw`: the scenario's HardwareSpec)."""
    if not changes:
        return sc
    out = type(sc).model_validate({**sc.model_dump(include=sc.model_fields_set), **changes})
    if out.kind == "paged":
        batch_defaults(out, hw)
    return out
