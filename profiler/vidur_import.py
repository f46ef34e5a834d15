"""`rkvprof import-vidur`: Vidur-format profile CSVs -> rkvprof's tables (read in place).

Layout: SRC/<model>-<suffix>/{attention,mlp}.csv, the suffix naming the method the
profile was measured with: fp16, kivi, gear, h2o, stream (the paper's default settings,
so kivi-4, gear-4, h2o-512, streamingllm-512), and hf: the dense operators every method
shares (mlp.csv only, possibly several tensor-parallel degrees). Vidur times are in ms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rkvsim.models import ModelSpec, default_method, resolve_hardware, resolve_model, specs

from rkvsim.profiler.device import ProfilerError
from rkvsim.profiler.meta import library_versions, now_utc
from rkvsim.profiler.schema import ATTENTION, META_FILE, OPERATORS, SCHEMA_VERSION, TableSchema
from rkvsim.models.files import atomic_path, read_json_if_exists, sha256_file, write_json

SHARED_SUFFIX = "hf"
SHARED_METHOD = "all"
MLP_OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
           "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
ATTN_OVERHEAD = ("attn_input_reshape", "attn_output_reshape", "attn_kv_cache_save")
STATS = ("median", "mean", "std", "min", "max")
VIDUR_DTYPE = "float16"  # the paper's engines run LLaMA-2 in fp16


@dataclass
class Folder:
    path: Path
    model_part: str
    suffix: str
    method: str      # method label, or SHARED_METHOD for the hf folder
    kind: str


@dataclass
class ImportResult:
    out: Path
    rows: dict
    meta: dict = field(default_factory=dict)


def discover(src: Path) -> tuple[list[Folder], list[str]]:
    folders, ignored = [], []
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        model_part, _, suffix = d.name.rpartition("-")
        suffix = suffix.lower()
        if suffix == SHARED_SUFFIX:
            folders.append(Folder(d, model_part, suffix, SHARED_METHOD, SHARED_METHOD))
        elif model_part and (m := _method_of_suffix(suffix)) is not None:
            folders.append(Folder(d, model_part, suffix, m.label, m.kind))
        else:
            ignored.append(d.name)
    return folders, ignored


def _method_of_suffix(suffix: str):
    """The paper's folders are named <model>-<method> with a kind's name or alias ('stream')."""
    try:
        m = default_method(suffix)
    except ValueError:
        return None
    return m if m.spec.kernel is not None else None


def _check_model(folder: Folder, model: ModelSpec) -> None:
    try:
        found = resolve_model(folder.model_part)
    except KeyError:
        found = None
    if found is not None and found.name != model.name:
        raise ProfilerError(f"{folder.path.name} is a {found.name} profile, not {model.name}")


def _check_shapes(df: pd.DataFrame, model: ModelSpec, where: str, cols: dict) -> None:
    for col, want in cols.items():
        got = set(df[col].unique())
        if got != {want}:
            raise ProfilerError(f"{where}: {col} is {sorted(got)}, but {model.name} has {want}")


def _stats(df: pd.DataFrame, op: str) -> dict:
    """Vidur's ms statistics of one op -> our seconds columns (no percentiles in Vidur)."""
    col = lambda s: df[f"time_stats.{op}.{s}"].to_numpy(dtype=float) / 1e3  # noqa: E731
    return {"time_s_median": col("median"), "time_s_p10": np.nan, "time_s_p90": np.nan,
            "time_s_mean": col("mean"), "time_s_std": col("std"), "time_s_min": col("min"),
            "time_s_max": col("max"), "repeats": pd.NA}


