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
    # Attention and MLP read the same normed input and both join the residual in one sum (Phi, GPT-J,
    # Falcon, GPT-NeoX's parallel residual): one norm per layer, and the residual sum is two adds.
    parallel_block: bool = False
    # LayerNorm (mean and variance, GPT-2/NeoX/Phi/Falcon) rather than RMSNorm: another norm kernel, so
    # a profile of RMSNorm models says little about its time (calibration: kernel families)
    layer_norm: bool = False
    weight_dtype_bytes: int = 2
    sliding_window: int | None = None    # attention (and the KV kept) spans the last N tokens
    # Mixture of experts (Mixtral's form): each layer's MLP is num_experts experts of
    # intermediate_size, experts_per_token of them run per token (0: dense).
    num_experts: int = 0
    experts_per_token: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def experts_touched(self, tokens):
        """Experts whose weights a step of `tokens` tokens reads, per layer: E * (1 - (1 - k/E)^T),
        the expectation under uniform, independent routing (a stated prior: real routers are skewed,
        which touches fewer). Dense models: 1. Works on floats and numpy arrays."""
        if not self.num_experts:
            return 1.0 + 0 * tokens
        e, k = self.num_experts, self.experts_per_token
        return e * (1.0 - (1.0 - k / e) ** tokens)

    @property
    def kernel_kinds(self) -> dict[str, str]:
        """The kernel each element-wise operator family runs, where models differ: a shape-transfer
        fit only knows the kernels its profiled models ran."""
        return {"norm": "layernorm" if self.layer_norm else "rmsnorm",
                "mlp activation": "silu-and-mul (gated)" if self.gated_mlp else "gelu (plain)"}

    @property
    def mlp_params_per_expert(self) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size

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
        mlp = self.mlp_params_per_expert * max(1, self.num_experts)
        router = h * self.num_experts
        return attn + mlp + router + 2 * h  # two RMSNorm weight vectors

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
        ModelSpec("llama-3-70b", "meta-llama/Meta-Llama-3-70B", 80, 8192, 64, 8, 128, 28672, 128256, 8192),
        ModelSpec("codellama-34b", "codellama/CodeLlama-34b-Instruct-hf", 48, 8192, 64, 8, 128, 22016, 32000, 16384),
        ModelSpec("internlm-20b", "internlm/internlm-20b", 60, 5120, 40, 40, 128, 13824, 103168, 4096),
        ModelSpec("qwen-72b", "Qwen/Qwen-72B", 80, 8192, 64, 64, 128, 24576, 152064, 32768),
        # Phi-2: GELU MLP without a gate (fc1 -> gelu -> fc2), untied LM head.
        ModelSpec("phi-2", "microsoft/phi-2", 32, 2560, 32, 32, 80, 10240, 51200, 2048, gated_mlp=False,
                  parallel_block=True, layer_norm=True),
        ModelSpec("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 32, 4096, 32, 8, 128, 14336, 32000, 32768,
                  num_experts=8, experts_per_token=2),
        ModelSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, 9, 3, 64, 1536, 49152, 8192,
                  tied_embeddings=True),
        # Gemma 3 270M (its GGUF's header): 4 query heads of 256 over one KV head, GeGLU MLP, a
        # 262k vocabulary. Five of every six layers attend a 512-token window; the spec keeps
        # every layer's whole KV (sliding_window applies to all layers here), the upper bound.
        ModelSpec("gemma3-270m", "google/gemma-3-270m", 18, 640, 4, 1, 256, 2048, 262144, 32768,
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
    "gemma-3-270m": "gemma3-270m", "gemma-3-270m-it": "gemma3-270m", "google-gemma-3-270m": "gemma3-270m",
    "meta-llama-3-70b": "llama-3-70b", "llama-3-70b-instruct": "llama-3-70b",
    "codellama-34b-instruct-hf": "codellama-34b", "codellama-34b-hf": "codellama-34b",
    "codellama-codellama-34b-instruct-hf": "codellama-34b", "internlm-internlm-20b": "internlm-20b",
    "qwen-qwen-72b": "qwen-72b", "microsoft-phi-2": "phi-2",
    "mixtral-8x7b-v0.1": "mixtral-8x7b", "mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
}


def _key(name: str) -> str:
    k = name.strip().lower().replace("_", "-")
    # hub ids: "org/name" or the dashed file-system form "org-name" used in ../shared/data
    k = k.split("/")[-1]
    k = re.sub(r"^(meta-llama|mistralai|huggingfacetb|microsoft|internlm|codellama)-", "", k)
    return k


def registered_model(name: str) -> ModelSpec:
    """Find a registered model by short name, hub id ('meta-llama/Llama-2-7b-hf') or dashed id
    ('meta-llama-Llama-2-7b-hf'). models.hf_config.resolve_model also takes configs."""
    k = _key(name)
    k = _ALIASES.get(k, k)
    if k in MODELS:
        return MODELS[k]
    for spec in MODELS.values():
        if _key(spec.hub_id) == k:
            return spec
    raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)} (or their hub ids), "
                   "or a Hugging Face config.json path / inline config fields")
