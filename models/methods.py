"""KV-cache compression methods: one spec per kind, and `Method`, one kind at one setting.

A kind is defined once, by the `SPEC` of its module in models/method_specs/ (found by scanning
that folder, so adding a method adds a file and edits none): its family, its settings and their
defaults (the paper's Appendix B.3), its names (labels, the aliases engines and papers use), the
KV-cache bytes it holds, and the traits the step cost reads (what it quantizes, evicts, scores or
votes). Its torch kernel is `rkvsim.kernels.<spec.kernel>`. Every other folder reads the spec;
none lists kinds.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

# Families: what a method does to the cache. The simulator, the inflation model and the
# profiler branch on these and on the spec's traits, never on a kind's name.
BASELINE = "baseline"                 # every token, full precision
QUANTIZING = "quantizing"             # every token, fewer bits
EVICTING = "evicting"                 # at most a fixed number of tokens, chosen as it decodes
PROMPT_COMPRESSING = "prompt-compressing"   # a prompt budget chosen once, at the end of prefill
ENGINE_KV = "engine-kv"               # a serving engine's own KV storage type (llama.cpp -ctk/-ctv)
FAMILIES = (BASELINE, QUANTIZING, EVICTING, PROMPT_COMPRESSING, ENGINE_KV)

SCORE_BYTES = 4   # fp32 accumulated attention score per cached token and KV head (H2O)


@dataclass(frozen=True)
class MethodSpec:
    """Everything rkvsim knows about one kind. Functions take the Method (its settings) first.

    Array functions (`bytes_per_head`, `quantized_tokens`, ...) are written with numpy
    operations so that one formula serves a single request (ints) and a batch (int64 arrays);
    the scalar API in models.kv_bytes converts their results to int."""
    kind: str
    family: str
    doc: str
    settings: dict[str, Any] = field(default_factory=dict)      # name -> default
    check: Callable | None = None                 # check(m): raise ValueError naming the setting
    number: Callable | None = None                # the N of the label "kind-N" (bits, or a budget)
    name: Callable | None = None                  # m -> label, where "kind-N" does not fit the settings
    from_number: Callable | None = None           # from_number(n) -> settings for "kind-N"
    aliases: dict[str, dict] = field(default_factory=dict)   # other names -> settings they imply
    engine_names: tuple[str, ...] = ()            # names in engines' and papers' logs (LMDeploy: KIVI-4)
    kernel: str | None = None                     # module in rkvsim.kernels; None: engine-only
    paper_scores: Callable | None = None          # m -> regex of the paper artifact's LongBench score
                                                  #   files for this setting (negative samples)
    # --- KV cache ---
    bytes_per_head: Callable | None = None        # (m, head_dim, prompt, total, dtype_bytes) -> bytes
    # (m, head_dim, total, dtype_bytes) -> F, (m, head_dim, prompt, dtype_bytes) -> P with bytes_per_head = F + P
    # exactly (integers), P None when the bytes do not depend on the prompt: lets the simulator
    # tabulate a request's bytes by context (kv_memory.KVLayout).
    bytes_parts: tuple[Callable, Callable] | None = None
    token_bytes: Callable | None = None           # (m, model, tp, dtype_bytes) -> marginal bytes per
                                                  #   cached token on one rank (a paged block's slot)
    fixed_bytes: Callable | None = None           # (m, model, tp, dtype_bytes) -> worst extra per request
    token_cap: Callable | None = None             # m -> most tokens held (eviction), or None
    cap_in_prefill: bool = False                  # the cap holds while the prompt is prefilled
    prompt_budget: Callable | None = None         # m -> prompt tokens kept after prefill, or None
    quantized_tokens: Callable | None = None      # (m, n) -> tokens of n held quantized
    quant_bytes_per_token: Callable | None = None   # (m, head_dim, dtype_bytes) -> per quantized token
    # --- what the step cost adds (read by the roofline and the calibrated cost models) ---
    fused_dequant: bool = False                   # attention reads the stored format directly
    dequant_flops: float | None = None            # per element; None: the roofline prior's
    quant_flops: float | None = None
    quantize_launches: bool = True                # quantizing is a kernel of its own (not fused in the write)
    corrections: Any = None                       # GEAR: module-like with segment_bytes/rank/outliers
    score_bytes: int = 0                          # per cached token and KV head (H2O's scores)
    attention_scores: bool = False                # attention must also emit probabilities (H2O)
    prompt_vote: bool = False                     # window queries vote over the prompt (SnapKV)
    fp16_attention_stand_in: bool = False         # unprofiled: FP16 attention over the kept tokens
    # --- prefix caching (simulator/prefix_cache.py) ---
    # (m, length, n) -> how many of a request's first n tokens are held in a form another request
    # with the same tokens can reuse, when the request's own sequence is `length` tokens long
    # (ints or arrays). None: the cache is private to its request. `prefix_why` says why.
    prefix_sharing: Callable | None = None
    prefix_why: str = ""
    window: Callable | None = None                # m -> (sink, recent): a sliding window whose
                                                  #   blocks outside it are freed whole (StreamingLLM)

    @property
    def prefix_shareable(self) -> bool:
        return self.prefix_sharing is not None

    def label(self, m: "Method") -> str:
        if self.name is not None:
            return self.name(m)
        n = self.number(m) if self.number else None
        return self.kind if n is None else f"{self.kind}-{n}"


_SPECS: dict[str, MethodSpec] = {}


def specs() -> dict[str, MethodSpec]:
    """Every kind, keyed by name, from the modules of models/method_specs/ (each has SPEC or SPECS)."""
    if not _SPECS:
        from rkvsim.models import method_specs
        found: dict[str, MethodSpec] = {}
        for info in sorted(pkgutil.iter_modules(method_specs.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            mod = importlib.import_module(f"{method_specs.__name__}.{info.name}")
            for s in getattr(mod, "SPECS", None) or [getattr(mod, "SPEC")]:
                assert s.family in FAMILIES, f"{info.name}: family {s.family!r} not one of {FAMILIES}"
                assert s.kind not in found, f"method kind {s.kind!r} defined twice"
                clash = sorted(set(s.settings) & (set(dir(Method)) | {"kind", "settings"}))
                assert not clash, f"{s.kind}: settings {clash} would hide Method's own attributes"
                found[s.kind] = s
        _SPECS.update(found)
    return _SPECS


def spec_of(kind: str) -> MethodSpec:
    s = specs().get(kind)
    if s is None:
        raise ValueError(f"unknown method {kind!r}; known: {', '.join(kinds())}")
    return s


def kinds(family: str | None = None) -> tuple[str, ...]:
    return tuple(k for k, s in specs().items() if family is None or s.family == family)


@dataclass(frozen=True, init=False)
class Method:
    """One kind at one setting: `Method("kivi", bits=2)`. Settings the kind does not have are
    refused; missing ones take the spec's defaults, so equal settings mean equal Methods.
    Settings read as attributes (`m.bits`)."""
    kind: str
    settings: tuple[tuple[str, Any], ...]

    def __init__(self, kind: str = "fp16", settings: tuple | dict = (), **kw):
        spec = spec_of(kind)
        given = dict(settings)
        given.update(kw)
        bad = sorted(set(given) - set(spec.settings))
        if bad:
            known = ", ".join(spec.settings) or "none"
            raise ValueError(f"unknown setting(s) {bad} for method {kind!r}; known: {known}")
        full = tuple((k, given.get(k, d)) for k, d in spec.settings.items())
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "settings", full)
        for k, v in full:   # plain attributes: the simulator reads settings in its step loop
            object.__setattr__(self, k, v)
        for k, v in full:
            if isinstance(spec.settings[k], (int, float)) and not isinstance(spec.settings[k], bool) \
                    and isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"{kind}.{k} must be >= 0")
        if spec.check:
            spec.check(self)

    def __getattr__(self, name: str):
        # Settings are plain attributes (set in __init__); this runs only for a missing one.
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__dict__.get('kind', 'method')} has no setting {name!r}")

    @property
    def spec(self) -> MethodSpec:
        return spec_of(self.kind)

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def label(self) -> str:
        """Short display name, e.g. 'kivi-4', 'h2o-512'."""
        return self.spec.label(self)

    def replace(self, **kw) -> "Method":
        return Method(self.kind, dict(self.settings), **kw)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dict(self.settings)}

    @property
    def token_cap(self) -> int | None:
        """Hard cap on cached tokens per request (eviction); None if unbounded."""
        s = self.spec
        return s.token_cap(self) if s.token_cap else None

    def cached_tokens(self, prompt_len: int, total_len: int) -> int:
        """Tokens held in the cache once `total_len` tokens (prompt + generated) have been seen."""
        return int(cached_tokens_vec(self, prompt_len, total_len))


def cached_tokens_vec(method: Method, prompt, total):
    """Tokens held per request, over arrays of requests (or single ints)."""
    return cached_tokens_of(method)(prompt, total)


def cached_tokens_of(method: Method) -> Callable:
    """cached_tokens_vec for one method, its cap or prompt budget read once: (prompt, total) ->
    tokens held (the simulator asks every step)."""
    spec = method.spec
    cap = spec.token_cap(method) if spec.token_cap else None
    if cap is not None:
        return lambda prompt, total: np.minimum(total, cap)
    budget = spec.prompt_budget(method) if spec.prompt_budget else None
    if budget is not None:
        return lambda prompt, total: np.minimum(prompt, budget) + (total - prompt)
    return _whole_context


def _whole_context(prompt, total):
    return total


def holds_whole_context(method: Method) -> bool:
    """Whether each cache holds its request's whole context (no cap, no prompt budget), so a
    batch's held tokens are the sum of its contexts (the simulator keeps that sum as it goes)."""
    return cached_tokens_of(method) is _whole_context


