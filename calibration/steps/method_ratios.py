"""Compressed attention relative to FP16, measured on the A6000 (the paper's LMDeploy profiles),
as the ratio a GPU without its own compression tables carries over.

For every method the paper profiled on the same grid as FP16 (batch x KV length for decode,
prefill chunk x cached past for prefill), ratio = method time / FP16 time at the same row (kernel
plus the reshape and cache-save work Vidur times apart). The ratio is stored as medians on that
grid, keyed by batch x KV heads (the A6000 rows are LLaMA-2-7B's 32 KV heads at TP 1: a model with
H KV heads per rank at batch b does the per-head work of batch b * H / 32 there) and by context.
On another GPU, the method's attention = that GPU's FP16 attention x this ratio, labelled
`transfer(a6000 ratio)`: the ratio assumes the method's kernels relate to FP16's there as they did
on the A6000 (the reference kernels are the same code), which the datasheet cannot check.

    python -m rkvsim.calibration.steps.method_ratios ../shared/data/rethink-kv/profiles/a6000 \
        --out calibration/data/method_ratios/a6000.json

The product reads only the JSON (never ../shared).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rkvsim.calibration.steps import data_files
from rkvsim.models.files import sha256_file, write_json

REF_KV_HEADS = 32            # LLaMA-2-7B at TP 1, the A6000 profiles' shape
BINS_PER_OCTAVE = 3
SUFFIXES = ("kivi", "gear", "h2o", "stream")
OVERHEAD = ("attn_input_reshape", "attn_output_reshape", "attn_kv_cache_save")


def _times(d, stage: str):
    import pandas as pd

    rows = d[d["is_prefill"].astype(bool) == (stage == "prefill")]
    t = rows[f"time_stats.attn_{stage}.median"].to_numpy(float)
    for o in OVERHEAD:
        c = f"time_stats.{o}.median"
        if c in rows:
            t = t + rows[c].fillna(0.0).to_numpy(float)
    x = rows["batch_size"] if stage == "decode" else rows["prefill_chunk_size"]
    return pd.DataFrame({"x": x.to_numpy(int), "y": rows["kv_cache_size"].to_numpy(int), "t": t}) \
        .groupby(["x", "y"])["t"].median()


def fit_ratios(src: Path) -> dict:
    import pandas as pd

    from rkvsim.models import default_method
    src = Path(src)
    base = next(p for p in src.iterdir() if p.name.lower().endswith("-fp16"))
    fp16 = pd.read_csv(base / "attention.csv")
    out, files = {}, {f"{base.name}/attention.csv": sha256_file(base / "attention.csv")}
    for d in sorted(src.iterdir()):
        suffix = d.name.rpartition("-")[2].lower()
        if suffix not in SUFFIXES or not (d / "attention.csv").exists():
            continue
        label = default_method(suffix).label
        files[f"{d.name}/attention.csv"] = sha256_file(d / "attention.csv")
        meth = pd.read_csv(d / "attention.csv")
        stages = {}
        for stage in ("decode", "prefill"):
            r = (_times(meth, stage) / _times(fp16, stage)).dropna()
            r = r[np.isfinite(r) & (r > 0)]
            # Binned at BINS_PER_OCTAVE along both axes (median log ratio, median coordinates): the
            # tables hold ~10k rows, each timed once, and neighbours differ by their noise.
            f = r.reset_index(name="r")
            f["bx"] = np.floor(np.log2(f["x"]) * BINS_PER_OCTAVE)
            f["by"] = np.floor(np.log2(1 + f["y"]) * BINS_PER_OCTAVE)
            bx = f.groupby("bx")["x"].median()
            by = f.groupby("by")["y"].median()
            f["lr"] = np.log(f["r"])
            grid = np.exp(f.groupby(["bx", "by"])["lr"].median().unstack("by"))
            grid.index, grid.columns = bx.loc[grid.index].to_numpy(), by.loc[grid.columns].to_numpy()
            stages[stage] = {"x": [float(v) for v in grid.index], "y": [float(v) for v in grid.columns],
                             # gaps (a row measured for one side only) filled along the context axis
                             "log_ratio": np.log(grid.ffill(axis=1).bfill(axis=1).to_numpy(float)).round(5).tolist(),
                             "median_ratio": float(np.median(r.to_numpy())), "rows": int(len(r))}
        out[label] = stages
    return {"source": {"what": "the paper's A6000 LMDeploy attention profiles (LLaMA-2-7B, TP 1)", "files": files},
            "x": {"decode": "batch x KV heads per rank / 32", "prefill": "prefill chunk tokens"},
            "y": "KV length (decode) / cached past (prefill)", "methods": out}


def packaged() -> Path:
    return data_files.packaged("method_ratios", "a6000.json")


def _load(path: str) -> dict:
    return data_files.load(path, "method ratio tables (calibration/data/method_ratios)")


def ratio_table(method_label: str, kind: str) -> tuple[str, dict] | None:
    """(label measured, its stages) for a method: the same label, else the same kind at its default
    setting, else None."""
    from rkvsim.models import default_method
    methods = _load(str(packaged()))["methods"]
    if method_label in methods:
        return method_label, methods[method_label]
    try:
        d = default_method(kind).label
    except ValueError:
        return None
    return (d, methods[d]) if d in methods else None


def ratio_at(stage_table: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of the log ratio over log x and log(1 + y), clamped to the grid."""
    xs, ys = np.log(np.asarray(stage_table["x"])), np.log1p(np.asarray(stage_table["y"]))
    z = np.asarray(stage_table["log_ratio"])
    lx = np.clip(np.log(np.maximum(np.asarray(x, float), 1e-9)), xs[0], xs[-1])
    ly = np.clip(np.log1p(np.maximum(np.asarray(y, float), 0.0)), ys[0], ys[-1])
    i = np.clip(np.searchsorted(xs, lx, "right") - 1, 0, len(xs) - 2) if len(xs) > 1 else np.zeros(lx.shape, int)
    j = np.clip(np.searchsorted(ys, ly, "right") - 1, 0, len(ys) - 2) if len(ys) > 1 else np.zeros(ly.shape, int)
    if len(xs) == 1 or len(ys) == 1:
        return np.exp(z[np.minimum(i, z.shape[0] - 1), np.minimum(j, z.shape[1] - 1)])
    tx = (lx - xs[i]) / (xs[i + 1] - xs[i])
    ty = (ly - ys[j]) / (ys[j + 1] - ys[j])
    v = (z[i, j] * (1 - tx) + z[i + 1, j] * tx) * (1 - ty) + (z[i, j + 1] * (1 - tx) + z[i + 1, j + 1] * tx) * ty
    return np.exp(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="folder of <model>-{fp16,kivi,gear,h2o,stream}/attention.csv")
    ap.add_argument("--out", type=Path, default=packaged())
    a = ap.parse_args(argv)
    res = fit_ratios(a.src)
    write_json(a.out, res)
    for label, st in res["methods"].items():
        print(f"{label:18s} " + "  ".join(f"{s}: median x{v['median_ratio']:.2f} over {len(v['x'])}x{len(v['y'])}"
                                         for s, v in st.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
