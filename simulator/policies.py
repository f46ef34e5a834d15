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
    graphs: str                 # what cuda_graphs captures (cost_model.StepOverheads.graphs)
    cpu_table: str              # which measured CPU-time line applies (calibration/steps/cpu_overheads.py)
    batch_big: tuple[int, int]  # (tokens, sequences) per step on >= 70 GiB GPUs other than A100s
    batch: tuple[int, int]      # (tokens, sequences) per step elsewhere


POLICIES = {
    # vllm/v1/engine/arg_utils: enable_prefix_caching and chunked prefill default on for V1;
    # vllm/config/compilation: CUDA graphs captured unless enforce_eager, FULL_AND_PIECEWISE
    # (decode-only batches fully graphed, mixed ones piecewise); vllm/v1/core/kv_cache_manager.py:
    # the watermark is optional and 0 unless set; vllm/engine/arg_utils.py (the V1 batch defaults
    # for the OpenAI API server): 8,192 tokens and 1,024 sequences on big GPUs, else 2,048 and 256.
    "vllm-v1": PolicyDefaults(True, True, True, "measured", "exact", "whole", 0.0, 16,
                              "decode+piecewise", "v1", (8192, 1024), (2048, 256)),
    # rkvsim's numbers before policies had names; V0 graphs decode-only batches
    # (vllm/worker/model_runner.py) when cuda_graphs is set.
    "vllm-v0": PolicyDefaults(False, False, False, "prior", "reserved", "compacted", 0.01, 16,
                              "decode", "v0", (8192, 256), (8192, 256)),
    # lmdeploy/messages.py PytorchEngineConfig: eager_mode False (CUDA graphs, decode only:
    # lmdeploy/pytorch/models/utils/cudagraph.py), enable_prefix_caching False, block_size 64,
    # max_prefill_token_num 4096.
    "lmdeploy": PolicyDefaults(False, False, True, "measured", "exact", "whole", 0.0, 64,
                               "decode", "v0", (4096, 256), (4096, 256)),
}

GIB = 1024 ** 3


def batch_defaults(sc, hw) -> None:
    """Fill max_batch_size and max_batched_tokens left unset with the policy's defaults on this
    hardware (upstream's depend on the GPU: vLLM V1 gives GPUs of at least 70 GiB that are not
    A100s larger batches)."""
    d = POLICIES[sc.policy]
    big = hw.memory_bytes >= 70 * GIB and "a100" not in hw.name
    tokens, seqs = d.batch_big if big else d.batch
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
