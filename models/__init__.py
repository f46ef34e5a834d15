"""Model architectures, hardware specs, compression methods and KV-cache bytes. No torch."""
from rkvsim.models.architectures import MODELS, ModelSpec, resolve_model
from rkvsim.models.hardware import HARDWARE, HardwareSpec, hardware_for_device, resolve_hardware
from rkvsim.models.kv_bytes import (kv_bytes, kv_bytes_per_head, kv_bytes_per_token, kv_fixed_overhead,
                       quantized_tokens)
from rkvsim.models.methods import EVICTING, KINDS, QUANTIZED, Method, cached_tokens_vec, default_method, parse_method

__all__ = [
    "MODELS", "ModelSpec", "resolve_model", "HARDWARE", "HardwareSpec", "hardware_for_device",
    "resolve_hardware", "kv_bytes", "kv_bytes_per_head", "kv_bytes_per_token", "kv_fixed_overhead",
    "quantized_tokens", "Method", "cached_tokens_vec", "default_method", "parse_method", "KINDS", "QUANTIZED", "EVICTING",
]
