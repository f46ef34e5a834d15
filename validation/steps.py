"""Step throughput forecasts against measured engine throughput (`rkvsim validate`).

Each measured row (model, method, bsz, prompt_len, stage, thr) is one engine step shape:
prefill = bsz prompts of prompt_len tokens in one step (thr = bsz * prompt_len / time);
decoding = bsz requests at KV length prompt_len (thr = bsz / time). Eviction methods hold at
most their budget, which the method's cache model applies.

Accuracy is the paper's metric, 100 * mean(1 - |pred - meas| / meas), per method and stage.
Three forecasts are scored side by side:
- roofline: the uncalibrated prior;
- operators: the calibrated profile's operators, no engine terms fitted on these rows;
- engine (held out): operators plus engine terms fitted on measured rows, each row predicted
  by terms fitted WITHOUT it. Terms per stage (dense ops at their profiled time): attention
  scale, fixed and per-sequence seconds. Two protocols: k-fold over step shapes (every method's row of a shape
  held out together; attention scale and fixed seconds per method, since an engine's kernels
  differ per method from the profiled ones), and leave-one-method-out (shared terms fitted on
  the other methods: what a method nobody measured on this engine can expect).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from rkvsim.models import HardwareSpec, Method, method_from_engine_name, resolve_model
from rkvsim.simulator.calibrated import EngineTerms, StageTerms
from rkvsim.simulator.cost_model import RooflineCostModel, StepBatch

COLUMNS = ("model", "method", "bsz", "prompt_len", "stage", "thr")
STAGES = ("prefill", "decoding")

class ValidationError(ValueError):
    pass


def read_measured(path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValidationError(f"--measured {path}: cannot read CSV ({e})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValidationError(f"--measured {path}: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    bad = sorted(set(df["stage"]) - set(STAGES))
    if bad:
        raise ValidationError(f"--measured {path}: stage {bad[0]!r} unknown; use prefill or decoding")
    if (df["thr"] <= 0).any() or (df["bsz"] < 1).any() or (df["prompt_len"] < 1).any():
        raise ValidationError(f"--measured {path}: thr, bsz and prompt_len must be positive")
    return df.reset_index(drop=True)


def method_for(name: str, budget: int) -> Method:
    """'None-16' -> fp16, 'KIVI-4' -> kivi-4, 'H2O-16' -> h2o-<budget> (16 = fp16 payload): the
    names LMDeploy's logs use, which each method's spec lists (engine_names)."""
    try:
        return method_from_engine_name(name, budget)
    except ValueError as e:
        raise ValidationError(str(e)) from None


def step_batch(stage: str, bsz: int, prompt_len: int) -> StepBatch:
    z = np.zeros(0, np.int64)
    if stage == "prefill":
        return StepBatch(np.full(bsz, prompt_len, np.int64), np.zeros(bsz, np.int64), z, z)
    ctx = np.full(bsz, prompt_len, np.int64)
    return StepBatch(z, z, ctx, ctx.copy())


def throughput(stage: str, bsz: int, prompt_len: int, seconds: np.ndarray) -> np.ndarray:
    work = bsz * prompt_len if stage == "prefill" else bsz
    return work / seconds


def accuracy(pred: np.ndarray, meas: np.ndarray) -> float:
    return float(100.0 * np.mean(1.0 - np.abs(pred - meas) / meas))


@dataclass
class Predictors:
    """Per-row seconds: calibrated operators split into dense (+ head, all-reduce) and
    attention, no engine terms; the roofline prior; and the measured step."""
    dense_s: np.ndarray
    attn_s: np.ndarray
    roofline_s: np.ndarray
    meas_s: np.ndarray
    labels: np.ndarray                # rkvsim method label per row

    @property
    def ops_s(self) -> np.ndarray:
        return self.dense_s + self.attn_s


def operator_seconds(df: pd.DataFrame, profile_dir, hw: HardwareSpec, budget: int) -> Predictors:
    from rkvsim.simulator.calibrated import calibrated_cost_model
    n = len(df)
    dense, attn, roof, labels = np.zeros(n), np.zeros(n), np.zeros(n), []
    max_tok = int((df["bsz"] * df["prompt_len"]).max())
    max_b, max_c = int(df["bsz"].max()), int(df["prompt_len"].max()) + 1
    cache: dict = {}
    for i, r in enumerate(df.itertuples(index=False)):
        try:
            model = resolve_model(r.model)
        except KeyError as e:
            raise ValidationError(f"row {i + 2}: model {r.model!r} unknown ({e.args[0]})") from None
        m = method_for(r.method, budget)
        labels.append(m.label)
        key = (model.name, m.label)
        if key not in cache:
            cal = calibrated_cost_model(profile_dir, model, hw, m, 1, max_tok, max_b, max_c)
            cache[key] = (cal, RooflineCostModel(model, hw, m, 1))
        cal, rl = cache[key]
        b = step_batch(r.stage, int(r.bsz), int(r.prompt_len))
        dense[i], attn[i] = cal.operator_split(b)
        roof[i] = rl.step_time(b)
    work = np.where(df["stage"] == "prefill", df["bsz"] * df["prompt_len"], df["bsz"]).astype(float)
    return Predictors(dense, attn, roof, work / df["thr"].to_numpy(float), np.array(labels))


# ---- engine terms ---------------------------------------------------------------------------
def _nnls_rel(X: np.ndarray, y: np.ndarray, rel_to: np.ndarray | None = None) -> np.ndarray:
    """Non-negative least squares on relative error (rows weighted by 1/rel_to, default 1/y)."""
    scale = np.maximum(np.abs(X).max(axis=0), 1e-30)
    w = 1.0 / (y if rel_to is None else rel_to)
    coef, _ = nnls((X / scale) * w[:, None], y * w)
    return coef / scale


def fit_engine_terms(p: Predictors, bsz: np.ndarray, stage: np.ndarray, per_method: bool,
                     sel: np.ndarray | None = None, source: str = "", fitted_on: list | None = None) -> EngineTerms:
    """Per stage: meas = dense + attn_scale * attention + fixed + per_seq * bsz, terms >= 0.
    per_method: attention scale and fixed seconds per method label (per-seq shared), for
    methods with rows in the fit; the shared fit serves any other method.
    The dense scale stays 1: the engine runs the same GEMMs the profile timed, and in decode a
    free scale is collinear with the fixed term (weights dominate at every measured batch). Left
    free, the fit chose 0.17 x dense + 27 ms, which would under-cost the large batches a
    simulation reaches and the measurements never covered."""
    sel = np.ones(len(bsz), bool) if sel is None else sel
    shared, methods = {}, {}
    for st in STAGES:
        rows = sel & (stage == st)
        if rows.sum() < 4:
            shared[st] = StageTerms()
            continue
        X = np.column_stack([p.dense_s[rows], p.attn_s[rows], np.ones(rows.sum()), bsz[rows].astype(float)])
        c = np.concatenate([[1.0], _nnls_rel(X[:, 1:], p.meas_s[rows] - p.dense_s[rows], p.meas_s[rows])])
        shared[st] = StageTerms(*map(float, c))
        if not per_method:
            continue
        labs = np.unique(p.labels[rows])
        cols = [p.dense_s[rows], bsz[rows].astype(float)]
        for lab in labs:
            is_m = (p.labels[rows] == lab).astype(float)
            cols += [p.attn_s[rows] * is_m, is_m]
        c = np.concatenate([[1.0], _nnls_rel(np.column_stack(cols[1:]), p.meas_s[rows] - p.dense_s[rows],
                                             p.meas_s[rows])])
        for j, lab in enumerate(labs):
            methods.setdefault(str(lab), {})[st] = StageTerms(float(c[0]), float(c[2 + 2 * j]), float(c[3 + 2 * j]),
                                                              float(c[1]))
    pm = {lab: {"prefill": d.get("prefill", shared["prefill"]), "decode": d.get("decoding", shared["decoding"])}
          for lab, d in methods.items()}
    return EngineTerms(shared["prefill"], shared["decoding"], source, fitted_on or [], pm)


def apply_terms(t: EngineTerms, p: Predictors, bsz: np.ndarray, stage: np.ndarray, sel: np.ndarray) -> np.ndarray:
    out = np.empty(int(sel.sum()))
    for k, i in enumerate(np.flatnonzero(sel)):
        pre, dec = t.for_method(str(p.labels[i]))
        out[k] = (pre if stage[i] == "prefill" else dec).apply(p.dense_s[i], p.attn_s[i], int(bsz[i]))
    return out


def heldout_leave_one_method_out(p: Predictors, df: pd.DataFrame) -> np.ndarray:
    """Shared engine terms fitted on the other methods' rows (a held-out method has no terms of its own)."""
    bsz, stage = df["bsz"].to_numpy(), df["stage"].to_numpy()
    meth = df["method"].to_numpy()
    out = np.empty(len(df))
    for m in np.unique(meth):
        test = meth == m
        t = fit_engine_terms(p, bsz, stage, per_method=False, sel=~test)
        out[test] = apply_terms(t, p, bsz, stage, test)
    return out


