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


POLICIES = {
    # vllm/v1/engine/arg_utils: enable_prefix_caching and chunked prefill default on for V1;
    # vllm/config/compilation: CUDA graphs captured unless enforce_eager.
    "vllm-v1": PolicyDefaults(True, True, True, "measured", "exact", "whole", 0.0),
    "vllm-v0": PolicyDefaults(False, False, False, "prior", "reserved", "compacted", 0.01),
    # lmdeploy/messages.py PytorchEngineConfig: eager_mode False (CUDA graphs), enable_prefix_caching False.
    "lmdeploy": PolicyDefaults(False, False, True, "measured", "exact", "whole", 0.0),
}


def scheduler_with(sc, changes: dict | None):
    """The scheduler with an arm's changes: re-validated from the fields the user set, so that a
    changed policy brings its own defaults."""
    if not changes:
        return sc
    return type(sc).model_validate({**sc.model_dump(include=sc.model_fields_set), **changes})