def _by_name() -> dict[str, tuple[str, dict]]:
    names: dict[str, tuple[str, dict]] = {}
    for k, s in specs().items():
        names[k] = (k, {})
        for a, st in s.aliases.items():
            names[a.lower()] = (k, st)
    return names


def default_method(kind: str, **overrides) -> Method:
    """A kind (or an alias: 'streaming', 'none', ...) at its defaults, with overrides."""
    k, implied = _by_name().get(kind.lower(), (kind.lower(), {}))
    return Method(k, {**implied, **overrides})


def parse_method(text: str) -> Method:
    """'fp16', 'kivi', 'kivi-2', 'gear-8', 'h2o-512', 'streamingllm-1024', 'snapkv-2048', 'fp8'."""
    t = text.strip().lower()
    names = _by_name()
    if t in names:
        k, implied = names[t]
        return Method(k, implied)
    head, sep, tail = t.rpartition("-")
    if not (sep and tail.isdigit()):
        raise ValueError(f"unknown method {text!r}; known: {', '.join(kinds())} (e.g. kivi-4, h2o-512)")
    if head not in names:
        raise ValueError(f"unknown method {head!r}; known: {', '.join(kinds())}")
    k, implied = names[head]
    spec = specs()[k]
    if spec.from_number is None:
        raise ValueError(f"{k} takes no setting, got {text!r}")
    return Method(k, {**implied, **spec.from_number(int(tail))})


