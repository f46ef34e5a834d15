"""KV-cache compression methods and their settings (defaults: the paper's Appendix B.3)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

KINDS = ("fp16", "kivi", "gear", "streamingllm", "h2o", "snapkv", "f16", "q8_0", "q4_0")
QUANTIZED = ("kivi", "gear")
EVICTING = ("streamingllm", "h2o", "snapkv")
# llama.cpp's KV-cache types (-ctk/-ctv): the "method" of a llama.cpp server. Block-quantized
# by ggml (models.kv_bytes.GGML_BLOCK), no residual window, no eviction.
LLAMACPP_KV = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class Method:
    """One method at one setting. Only the fields of its kind matter; the rest keep defaults."""
    kind: str = "fp16"
    bits: int = 16            # kivi, gear: bits of the quantized payload
    group_size: int = 32      # kivi, gear: tokens (keys) / channels (values) sharing one scale+zero
    residual: int = 128       # kivi, gear: most recent tokens kept in full precision
    rank_frac: float = 0.02   # gear: low-rank rank as a fraction of min(tokens, head_dim)
    outlier_frac: float = 0.02  # gear: share of entries kept exactly as sparse outliers
    sink: int = 64            # streamingllm: first tokens always kept
    heavy: int = 64           # h2o: heavy hitters kept by accumulated attention
    recent: int = 448         # streamingllm, h2o: most recent tokens kept
    budget: int = 1024        # snapkv: prompt tokens kept after prefill (window included)
    window: int = 32          # snapkv: last prompt tokens that vote
    kernel: int = 7           # snapkv: max-pool width over the votes

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown method {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind in QUANTIZED and self.bits not in (2, 4, 8):
            raise ValueError(f"{self.kind}.bits must be 2, 4 or 8, got {self.bits}")
        if self.kind == "fp16" and self.bits != 16:
            raise ValueError("fp16 has no 'bits' setting")
        for f in ("group_size", "residual", "sink", "heavy", "recent", "budget", "window", "kernel"):
            if getattr(self, f) < 0:
                raise ValueError(f"{self.kind}.{f} must be >= 0")
        if self.kind == "snapkv" and self.budget < self.window:
            raise ValueError("snapkv.budget must be at least snapkv.window")

    @property
    def label(self) -> str:
        """Short display name, e.g. 'kivi-4', 'h2o-512'."""
        if self.kind in QUANTIZED:
            return f"{self.kind}-{self.bits}"
        if self.kind == "streamingllm":
            return f"streamingllm-{self.sink + self.recent}"
        if self.kind == "h2o":
            return f"h2o-{self.heavy + self.recent}"
        if self.kind == "snapkv":
            return f"snapkv-{self.budget}"
        if self.kind in LLAMACPP_KV:
            return self.kind
        return "fp16"

    @property
    def token_cap(self) -> int | None:
        """Hard cap on cached tokens per request (StreamingLLM, H2O); None if unbounded."""
        if self.kind == "streamingllm":
            return self.sink + self.recent
        if self.kind == "h2o":
            return self.heavy + self.recent
        return None

    def cached_tokens(self, prompt_len: int, total_len: int) -> int:
        """Tokens held in the cache once `total_len` tokens (prompt + generated) have been seen."""
        cap = self.token_cap
        if cap is not None:
            return min(total_len, cap)
        if self.kind == "snapkv":
            return min(prompt_len, self.budget) + (total_len - prompt_len)
        return total_len


def cached_tokens_vec(method: Method, prompt: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Method.cached_tokens over arrays of requests (the simulator's and roofline's hot path)."""
    cap = method.token_cap
    if cap is not None:
        return np.minimum(total, cap)
    if method.kind == "snapkv":
        return np.minimum(prompt, method.budget) + (total - prompt)
    return total


def default_method(kind: str, **overrides) -> Method:
    """The paper's setting of a method; `bits` defaults to 4 for quantizers."""
    kind = kind.lower()
    if kind in ("stream", "streaming", "streaming-llm"):
        kind = "streamingllm"
    if kind in ("none", "baseline", "fp"):
        kind = "fp16"
    base = {"bits": 4} if kind in QUANTIZED else {}
    base.update(overrides)
    known = {f.name for f in fields(Method)}
    bad = sorted(set(base) - known)
    if bad:
        raise ValueError(f"unknown setting(s) {bad} for method {kind!r}; known: {sorted(known - {'kind'})}")
    return Method(kind=kind, **base)


def parse_method(text: str) -> Method:
    """'fp16', 'kivi', 'kivi-2', 'gear-8', 'h2o-512', 'streamingllm-1024', 'snapkv-2048'."""
    t = text.strip().lower()
    head, sep, tail = t.rpartition("-")
    kind, num = (head, tail) if sep and tail.isdigit() else (t, "")
    m = default_method(kind)
    if not num:
        return m
    n = int(num)
    if m.kind in QUANTIZED:
        return replace(m, bits=n)
    if m.kind == "streamingllm":
        return replace(m, sink=min(m.sink, n // 8), recent=n - min(m.sink, n // 8))
    if m.kind == "h2o":
        return replace(m, heavy=min(m.heavy, n // 8), recent=n - min(m.heavy, n // 8))
    if m.kind == "snapkv":
        return replace(m, budget=n)
    raise ValueError(f"fp16 takes no setting, got {text!r}")
