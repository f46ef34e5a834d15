"""LLM architectures as plain numbers (public model configs), resolvable by many names."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    tied_embeddings: bool = False
    gated_mlp: bool = True
    weight_dtype_bytes: int = 2
    sliding_window: int | None = None    # attention (and the KV kept) spans the last N tokens

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        h = self.hidden_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return attn + mlp + 2 * h  # two RMSNorm weight vectors

    @property
    def num_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tied_embeddings else emb
        return emb + head + self.num_layers * self.params_per_layer + self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.weight_dtype_bytes


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("llama-2-7b", "meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 128, 11008, 32000, 4096),
        ModelSpec("llama-2-13b", "meta-llama/Llama-2-13b-hf", 40, 5120, 40, 40, 128, 13824, 32000, 4096),
        ModelSpec("llama-2-70b", "meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 128, 28672, 32000, 4096),
        ModelSpec("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 32, 4096, 32, 8, 128, 14336, 128256, 8192),
        ModelSpec("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256, 131072),
        ModelSpec("mistral-7b", "mistralai/Mistral-7B-v0.1", 32, 4096, 32, 8, 128, 14336, 32000, 32768,
                  sliding_window=4096),
        ModelSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, 9, 3, 64, 1536, 49152, 8192,
                  tied_embeddings=True),
    ]
}

# Extra spellings users and the shared data use; keys are normalised by _key().
_ALIASES = {
    "llama2-7b": "llama-2-7b", "llama-7b": "llama-2-7b", "llama-2-7b-hf": "llama-2-7b",
    "llama-2-7b-chat-hf": "llama-2-7b", "llama-2-13b-hf": "llama-2-13b", "llama-2-13b-chat-hf": "llama-2-13b",
    "llama-13b": "llama-2-13b", "llama-2-70b-hf": "llama-2-70b", "llama-2-70b-chat-hf": "llama-2-70b",
    "meta-llama-3-8b": "llama-3-8b", "meta-llama-3-8b-instruct": "llama-3-8b", "llama-3-8b-instruct": "llama-3-8b",
    "meta-llama-3.1-8b": "llama-3.1-8b", "llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistral-7b-v0.1": "mistral-7b", "mistral-7b-instruct-v0.1": "mistral-7b",
    "smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m",
}


def _key(name: str) -> str:
    k = name.strip().lower().replace("_", "-")
    # hub ids: "org/name" or the dashed file-system form "org-name" used in ../shared/data
    k = k.split("/")[-1]
    k = re.sub(r"^(meta-llama|mistralai|huggingfacetb)-", "", k)
    return k


def resolve_model(name: str) -> ModelSpec:
    """Find a model by short name, hub id ('meta-llama/Llama-2-7b-hf') or dashed id ('meta-llama-Llama-2-7b-hf')."""
    k = _key(name)
    k = _ALIASES.get(k, k)
    if k in MODELS:
        return MODELS[k]
    for spec in MODELS.values():
        if _key(spec.hub_id) == k:
            return spec
    raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)} (or their hub ids)")
