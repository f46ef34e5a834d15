"""`rkvprof import-vidur SRC --gpu a100`: Vidur's own repository layout -> one rkvprof profile per GPU.

Layout (microsoft/vidur's `data/profiling`, as in ../shared/data/vidur-profiles):
  compute/<gpu>/<org>/<model>/mlp.csv   dense operators of one model at TP 1-8 (every model of a GPU
                                        goes into one operators table: the shape columns tell the
                                        models apart, and `meta.json` lists them with their shapes)
  older-a100/attention.csv              FlashAttention prefill/decode on A100 at LLaMA-2-70B's TP-2
                                        shape, imported as fp16 attention when --gpu is an A100
Network tables and CPU overheads are fitted apart (calibration/steps/comm.py, cpu_overheads.py).
Rows are converted by profiler/vidur_import.py's converters (ms -> s, duplicates merged).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from rkvsim.models import resolve_hardware, resolve_model
from rkvsim.models.files import atomic_path, sha256_file, write_json
from rkvsim.profiler.device import ProfilerError
from rkvsim.profiler.meta import library_versions, now_utc
from rkvsim.profiler.schema import ATTENTION, META_FILE, OPERATORS, SCHEMA_VERSION
from rkvsim.profiler.vidur_import import (SHARED_METHOD, VIDUR_DTYPE, Folder, ImportResult, convert_attention,
                                          convert_mlp, merge_duplicates)

REPOSITORY = "microsoft/vidur"
LICENCE = "MIT"
# Vidur's GPU folder for each of our hardware names (its A100 runs are the 80 GB SXM DGX parts).
GPU_DIRS = {"a100-80g": "a100", "a100-40g": "a100", "h100-sxm": "h100", "a40": "a40"}
ATTENTION_TABLE = ("older-a100", "attention.csv", "a100", "llama-2-70b")
MULTI = "multi-model"


def is_repo_layout(src: Path) -> bool:
    return (Path(src) / "compute").is_dir()


def model_shape(m) -> dict:
    return {"hidden": m.hidden_size, "intermediate": m.intermediate_size, "num_q_heads": m.num_heads,
            "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim, "gated_mlp": m.gated_mlp,
            "parallel_block": m.parallel_block,
            "layers": m.num_layers, "hub_id": m.hub_id}


def import_vidur_repo(src: Path, gpu: str, out: Path, models: list[str] | None = None,
                      commit: str | None = None) -> ImportResult:
    src = Path(src).resolve()
    try:
        hardware = resolve_hardware(gpu).name
    except KeyError as e:
        raise ProfilerError(str(e.args[0])) from None
    gdir = GPU_DIRS.get(hardware)
    if gdir is None or not (src / "compute" / gdir).is_dir():
        have = sorted(p.name for p in (src / "compute").iterdir() if p.is_dir())
        raise ProfilerError(f"--gpu {gpu}: {src}/compute has no measurements for it (it has {', '.join(have)}); "
                            f"use one of {', '.join(k for k, v in GPU_DIRS.items() if v in have)}")
    want = {resolve_model(m).name for m in models} if models else None
    operators, files, shapes, ignored = [], {}, {}, []
    for path in sorted((src / "compute" / gdir).glob("*/*/mlp.csv")):
        org, name = path.parent.parent.name, path.parent.name
        try:
            model = resolve_model(f"{org}/{name}")
        except KeyError:
            ignored.append(f"{org}/{name} (not a registered model)")
            continue
        if want is not None and model.name not in want:
            continue
        rel = str(path.relative_to(src))
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "model": model.name}
        df = pd.read_csv(path)
        operators.append(convert_mlp(df, Folder(path.parent, name, "hf", SHARED_METHOD, SHARED_METHOD), model,
                                     f"vidur:{rel}", gated=model.gated_mlp))
        shapes[model.name] = model_shape(model)
    if not operators:
        raise ProfilerError(f"no mlp.csv of a registered model under {src}/compute/{gdir}"
                            + (f" (ignored: {', '.join(ignored)})" if ignored else ""))
    tables = {}
    ops, n_merged = merge_duplicates(pd.concat(operators, ignore_index=True), OPERATORS)
    tables[OPERATORS.name] = ops
    merged = {OPERATORS.name: n_merged}
    folder, fname, att_gpu, att_model = ATTENTION_TABLE
    att_path = src / folder / fname
    attention_from = None
    if gdir == att_gpu and att_path.exists():
        model = resolve_model(att_model)
        rel = str(att_path.relative_to(src))
        files[rel] = {"sha256": sha256_file(att_path), "bytes": att_path.stat().st_size, "model": model.name}
        att = convert_attention(pd.read_csv(att_path), Folder(att_path.parent, att_model, "fp16", "fp16", "fp16"),
                                model, f"vidur:{rel}")
        att, merged[ATTENTION.name] = merge_duplicates(att, ATTENTION)
        tables[ATTENTION.name] = att
        attention_from = f"{model.name} at tp {sorted(att['tp'].unique().tolist())}"

    out.mkdir(parents=True, exist_ok=True)
    for schema in (OPERATORS, ATTENTION):
        if schema.name in tables:
            # gzip: a GPU's dense table is ~100k rows; compressed it ships with the package.
            atomic_path(out / f"{schema.filename}.gz",
                        lambda tmp, df=tables[schema.name]: df.to_csv(tmp, index=False, compression="gzip"))
    meta = {
        "schema_version": SCHEMA_VERSION,
        "source": "vidur-import",
        "provenance": {"repository": REPOSITORY, "licence": LICENCE, "commit": commit,
                       "path": "data/profiling (compute/, and an older commit's attention.csv)"},
        "source_path": str(src),
        "files": files,
        "ignored_folders": ignored,
        "model": MULTI,
        "models": shapes,
        "hardware": hardware,
        "device_kind": "cuda",
        "device_name": None,
        "dtype": VIDUR_DTYPE,
        "methods": ["fp16"] if attention_from else [],
        "attention": attention_from or "none measured: attention is transferred (see rkvsim's cost_parts)",
        "attention_models": [resolve_model(att_model).name] if attention_from else [],
        "units": "Vidur ms converted to seconds",
        "duplicates_merged": merged,
        "rows": {k: len(v) for k, v in tables.items()},
        "imported": now_utc(),
        "versions": library_versions(),
    }
    write_json(out / META_FILE, meta, sort_keys=True, default=str)
    return ImportResult(out, meta["rows"], meta)