def convert_attention(df: pd.DataFrame, folder: Folder, model: ModelSpec, source: str) -> pd.DataFrame:
    _check_shapes(df, model, source, {"n_embd": model.hidden_size, "n_q_head": model.num_heads,
                                      "n_kv_head": model.num_kv_heads})
    parts = []
    for stage, rows in (("prefill", df[df["is_prefill"].astype(bool)]), ("decode", df[~df["is_prefill"].astype(bool)])):
        if rows.empty:
            continue
        tp = rows["num_tensor_parallel_workers"].astype(int)
        overhead = sum(rows[f"time_stats.{o}.median"].fillna(0.0).to_numpy(dtype=float)
                       for o in ATTN_OVERHEAD if f"time_stats.{o}.median" in rows) / 1e3
        parts.append(pd.DataFrame({
            "schema_version": SCHEMA_VERSION, "method": folder.method, "kind": folder.kind, "stage": stage,
            "batch_size": rows["batch_size"].astype(int).to_numpy(),
            "kv_len": rows["kv_cache_size"].astype(int).to_numpy(),
            "new_tokens": (rows["prefill_chunk_size"].astype(int) if stage == "prefill" else 1),
            "tp": tp.to_numpy(),
            # Heads one tensor-parallel worker computes.
            "num_q_heads": (rows["n_q_head"] // tp).to_numpy(), "num_kv_heads": (rows["n_kv_head"] // tp).to_numpy(),
            "head_dim": (rows["n_embd"] // rows["n_q_head"]).to_numpy(), "dtype": VIDUR_DTYPE,
            **_stats(rows, f"attn_{stage}"),
            "overhead_s_median": overhead, "cache_tokens": pd.NA, "cache_nbytes": pd.NA, "source": source,
        }))
    return pd.concat(parts, ignore_index=True)[list(ATTENTION.columns)]


def convert_mlp(df: pd.DataFrame, folder: Folder, model: ModelSpec, source: str,
                gated: bool | None = None) -> pd.DataFrame:
    cols = {"n_embd": model.hidden_size, "n_head": model.num_heads, "n_kv_head": model.num_kv_heads,
            "n_expanded_embd": model.intermediate_size}
    if gated is not None and "use_gated_mlp" in df:
        cols["use_gated_mlp"] = gated
    _check_shapes(df, model, source, cols)
    parts = []
    for op in MLP_OPS:
        if f"time_stats.{op}.median" not in df:
            continue
        rows = df[df[f"time_stats.{op}.median"].notna()]
        parts.append(pd.DataFrame({
            "schema_version": SCHEMA_VERSION, "method": folder.method, "op": op,
            "num_tokens": rows["num_tokens"].astype(int).to_numpy(),
            "tp": rows["num_tensor_parallel_workers"].astype(int).to_numpy(),
            "hidden": rows["n_embd"].to_numpy(), "intermediate": rows["n_expanded_embd"].to_numpy(),
            "num_q_heads": rows["n_head"].to_numpy(), "num_kv_heads": rows["n_kv_head"].to_numpy(),
            "head_dim": (rows["n_embd"] // rows["n_head"]).to_numpy(),
            # Vidur pads the vocabulary (32768 for LLaMA-2's 32000); kept as profiled.
            "vocab": rows["vocab_size"].to_numpy(), "dtype": VIDUR_DTYPE,
            **_stats(rows, op), "source": source,
        }))
    return pd.concat(parts, ignore_index=True)[list(OPERATORS.columns)]


def merge_duplicates(df: pd.DataFrame, schema: TableSchema) -> tuple[pd.DataFrame, int]:
    """Vidur profiles repeat some configurations (measured twice); one row per key: mean of
    the medians/means/stds, min of the minima, max of the maxima."""
    key = list(schema.key)
    dup = df.duplicated(key, keep=False)
    if not dup.any():
        return df, 0
    agg = {c: "first" for c in df.columns if c not in key}
    agg.update({c: "mean" for c in ("time_s_median", "time_s_mean", "time_s_std", "overhead_s_median") if c in df})
    agg.update(time_s_min="min", time_s_max="max")
    merged = df[dup].groupby(key, sort=False, as_index=False).agg(agg)
    out = pd.concat([df[~dup], merged], ignore_index=True)[list(schema.columns)]
    return out, int(dup.sum() - len(merged))


def _write_table(df: pd.DataFrame, path: Path) -> None:
    atomic_path(path, lambda tmp: df.to_csv(tmp, index=False))


def import_vidur(src: Path, gpu: str, model_name: str, out: Path) -> ImportResult:
    src = Path(src).resolve()
    if not src.is_dir():
        raise ProfilerError(f"{src} is not a folder")
    try:
        hardware = resolve_hardware(gpu).name
        model = resolve_model(model_name)
    except KeyError as e:
        raise ProfilerError(str(e.args[0])) from None
    folders, ignored = discover(src)
    if not folders:
        names = [k for k, sp in specs().items() if sp.kernel] + ["stream", SHARED_SUFFIX]
        raise ProfilerError(f"no <model>-{{{','.join(names)}}} folders under {src}")

    out.mkdir(parents=True, exist_ok=True)
    existing = read_json_if_exists(out / META_FILE)
    if existing is not None:
        for k, want in (("source", "vidur-import"), ("model", model.name), ("hardware", hardware)):
            if existing.get(k) != want:
                raise ProfilerError(f"{out} holds a profile with {k}={existing.get(k)!r}, not {want!r}; "
                                    "use another --out")

    attention, operators, files, merged = [], [], {}, {}
    for folder in folders:
        _check_model(folder, model)
        for name in ("attention.csv", "mlp.csv"):
            path = folder.path / name
            if not path.exists():
                continue
            rel = f"{folder.path.name}/{name}"
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "method": folder.method}
            df = pd.read_csv(path)
            source = f"vidur:{rel}"
            if name == "attention.csv":
                attention.append(convert_attention(df, folder, model, source))
            else:
                operators.append(convert_mlp(df, folder, model, source))

    tables = {}
    for schema, parts in ((ATTENTION, attention), (OPERATORS, operators)):
        if not parts:
            continue
        df, n = merge_duplicates(pd.concat(parts, ignore_index=True), schema)
        merged[schema.name] = n
        tables[schema.name] = df
        _write_table(df, out / schema.filename)

    methods = sorted({f.method for f in folders if f.method != SHARED_METHOD})
    meta = {
        "schema_version": SCHEMA_VERSION,
        "source": "vidur-import",
        "source_path": str(src),
        "files": files,
        "ignored_folders": ignored,
        "model": model.name,
        "model_hub_id": model.hub_id,
        "hardware": hardware,
        "device_kind": "cuda",
        "device_name": None,  # Vidur CSVs do not record it; `hardware` is the importer's claim
        "dtype": VIDUR_DTYPE,
        "methods": methods,
        "method_map": {f.suffix: f.method for f in folders},
        "units": "Vidur ms converted to seconds",
        "duplicates_merged": merged,
        "not_imported": {"attention.csv": "attn_* min/max/mean/std of the reshape and kv_cache_save steps "
                                          "(their medians are summed into overhead_s_median)",
                         "mlp.csv": "nothing"},
        "rows": {k: len(v) for k, v in tables.items()},
        "imported": now_utc(),
        "versions": library_versions(),
    }
    write_json(out / META_FILE, meta, sort_keys=True, default=str)
    return ImportResult(out, meta["rows"], meta)
