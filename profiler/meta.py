"""meta.json: what a profile was measured on and how, and whether a folder may be resumed."""
from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata

from rkvsim.profiler.schema import SCHEMA_VERSION

# Fields that must agree for a new run to append to an existing profile: rows measured on
# another device, model, grid or thread count would silently mix into one table.
IDENTITY_FIELDS = ("source", "schema_version", "model", "hardware", "device_name", "device_kind",
                   "dtype", "grid", "torch_threads", "attention_heads_profiled")


def project_version() -> str:
    try:
        return metadata.version("rkvsim")
    except metadata.PackageNotFoundError:
        return "unknown"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict:
    out = {"python": platform.python_version(), "rkvsim": project_version()}
    for name in ("torch", "numpy", "pandas"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch
        out["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def identity(meta: dict) -> dict:
    return {k: meta.get(k) for k in IDENTITY_FIELDS}


def mismatch(existing: dict, new: dict) -> str | None:
    """One line naming the first identity field that differs, or None when resumable."""
    old_id, new_id = identity(existing), identity(new)
    for k in IDENTITY_FIELDS:
        if old_id[k] != new_id[k]:
            show = lambda v: v.get("name", v) if isinstance(v, dict) else v  # noqa: E731
            return (f"{k} differs (folder: {show(old_id[k])!r}, this run: {show(new_id[k])!r}); "
                    "use another --out")
    return None


def collected_meta(*, model, methods: list, hardware: str, device, grid, dtype: str, heads,
                   kernel_source: str) -> dict:
    """meta.json of a collection (before counts and timings are filled in)."""
    m = model
    reductions = []
    if heads.reduced:
        reductions.append({
            "what": "attention_heads",
            "profiled": {"num_q_heads": heads.num_q_heads, "num_kv_heads": heads.num_kv_heads},
            "model": {"num_q_heads": m.num_heads, "num_kv_heads": m.num_kv_heads},
            "note": ("attention and compression rows time fewer heads than the model has (head_dim "
                     "and grouped-query ratio kept); every row states the heads it timed. Per-layer cost "
                     "of the full model needs scaling by heads, which the caller must do explicitly."),
        })
    return {
        "schema_version": SCHEMA_VERSION,
        "source": "rkvprof-collect",
        "model": m.name,
        "model_hub_id": m.hub_id,
        "model_shapes": {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
                         "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                         "intermediate_size": m.intermediate_size, "vocab_size": m.vocab_size},
        "rows_are": "one layer's worth per row (embedding, lm_head, sample: once per model step)",
        "methods": [mt.label for mt in methods],
        "method_settings": {mt.label: _method_dict(mt) for mt in methods},
        "hardware": hardware,
        "device_kind": device.kind,
        "device_name": device.device_name,
        "device": device.details,
        "torch_threads": device.details.get("torch_threads"),
        "dtype": dtype,
        "grid": grid.as_dict(),
        "timing": ("CUDA events around each call, device synchronised" if device.kind == "cuda" else
                   "time.perf_counter around each call; warm-up calls untimed; median and p10/p90 over repeats"),
        "attention_heads_profiled": {"num_q_heads": heads.num_q_heads, "num_kv_heads": heads.num_kv_heads},
        "reductions": reductions,
        "notes": [
            "prefill rows: kv_len=0 is a whole-prompt prefill; kv_len>0 times the chunk of new_tokens that "
            "ends a prompt whose first kv_len tokens are already cached (kernels extend, last=True): it "
            "includes H2O/SnapKV's prompt-end selection, which a middle chunk does not do (compression "
            "evict/select at kv_len+new_tokens)",
            "decode rows time a step without a quantization event; add compression quantize_on_append "
            "divided by group_size for KIVI/GEAR's amortised cost",
        ],
        "kernels": kernel_source,
        "versions": library_versions(),
        "platform": platform.platform(),
    }


def _method_dict(m) -> dict:
    return m.to_dict()
