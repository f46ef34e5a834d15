"""Model architectures, hardware specs, compression methods (one spec per kind) and KV-cache
bytes; the product's file I/O. No torch."""
from rkvsim.models.architectures import MODELS, ModelSpec, registered_model
from rkvsim.models.hf_config import ConfigError, resolve_model, spec_from_hf_config
from rkvsim.models.hardware import HARDWARE, HardwareSpec, hardware_for_device, resolve_hardware
from rkvsim.models.kv_bytes import (kv_bytes, kv_bytes_per_head, kv_bytes_per_token, kv_fixed_overhead,
                                    quantized_tokens)
from rkvsim.models.methods import (BASELINE, ENGINE_KV, EVICTING, FAMILIES, PROMPT_COMPRESSING, QUANTIZING, Method,
                                   MethodSpec, cached_tokens_of, cached_tokens_vec, default_method, holds_whole_context, kinds, method_from_engine_name,
                                   method_from_entry, parse_method, spec_of, specs)

__all__ = [
    "MODELS", "ModelSpec", "resolve_model", "registered_model", "ConfigError", "spec_from_hf_config", "HARDWARE", "HardwareSpec", "hardware_for_device",
    "resolve_hardware", "kv_bytes", "kv_bytes_per_head", "kv_bytes_per_token", "kv_fixed_overhead",
    "quantized_tokens", "Method", "MethodSpec", "cached_tokens_of", "cached_tokens_vec", "default_method", "holds_whole_context", "parse_method",
    "method_from_entry", "method_from_engine_name", "spec_of", "specs", "kinds",
    "BASELINE", "QUANTIZING", "EVICTING", "PROMPT_COMPRESSING", "ENGINE_KV", "FAMILIES",
]
