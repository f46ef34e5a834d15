"""Any model a user names by its Hugging Face `config.json` (a path, or the fields inline).

Covers Llama-like dense decoders (LLaMA, Qwen2/3, Mistral with its sliding window, CodeLlama,
InternLM, Phi) and mixture-of-experts decoders in Mixtral's form (`num_local_experts` experts per
layer, `num_experts_per_tok` routed per token; Qwen-MoE's `num_experts` / `moe_intermediate_size`
spellings too). Field names are the ones transformers' configuration classes use; a missing
required field is a one-line error naming it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from rkvsim.models.architectures import ModelSpec, registered_model

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1}
# Architectures whose MLP is a plain up -> activation -> down (no gate).
# Model types whose blocks normalise with LayerNorm (the rest: RMSNorm, as Llama).
_LAYERNORM = {"phi", "gpt2", "gpt_neox", "gptj", "opt", "falcon", "starcoder2", "gpt_bigcode", "bloom", "stablelm",
              "cohere", "mpt", "olmo"}
_UNGATED = {"phi", "gpt2", "gpt_neox", "gptj", "opt", "falcon", "starcoder2", "gpt_bigcode"}


class ConfigError(KeyError):
    pass


def _first(cfg: dict, *names, default=None, required: str | None = None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    if required:
        raise ConfigError(f"model config: {required} is missing (one of {', '.join(names)}); "
                          "add it or give a registered model name")
    return default


def spec_from_hf_config(cfg: dict, name: str | None = None) -> ModelSpec:
    """ModelSpec from a transformers config dict (text config of multimodal wrappers included)."""
    if not isinstance(cfg, dict):
        raise ConfigError("model: a config must be a mapping of Hugging Face config.json fields")
    cfg = dict(cfg.get("text_config") or {}, **{k: v for k, v in cfg.items() if k != "text_config"})
    hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model", required="hidden_size"))
    layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers", required="num_hidden_layers"))
    heads = int(_first(cfg, "num_attention_heads", "n_head", required="num_attention_heads"))
    kv_heads = int(_first(cfg, "num_key_value_heads", "multi_query_group_num", default=heads))
    head_dim = int(_first(cfg, "head_dim", default=hidden // heads))
    n_experts = int(_first(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    top_k = int(_first(cfg, "num_experts_per_tok", "moe_top_k", default=0) or 0)
    inter = _first(cfg, "moe_intermediate_size", "intermediate_size", "n_inner", "ffn_hidden_size") if n_experts \
        else _first(cfg, "intermediate_size", "n_inner", "ffn_hidden_size")
    if inter is None:
        inter = 4 * hidden
    vocab = int(_first(cfg, "vocab_size", "padded_vocab_size", required="vocab_size"))
    max_pos = int(_first(cfg, "max_position_embeddings", "n_positions", "seq_length", default=4096))
    model_type = str(cfg.get("model_type", "")).lower()
    gated = model_type not in _UNGATED and str(cfg.get("hidden_act", "silu")).lower() not in ("gelu_new", "gelu_fast")
    # Parallel attention + MLP: Phi and GPT-J always; Falcon and GPT-NeoX when their config says so.
    parallel = model_type in ("phi", "gptj") or bool(cfg.get("parallel_attn") or cfg.get("use_parallel_residual"))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    dtype = str(_first(cfg, "torch_dtype", "dtype", default="bfloat16")).replace("torch.", "")
    if n_experts and not top_k:
        raise ConfigError("model config: num_experts_per_tok is missing for a mixture-of-experts model; add it")
    if heads % kv_heads:
        raise ConfigError(f"model config: num_attention_heads ({heads}) is not a multiple of "
                          f"num_key_value_heads ({kv_heads}); fix the config")
    label = name or cfg.get("name") or cfg.get("_name_or_path") or \
        f"{model_type or 'custom'}-{layers}l-{hidden}h" + (f"-{n_experts}x{top_k}e" if n_experts else "")
    label = re.sub(r"[^a-z0-9.]+", "-", str(label).split("/")[-1].lower()).strip("-")
    return ModelSpec(
        name=label, hub_id=str(cfg.get("_name_or_path") or label), num_layers=layers, hidden_size=hidden,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=int(inter),
        vocab_size=vocab, max_position=max_pos, tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        gated_mlp=gated, parallel_block=parallel, layer_norm=model_type in _LAYERNORM, weight_dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
        sliding_window=int(window) if window else None, num_experts=n_experts, experts_per_token=top_k)


def is_config_path(v: str) -> bool:
    return v.endswith(".json") or Path(v).is_dir() and (Path(v) / "config.json").is_file()


def spec_from_config_path(path: str | Path) -> ModelSpec:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"model: {path} is not a file; give a Hugging Face config.json or a registered name")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model: {p} is not valid JSON ({e}); fix it or give a registered name") from None
    return spec_from_hf_config(cfg, name=cfg.get("_name_or_path") or p.parent.name or None)


def resolve_model(name) -> ModelSpec:
    """A model by registered name or hub id (architectures.registered_model), or built from a Hugging
    Face config: a path to config.json (or its folder), or its fields as a mapping."""
    if isinstance(name, ModelSpec):
        return name
    if isinstance(name, dict):
        return spec_from_hf_config(name)
    if is_config_path(str(name)):
        return spec_from_config_path(name)
    return registered_model(name)
