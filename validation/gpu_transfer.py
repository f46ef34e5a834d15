"""Dense operators carried to a GPU nobody profiled, scored on the GPUs that were.

For every ordered pair of GPUs with measured dense tables (the shipped A100, A40 and H100 imports,
and the paper's A6000 LLaMA-2-7B table when `../shared` is there), every shape (model, TP) the
destination measured is predicted from the source GPU's fit carried by the datasheet roofline,
exactly as a simulation on an unprofiled GPU computes it (calibration/steps/compile.dense_time).
Scored per shape and token count on the step's dense time (every per-layer operator x layers +
embedding), beside the roofline prior's own dense time on the destination. The pair the donor rule
picks (calibration/steps/gpu_carry.rank_donors) is marked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rkvsim.calibration.steps.features import PER_LAYER_OPS

STEP_OPS = ("emb",) + tuple(sorted(PER_LAYER_OPS))     # a step's dense work: embedding + every layer's ops
SHAPE = ["hidden", "intermediate", "num_q_heads", "num_kv_heads", "head_dim", "vocab", "tp"]


def measured_tables(a6000: Path | None) -> dict[str, pd.DataFrame]:
    """Dense rows per GPU: the shipped imports, and the A6000's when its folder is given and exists."""
    from rkvsim.calibration.steps.profiles import packaged_store
    from rkvsim.profiler.profile import table_path
    out = {}
    for hw_dir in sorted(packaged_store().iterdir()):
        p = hw_dir / "vidur"
        if p.is_dir() and table_path(p, "operators.csv"):
            out[hw_dir.name] = pd.read_csv(table_path(p, "operators.csv"))
    if a6000 is not None and (Path(a6000) / "Llama-2-7b-hf" / "mlp.csv").exists():
        from rkvsim.models import resolve_model
        from rkvsim.profiler.vidur_import import Folder, convert_mlp
        f = Path(a6000) / "Llama-2-7b-hf"
        out["a6000"] = convert_mlp(pd.read_csv(f / "mlp.csv"), Folder(f, "Llama-2-7b-hf", "hf", "all", "fp16"),
                                   resolve_model("llama-2-7b"), "rethink-kv:Llama-2-7b-hf/mlp.csv")
    return out


def _model_of(shape: tuple):
    """The registered model with this shape (the tables hold the shape, not the depth or the block
    structure); None when no registered model has it."""
    from rkvsim.models import MODELS
    hid, inter, hq, hkv = shape[:4]
    for m in MODELS.values():
        if (m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads) == (hid, inter, hq, hkv):
            return m
    return None


def step_dense(piv: pd.DataFrame, layers: int) -> np.ndarray:
    w = np.array([1.0 if o == "emb" else float(layers) for o in piv.columns])
    return piv.to_numpy() @ w


def _prior_s(work: dict, hw) -> np.ndarray:
    """The roofline prior's time of dense work, point by point (simulator/roofline.Roofline.op)."""
    from rkvsim.simulator.roofline import Roofline, default_efficiency
    r = Roofline(hw, default_efficiency(hw))
    f, v, b = (np.broadcast_to(np.asarray(work[k], np.float64), np.shape(work["bytes"])) for k in ("flops", "vflops", "bytes"))
    return np.array([r.op(x, y, z) for x, y, z in zip(f.tolist(), v.tolist(), b.tolist())])


def score_pairs(tables: dict[str, pd.DataFrame], fits: dict) -> list[dict]:
    """One row per (destination, source or 'prior'): errors of the step's dense time over every shape.
    fits: GPU -> its StepFit; a shape the source never measured is predicted through the fit's
    shape-transfer estimator, as a simulation would."""
    from rkvsim.calibration.steps.compile import dense_time
    from rkvsim.calibration.steps.features import dense_work
    from rkvsim.calibration.steps.gpu_carry import rank_donors
    from rkvsim.models import resolve_hardware
    src_shapes = {g: set(tables[g].groupby(SHAPE[:4]).groups) for g in fits}
    rows = []
    for dst, d in tables.items():
        dh = resolve_hardware(dst)
        ranked = rank_donors(dh, [resolve_hardware(s) for s in fits if s != dst])
        picked = ranked[0].name if ranked else None
        errs: dict[str, list] = {}
        for shape, g in d.groupby(SHAPE):
            piv = g.pivot_table(index="num_tokens", columns="op", values="time_s_median")
            piv = piv[[o for o in STEP_OPS if o in piv.columns]].dropna()
            if piv.empty:
                continue
            m = _model_of(shape)
            L = m.num_layers if m else 32
            gated, parallel = (m.gated_mlp, m.parallel_block) if m else (True, False)
            y = step_dense(piv, L)
            t = piv.index.to_numpy(np.float64)
            dims, tp = shape[:6], shape[6]
            weight = {o: 1.0 if o == "emb" else float(L) for o in piv.columns}

            def build(tokens, op, gated=gated, parallel=parallel):
                return dense_work(op, tokens, *dims, tp, 2, gated=gated, parallel=parallel)
            pr = sum(weight[o] * _prior_s(build(t, o), dh) for o in piv.columns)
            errs.setdefault("prior", []).append(np.abs(pr - y) / y)
            for src, fit in fits.items():
                if src == dst:
                    continue
                sh = resolve_hardware(src)
                transfer = tuple(shape[:4]) not in src_shapes[src]
                p = sum(weight[o] * dense_time(fit.get("dense", "all", o), lambda tokens, o=o: build(tokens, o), t,
                                               transfer, sh, dh) for o in piv.columns)
                errs.setdefault(src, []).append(np.abs(p - y) / y)
        for via, e in errs.items():
            e = np.concatenate(e)
            rows.append({"to": dst, "from": via, "picked": via == picked, "points": int(len(e)),
                         "mape": float(e.mean()), "median_ape": float(np.median(e)), "p90_ape": float(np.quantile(e, 0.9))})
    return rows


def run(a6000: Path | None) -> list[dict]:
    from rkvsim.calibration.steps.profiles import fit_for, packaged_store
    tables = measured_tables(a6000)
    fits = {name: fit_for(packaged_store() / name / "vidur") for name in tables if name != "a6000"}
    return score_pairs(tables, fits)
