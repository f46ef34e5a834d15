"""The configurations a collection times, by name, and the reductions a small host needs.

Prefill rows are (kv_len = tokens already cached, new_tokens = chunk) points: whole-prompt
prefills (kv_len 0, new_tokens in `prefill_tokens`) and chunks of `prefill_chunk_tokens`
landing on a past of `prefill_kv_lens` tokens (see Grid.prefill_points). Decode rows are one
token per sequence over a cache built from `decode_kv_lens` tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from rkvsim.models import ModelSpec

from rkvsim.profiler.timing import TimingPolicy


@dataclass(frozen=True)
class Grid:
    name: str
    prefill_batch_sizes: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    decode_batch_sizes: tuple[int, ...]
    decode_kv_lens: tuple[int, ...]
    dense_tokens: tuple[int, ...]
    policy: TimingPolicy
    prefill_chunk_tokens: tuple[int, ...] = ()
    prefill_kv_lens: tuple[int, ...] = ()

    def prefill_points(self) -> list[tuple[int, int]]:
        """(kv_len, new_tokens) of every prefill row, sorted, without repeats: whole prompts
        plus every chunk size at every past length."""
        points = {(0, n) for n in self.prefill_tokens}
        points |= {(p, c) for p in self.prefill_kv_lens for c in self.prefill_chunk_tokens}
        return sorted(points)

    def as_dict(self) -> dict:
        d = asdict(self)
        # JSON has no tuples; lists compare equal to what json.load gives back on resume.
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


GRIDS: dict[str, Grid] = {
    # Test-sized: seconds on two cores, still crosses KIVI's residual window (128) and
    # SnapKV's window (32). Its one chunk (64 tokens on a 160-token past) lands on a partly
    # quantized past and triggers a KIVI/GEAR quantization event.
    "tiny": Grid("tiny", (1, 2), (64, 192), (1, 2), (64, 192), (1, 16),
                 TimingPolicy(warmup=1, min_repeats=2, max_repeats=3, budget_s=0.02),
                 prefill_chunk_tokens=(64,), prefill_kv_lens=(160,)),
    # A few minutes on a 2-core CPU for SmolLM2-135M with all six methods.
    "quick": Grid("quick", (1, 4), (128, 512, 2048), (1, 4, 16), (128, 512, 2048),
                  (1, 8, 32, 128, 512, 2048),
                  TimingPolicy(warmup=1, min_repeats=3, max_repeats=7, budget_s=0.5),
                  prefill_chunk_tokens=(128, 512), prefill_kv_lens=(0, 512, 2048)),
    # Calibration-sized; meant for a GPU (hours on a CPU).
    "full": Grid("full", (1, 2, 4, 8, 16), (64, 128, 256, 512, 1024, 2048, 4096),
                 (1, 2, 4, 8, 16, 32, 64, 128), (128, 256, 512, 1024, 2048, 3072, 4096),
                 (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
                 TimingPolicy(warmup=3, min_repeats=5, max_repeats=30, budget_s=2.0),
                 prefill_chunk_tokens=(256, 512, 1024, 2048), prefill_kv_lens=(512, 1024, 2048, 3072)),
}


def get_grid(name: str) -> Grid:
    try:
        return GRIDS[name]
    except KeyError:
        raise KeyError(f"unknown grid {name!r}; known: {', '.join(GRIDS)}") from None


# On a CPU, attention over more than this many query channels (heads x head_dim) per
# sequence makes the quick grid take tens of minutes and gigabytes (LLaMA-2-7B: 32 x 128).
CPU_MAX_Q_CHANNELS = 1024


@dataclass(frozen=True)
class AttentionHeads:
    num_q_heads: int
    num_kv_heads: int
    reduced: bool


def attention_heads(model: ModelSpec, device_kind: str, requested_q_heads: int | None = None) -> AttentionHeads:
    """Heads to time attention with. Cuts keep the model's grouped-query ratio and head_dim,
    so every row is a real measurement of that many heads (recorded per row and in meta)."""
    group = model.num_heads // model.num_kv_heads
    q = model.num_heads
    if requested_q_heads is not None:
        q = requested_q_heads
    elif device_kind == "cpu" and model.num_heads * model.head_dim > CPU_MAX_Q_CHANNELS:
        q = max(group, CPU_MAX_Q_CHANNELS // model.head_dim // group * group)
    if q <= 0 or q > model.num_heads or q % group:
        raise ValueError(f"attention heads {q} must be a positive multiple of the model's "
                         f"group size {group} and at most {model.num_heads}")
    return AttentionHeads(q, q // group, q != model.num_heads)