def heldout_kfold_shapes(p: Predictors, df: pd.DataFrame, folds: int = 5, seed: int = 0,
                         per_method: bool = True) -> np.ndarray:
    """k-fold over step shapes (stage, bsz, prompt_len): every method's row of a shape is held
    out together, and predicted by terms fitted on the other shapes."""
    bsz, stage = df["bsz"].to_numpy(), df["stage"].to_numpy()
    shape = df["stage"].astype(str) + ":" + df["bsz"].astype(str) + ":" + df["prompt_len"].astype(str)
    uniq = np.unique(shape.to_numpy())
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = {uniq[j]: k % folds for k, j in enumerate(order)}
    f = shape.map(fold_of).to_numpy()
    out = np.empty(len(df))
    for k in range(folds):
        test = f == k
        t = fit_engine_terms(p, bsz, stage, per_method=per_method, sel=~test)
        out[test] = apply_terms(t, p, bsz, stage, test)
    return out


def score_table(df: pd.DataFrame, pred_thr: np.ndarray) -> dict:
    meas = df["thr"].to_numpy(float)
    out = {"methods": {}}
    for m, g in df.groupby("method", sort=True):
        idx = g.index.to_numpy()
        row = {"accuracy": accuracy(pred_thr[idx], meas[idx]), "rows": int(len(idx))}
        for st in STAGES:
            s = idx[g["stage"].to_numpy() == st]
            row["decoding" if st == "decoding" else "prefill"] = accuracy(pred_thr[s], meas[s]) if len(s) else None
        out["methods"][str(m)] = row
    out["overall"] = accuracy(pred_thr, meas)
    out["overall_prefill"] = accuracy(pred_thr[df["stage"] == "prefill"], meas[df["stage"] == "prefill"])
    out["overall_decoding"] = accuracy(pred_thr[df["stage"] == "decoding"], meas[df["stage"] == "decoding"])
    return out