def method_from_entry(entry: str | dict) -> Method:
    """A scenario's method entry: 'kivi-2' or {kind: kivi, bits: 2, residual: 64}."""
    try:
        if isinstance(entry, str):
            return parse_method(entry)
        if isinstance(entry, dict):
            d = dict(entry)
            kind = d.pop("kind", None)
            if kind is None:
                raise ValueError(f"method {entry} needs a 'kind' ({', '.join(kinds())})")
            return default_method(str(kind), **d)
    except TypeError as e:
        raise ValueError(f"bad method {entry!r}: {e}") from None
    raise ValueError(f"method entries are names like 'kivi-4' or mappings with 'kind', got {entry!r}")


def method_from_engine_name(name: str, budget: int) -> Method:
    """A method as engines' logs name it: LMDeploy's 'None-16', 'KIVI-4', 'H2O-16' (for evicting
    and prompt-compressing kinds the number is the payload's bits, 16, and `budget` is the cache)."""
    head, _, num = str(name).rpartition("-")
    head = (head or str(name)).lower()
    for k, s in specs().items():
        if head == k or head in (n.lower() for n in s.engine_names):
            if s.family in (QUANTIZING,) and s.from_number and num.isdigit():
                return Method(k, s.from_number(int(num)))
            if s.family in (EVICTING, PROMPT_COMPRESSING) and s.from_number:
                return Method(k, s.from_number(budget))
            return Method(k)
    known = sorted({n for s in specs().values() for n in s.engine_names})
    raise ValueError(f"method {name!r} unknown; expected one of {', '.join(known)} followed by -<bits>")
