"""Per-operator, per-method step-cost predictors fitted on profile tables (`rkvprof fit`).

Each operator (a dense op, decode attention of a method, prefill attention of a method) gets
several candidate regressors, each scored by k-fold cross-validation on rows it was not
fitted on; the candidate with the lowest held-out error is refitted on every row and kept.

Candidates (all predict seconds from the physics columns of calibration/steps/features.py,
so they apply to model shapes the profile never saw):
- physics: time = c0 + sum_k c_k * feature_k with c >= 0 (non-negative least squares on
  relative error). Extrapolates linearly, which is what FLOPs and bytes do.
- physics+gbt: physics times exp(gradient-boosted correction on log features): the
  linear law plus the kernel's non-linearities (tile quantisation, occupancy) inside the
  profiled range, flat outside it.
- forest: a random forest on log features predicting log time (Vidur's choice).
- xgboost: gradient-boosted trees on log features (only when the xgboost package is there).

The estimators follow scikit-learn's fit/predict; the fitted set is an artifact
(`<profile>/fit/step_fit.pkl` + a readable `fit.json`) that steps/compile.py turns into
lookup tables for the simulator.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rkvsim.models import parse_method

from rkvsim.models.files import write_bytes
from rkvsim.profiler.profile import table_path
from rkvsim.calibration import legacy
from rkvsim.calibration.steps.features import (DECODE_FEATURES, DENSE_FEATURES, DENSE_OPS, PER_LAYER_OPS, PREFILL_FEATURES,
                                               SHAPE_TREE_FEATURES, decode_work, dense_work, design, log_features,
                                               prefill_work, wave_features)

FIT_VERSION = 3   # 2: attention fits record their head layout (shape), fits their attention_models;
                 # 3: shape-transfer trees read the GPU's tile waves (features.wave_features), rotary its
                 # query and KV widths apart
FIT_DIR = "fit"
FIT_PICKLE = "step_fit.pkl"
FIT_JSON = "fit.json"
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


# ---- candidates ---------------------------------------------------------------------------
class PhysicsRegressor:
    """time = c0 + sum c_k x_k, c >= 0, least squares on relative error."""
    name = "physics"

    def __init__(self, features: tuple[str, ...]):
        self.features = features

    def fit(self, work: dict, y: np.ndarray) -> "PhysicsRegressor":
        from scipy.optimize import nnls
        X = design(work, self.features)
        scale = np.maximum(np.abs(X).max(axis=0), 1e-30)   # conditioning: columns span 1 .. 1e13
        w = 1.0 / np.maximum(y, 1e-12)
        coef, _ = nnls((X / scale) * w[:, None], y * w, maxiter=50 * X.shape[1])
        self.coef_ = coef / scale
        return self

    def predict(self, work: dict) -> np.ndarray:
        return np.maximum(design(work, self.features) @ self.coef_, 1e-9)


class PhysicsBoost:
    """physics x exp(boosted trees on log features): non-linear corrections, flat outside the data."""
    name = "physics+gbt"
    tree_features: tuple[str, ...] | None = None     # None: the physics features
    gbt_params = {"max_iter": 200, "learning_rate": 0.08, "min_samples_leaf": 8}

    def __init__(self, features: tuple[str, ...], seed: int = 0):
        self.features, self.seed = features, seed

    def _trees_on(self, work: dict) -> np.ndarray:
        return log_features(work, self.tree_features or self.features)

    def fit(self, work: dict, y: np.ndarray) -> "PhysicsBoost":
        from sklearn.ensemble import HistGradientBoostingRegressor
        self.base_ = PhysicsRegressor(self.features).fit(work, y)
        r = np.log(y / self.base_.predict(work))
        self.gbt_ = HistGradientBoostingRegressor(**self.gbt_params, random_state=self.seed).fit(self._trees_on(work), r)
        return self

    def predict(self, work: dict) -> np.ndarray:
        return self.base_.predict(work) * np.exp(self.gbt_.predict(self._trees_on(work)))


class ShapeBoost(PhysicsBoost):
    """The shape-transfer estimator for profiles of several models: physics law on the work, times
    exp(boosted trees on the log of tokens, N, K, the work and, on a GPU, its tile waves). Trained on
    many models at once, the trees learn how efficiency moves with the GEMM's shape, so a model never
    profiled is predicted from its shape; outside the shapes seen they are flat and the physics law
    carries the scale. sms: the profiled GPU's SM count (features.wave_features); None on a CPU."""
    name = "shape+gbt"
    tree_features = SHAPE_TREE_FEATURES
    gbt_params = {"max_iter": 300, "learning_rate": 0.08, "min_samples_leaf": 20, "l2_regularization": 1.0}

    def __init__(self, features: tuple[str, ...], seed: int = 0, sms: int | None = None):
        super().__init__(features, seed)
        self.sms = sms

    def _trees_on(self, work: dict) -> np.ndarray:
        base = log_features(work, self.tree_features)
        sms = getattr(self, "sms", None)
        return np.column_stack([base, wave_features(work, sms)]) if sms else base


class LogForest:
    """Random forest on log features predicting log time (the Vidur family)."""
    name = "forest"

    def __init__(self, features: tuple[str, ...], seed: int = 0):
        self.features, self.seed = features, seed

    def fit(self, work: dict, y: np.ndarray) -> "LogForest":
        from sklearn.ensemble import RandomForestRegressor
        self.rf_ = RandomForestRegressor(n_estimators=60, min_samples_leaf=2, random_state=self.seed,
                                         n_jobs=1).fit(log_features(work, self.features), np.log(y))
        return self

    def predict(self, work: dict) -> np.ndarray:
        return np.exp(self.rf_.predict(log_features(work, self.features)))


class LogXGB:
    name = "xgboost"

    def __init__(self, features: tuple[str, ...], seed: int = 0):
        self.features, self.seed = features, seed

    def fit(self, work: dict, y: np.ndarray) -> "LogXGB":
        import xgboost
        self.xgb_ = xgboost.XGBRegressor(n_estimators=300, max_depth=6, learning_rate=0.08,
                                         random_state=self.seed, n_jobs=1, verbosity=0)
        self.xgb_.fit(log_features(work, self.features), np.log(y))
        return self

    def predict(self, work: dict) -> np.ndarray:
        return np.exp(self.xgb_.predict(log_features(work, self.features)))


def have_xgboost() -> bool:
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return False
    return True


def candidates(features: tuple[str, ...], seed: int, only: tuple[str, ...] | None = None) -> list:
    cands = [PhysicsRegressor(features), PhysicsBoost(features, seed), LogForest(features, seed)]
    if have_xgboost():
        cands.append(LogXGB(features, seed))
    if only:
        cands = [c for c in cands if c.name in only]
    return cands


def _subset(work: dict, idx: np.ndarray) -> dict:
    return {k: np.asarray(v)[idx] for k, v in work.items()}


def mape(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - y) / y))


def kfold_error(make, work: dict, y: np.ndarray, folds: int, seed: int) -> tuple[float, np.ndarray]:
    """Mean absolute percentage error of `make()` on rows held out of its fit, and the
    out-of-fold predictions (every row predicted by a model that never saw it)."""
    n = len(y)
    order = np.random.default_rng(seed).permutation(n)
    oof = np.empty(n)
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test, assume_unique=True)
        oof[test] = make().fit(_subset(work, train), y[train]).predict(_subset(work, test))
    return mape(oof, y), oof


def group_predictions(make, work: dict, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Leave-one-group-out: each group's (a model's) rows predicted by a fit on all the others."""
    pred = np.empty(len(y))
    for g in sorted(set(groups.tolist())):
        test = np.flatnonzero(groups == g)
        train = np.flatnonzero(groups != g)
        pred[test] = make().fit(_subset(work, train), y[train]).predict(_subset(work, test))
    return pred


def per_group_mape(pred: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    return {str(g): mape(pred[groups == g], y[groups == g]) for g in sorted(set(groups.tolist()))}


def twin_floor(work: dict, y: np.ndarray, groups: np.ndarray, twin_keys: dict | None = None) -> dict[str, tuple[float, int]]:
    """The reproducibility floor of leave-one-model-out: where another model's profile timed the very
    same operator (every work column equal, and every `twin_keys` column: a head width the work does not
    show), each such row of a model is predicted by the mean of the other models' measurements of it.
    Returns {model: (MAPE over its twin rows, twin rows)} for the models with any. No predictor that reads
    only the shape can beat this on those rows: it is how far two profiling runs of one kernel disagree
    (measured: 4-6% on the A100's norms, 1-2% on the A40's)."""
    import pandas as pd     # here, not at the top: a process that only loads compiled tables never needs it

    cols = {k: np.asarray(v, np.float64) for k, v in work.items()}
    cols.update({f"_{k}": np.asarray(v, np.float64) for k, v in (twin_keys or {}).items()})
    df = pd.DataFrame(cols)
    keys = list(df.columns)
    df["model"], df["y"] = np.asarray(groups).astype(str), np.asarray(y, np.float64)
    g = df.groupby(keys, sort=False)
    n_models = g["model"].transform("nunique").to_numpy()
    total, count = g["y"].transform("sum").to_numpy(), g["y"].transform("count").to_numpy()
    # the other models' mean: a model appears once per shape (rows are merged by shape in _dense_rows)
    own = df.groupby(keys + ["model"], sort=False)["y"]
    own_sum, own_n = own.transform("sum").to_numpy(), own.transform("count").to_numpy()
    twin = (n_models > 1) & (count > own_n)
    other = (total - own_sum)[twin] / (count - own_n)[twin]
    err = np.abs(other - df["y"].to_numpy()[twin]) / df["y"].to_numpy()[twin]
    models = df["model"].to_numpy()[twin]
    return {str(m): (float(err[models == m].mean()), int((models == m).sum())) for m in sorted(set(models.tolist()))}


def group_error(make, work: dict, y: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """The mean absolute percentage error of each group under leave-one-group-out."""
    return per_group_mape(group_predictions(make, work, y, groups), y, groups)


# ---- one operator ---------------------------------------------------------------------------
@dataclass
class OpFit:
    family: str                     # dense | decode | prefill
    method: str                     # profile method label ('all' for dense ops)
    op: str
    features: tuple[str, ...]
    chosen: str
    estimator: object
    heldout: dict[str, float]       # candidate -> k-fold held-out MAPE
    rows: int
    ranges: dict[str, list[float]]  # profiled range of the raw inputs (see steps/compile.py: anchored)
    physics: object = None          # the linear law refitted on all rows: scales predictions
                                    # beyond the profiled range
    transfer: object = None         # physics-anchored estimator for model shapes not profiled
                                    # (trees alone cannot scale with FLOPs they never saw)
    heldout_models: dict = field(default_factory=dict)   # candidate -> {held-out model: MAPE}
    shape: tuple | None = None      # attention: the (q heads, kv heads, head dim) per rank of its rows, when
                                    # one (the features of one shape cannot tell heads apart: see compile)
    floor: dict | None = None       # dense, several models: {model: (twin MAPE, twin rows)} (fit.twin_floor)

    def predict(self, work: dict) -> np.ndarray:
        return self.estimator.predict(work)


def fit_op(family: str, method: str, op: str, work: dict, y: np.ndarray, features: tuple[str, ...],
           folds: int = 5, seed: int = 0, only: tuple[str, ...] | None = None) -> OpFit:
    y = np.asarray(y, np.float64)
    # Small tables (a quick CPU grid times a dense op at ~6 token counts): fewer folds, each
    # still held out; under 4 rows nothing can be held out, so only the physics law is fitted
    # and its error is reported as unknown (NaN), never as a training-set score.
    folds = min(folds, len(y) // 2)
    if folds < 2:
        est = PhysicsRegressor(features).fit(work, y)
        keys = [k for k in ("tokens", "batch", "ctx", "past") if k in work]
        ranges = {k: [float(np.min(work[k])), float(np.max(work[k]))] for k in keys}
        return OpFit(family, method, op, features, "physics", est, {"physics": float("nan")}, len(y), ranges, est, est)
    if len(y) < 12 and only is None:
        only = ("physics", "physics+gbt")   # trees on a handful of rows only memorise them
    scores = {}
    for cand in candidates(features, seed, only):
        make = (lambda c=cand: type(c)(features) if isinstance(c, PhysicsRegressor) else type(c)(features, seed))
        scores[cand.name] = kfold_error(make, work, y, folds, seed)[0]
    best = min(scores, key=scores.get)
    est = next(c for c in candidates(features, seed, only) if c.name == best).fit(work, y)
    keys = [k for k in ("tokens", "batch", "ctx", "past") if k in work]
    ranges = {k: [float(np.min(work[k])), float(np.max(work[k]))] for k in keys}
    phys = est if best == "physics" else PhysicsRegressor(features).fit(work, y)
    transfer = est if best in ("physics", "physics+gbt") else (
        PhysicsBoost(features, seed).fit(work, y) if only is None or "physics+gbt" in only else phys)
    return OpFit(family, method, op, features, best, est, scores, len(y), ranges, phys, transfer)


def fit_dense_shapes(op: str, work: dict, y: np.ndarray, groups: np.ndarray, seed: int = 0,
                     score: bool = True, sms: int | None = None, twin_keys: dict | None = None) -> tuple[OpFit, dict]:
    """A dense operator of a profile holding several models: the physics law and the shape-transfer
    estimator, scored leave-one-model-out (the error a model never profiled would see); the
    shape-transfer estimator is refitted on every model and kept. score=False skips the scoring (the
    simulator's first use of a shipped profile). Also returns each candidate's leave-one-model-out
    predictions per row (empty unscored), from which fit_profile scores whole layers."""
    y = np.asarray(y, np.float64)
    makers = {"physics": lambda: PhysicsRegressor(DENSE_FEATURES),
              ShapeBoost.name: lambda: ShapeBoost(DENSE_FEATURES, seed, sms)}
    preds = {name: group_predictions(make, work, y, groups) for name, make in makers.items()} if score else {}
    by_model = {name: per_group_mape(p, y, groups) for name, p in preds.items()}
    scores = {name: float(np.mean(list(per.values()))) for name, per in by_model.items()} or \
        {ShapeBoost.name: float("nan")}
    # Always the shape-transfer estimator (the physics law is scored beside it for comparison), so
    # that a scored fit and the simulator's unscored one hold the same predictors.
    est = makers[ShapeBoost.name]().fit(work, y)
    ranges = {"tokens": [float(np.min(work["tokens"])), float(np.max(work["tokens"]))]}
    f = OpFit("dense", "all", op, DENSE_FEATURES, ShapeBoost.name, est, scores, len(y), ranges,
              PhysicsRegressor(DENSE_FEATURES).fit(work, y), est, by_model)
    if score:
        f.floor = twin_floor(work, y, groups, twin_keys)
    return f, preds


def layer_error(rows: dict[str, tuple], preds: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Leave-one-model-out error of a whole transformer layer's dense time, per candidate and held-out
    model: at every (tokens, TP) where the model measured each of its per-layer operators, the sum of
    their predictions against the sum measured. This is the figure a step's time inherits: operators of
    a few microseconds, where Vidur's timer resolution alone is several per cent, weigh what they cost."""
    import pandas as pd

    out: dict[str, dict[str, float]] = {}
    for cand in sorted({c for p in preds.values() for c in p}):
        frames = []
        for op, (work, y, groups, tp, *_) in rows.items():
            if op in PER_LAYER_OPS and cand in preds.get(op, {}):
                frames.append(pd.DataFrame({"op": op, "model": groups, "tokens": work["tokens"], "tp": tp,
                                            "y": y, "p": preds[op][cand]}))
        if not frames:
            continue
        df = pd.concat(frames, ignore_index=True)
        ops_of = df.groupby("model")["op"].nunique()
        cell = df.groupby(["model", "tokens", "tp"]).agg(y=("y", "sum"), p=("p", "sum"), n=("op", "nunique"))
        cell = cell[cell["n"].to_numpy() == ops_of.reindex(cell.index.get_level_values("model")).to_numpy()]
        err = (cell["p"] - cell["y"]).abs() / cell["y"]
        out[cand] = {str(m): float(v) for m, v in err.groupby(level="model").mean().items()}
    return out


# ---- a whole profile ----------------------------------------------------------------------
@dataclass
class StepFit:
    version: int
    profile: str                    # profile folder it was fitted on
    origin: str                     # profile:<hw>@<date>
    hardware: str
    model: str
    dtype_bytes: int
    tables_sha256: str
    ops: dict[tuple[str, str, str], OpFit] = field(default_factory=dict)
    created: str = ""
    versions: dict = field(default_factory=dict)
    models: list = field(default_factory=list)    # every model whose dense rows the fit saw
    attention_models: list = field(default_factory=list)   # the models whose attention was measured
    layer_heldout: dict = field(default_factory=dict)      # candidate -> {held-out model: MAPE of a layer's
                                                           # dense time} (fit.layer_error; scored fits)

    @property
    def model_names(self) -> list:
        """The models whose dense rows the fit saw (fits saved before `models` existed: their one)."""
        return getattr(self, "models", None) or [self.model]

    def profiled(self, model_name: str) -> bool:
        return model_name in self.model_names

    def has_attention(self) -> bool:
        return bool(set(self.methods("decode")) & set(self.methods("prefill")))

    def attention_profiled(self, model_name: str) -> bool:
        have = getattr(self, "attention_models", None)
        return model_name in have if have else self.profiled(model_name)

    def methods(self, family: str) -> list[str]:
        return sorted({m for (f, m, _) in self.ops if f == family})

    def get(self, family: str, method: str, op: str) -> OpFit | None:
        return self.ops.get((family, method, op))

    def summary(self) -> list[dict]:
        out = []
        for (fam, meth, op), f in sorted(self.ops.items()):
            row = {"family": fam, "method": meth, "op": op, "rows": f.rows, "chosen": f.chosen}
            row.update({f"heldout_mape_{k}": v for k, v in f.heldout.items()})
            for cand, per in (getattr(f, "heldout_models", None) or {}).items():
                row[f"leave_one_model_out_{cand}"] = per
            if getattr(f, "floor", None):
                row["reproducibility_floor"] = {m: {"mape": e, "rows": n} for m, (e, n) in f.floor.items()}
            out.append(row)
        return out


def tables_sha(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("attention.csv", "operators.csv"):
        p = table_path(folder, name)
        if p is not None:
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


SHAPE_COLS = ("hidden", "intermediate", "num_q_heads", "num_kv_heads", "vocab")


def model_groups(ops: pd.DataFrame, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model name, gated MLP, parallel block) per row: a row's shape columns matched against
    meta.json's `models` (imported multi-model profiles), else the profile's one model, gated and
    sequential. A `models` entry written before `parallel_block` existed takes the registered model's."""
    from rkvsim.models import MODELS
    names = {}
    for name, sh in (meta.get("models") or {}).items():
        parallel = sh.get("parallel_block", getattr(MODELS.get(name), "parallel_block", False))
        names[(sh["hidden"], sh["intermediate"], sh["num_q_heads"], sh["num_kv_heads"])] = \
            (name, sh.get("gated_mlp", True), parallel)
    keys = list(zip(*(ops[c].astype(int).tolist() for c in SHAPE_COLS[:4])))
    default = (meta.get("model", ""), True, False)
    hit = [names.get(k, default) for k in keys]
    return (np.array([h[0] for h in hit], dtype=object), np.array([h[1] for h in hit], dtype=bool),
            np.array([h[2] for h in hit], dtype=bool))


def _dense_rows(ops: pd.DataFrame, dt: int, meta: dict | None = None) -> dict[str, tuple]:
    """op -> (work, measured seconds, model per row, TP per row, head dim per row)."""
    out = {}
    # Dense ops are method-independent: Vidur ships a copy of the same mlp.csv per method, so
    # rows with the same shape are merged (median) before fitting, not counted five times.
    shape = ["op", "num_tokens", "tp", "hidden", "intermediate", "num_q_heads", "num_kv_heads", "head_dim", "vocab"]
    ops = ops.groupby(shape, as_index=False)["time_s_median"].median()
    for op, g in ops.groupby("op"):
        if op not in DENSE_OPS:
            continue
        groups, gated, parallel = model_groups(g, meta or {})
        work = dense_work(op, g["num_tokens"], g["hidden"], g["intermediate"], g["num_q_heads"],
                          g["num_kv_heads"], g["head_dim"], g["vocab"], g["tp"], dt, gated=gated, parallel=parallel)
        out[op] = (work, g["time_s_median"].to_numpy(float), groups, g["tp"].to_numpy(np.int64),
                   g["head_dim"].to_numpy(np.int64))
    return out


def attention_work(stage: str, method_label: str, g: pd.DataFrame, dt: int) -> dict:
    m = parse_method(method_label)
    if stage == "decode":
        # Keyed by the tokens the cache holds: collected rows record them (cache_tokens, after
        # eviction); Vidur's rows were timed at a cache of kv_len tokens, evicted or not.
        held = g["kv_len"].to_numpy(np.int64)
        if "cache_tokens" in g:
            import pandas as pd
            ct = pd.to_numeric(g["cache_tokens"], errors="coerce").to_numpy(float)
            held = np.where(np.isnan(ct), held, ct).astype(np.int64)
        return decode_work(m, g["batch_size"], held, g["num_q_heads"], g["num_kv_heads"],
                           g["head_dim"], prompt=held, dtype_bytes=dt)
    return prefill_work(m, g["new_tokens"], g["kv_len"], g["num_q_heads"], g["num_kv_heads"],
                        g["head_dim"], dtype_bytes=dt)


def attention_time(g: pd.DataFrame) -> np.ndarray:
    """Kernel time plus the engine work Vidur times apart (reshapes, cache save)."""
    t = g["time_s_median"].to_numpy(float)
    if "overhead_s_median" in g:
        t = t + g["overhead_s_median"].fillna(0.0).to_numpy(float)
    return t


def fit_profile(profile, folds: int = 5, seed: int = 0, only: tuple[str, ...] | None = None,
                progress=None, score: bool = True) -> StepFit:
    """Fit every operator of a loaded profiler.profile.Profile. Dense operators of a profile with
    several models are fitted by fit_dense_shapes (scored leave-one-model-out); score=False fits
    each operator's transfer estimator without scoring (the simulator's first use)."""
    meta = profile.meta
    dt = DTYPE_BYTES.get(str(meta.get("dtype", "float16")), 2)
    jobs = []
    models = set()
    shapes = {}     # (family, method) -> the one (q heads, kv heads, head dim) per rank its rows were timed at
    ops = profile.tables.get("operators")
    dense_rows = {}
    if ops is not None and len(ops):
        ops = ops[ops["time_s_median"] > 0]
        dense_rows = _dense_rows(ops, dt, meta)
        for op, (work, y, groups, _, head_dim) in dense_rows.items():
            models |= set(groups.tolist())
            jobs.append(("dense", "all", op, work, y, DENSE_FEATURES,
                         # rotary: equal widths of other head sizes are other kernels (trip counts per head)
                         (groups, {"head_dim": head_dim} if op == "attn_rope" else None)
                         if len(set(groups.tolist())) > 1 else None))
    att = profile.tables.get("attention")
    if att is not None and len(att):
        att = att[att["time_s_median"] > 0]
        for (method, stage), g in att.groupby(["method", "stage"]):
            family = "decode" if stage == "decode" else "prefill"
            feats = DECODE_FEATURES if family == "decode" else PREFILL_FEATURES
            jobs.append((family, method, "attention", attention_work(stage, method, g, dt), attention_time(g), feats,
                         None))
            heads = g[["num_q_heads", "num_kv_heads", "head_dim"]].drop_duplicates()
            shapes[(family, method)] = tuple(int(v) for v in heads.iloc[0]) if len(heads) == 1 else None
    if not jobs:
        raise ValueError(f"{profile.folder}: no operator or attention rows to fit")
    fit = StepFit(FIT_VERSION, str(profile.folder), profile.origin, profile.hardware, meta.get("model", ""),
                  dt, tables_sha(Path(profile.folder)),
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), versions=_versions(),
                  models=sorted(models) or [meta.get("model", "")],
                  attention_models=list(meta.get("attention_models") or []))
    sms = _sm_count(profile.hardware)
    lomo_preds = {}
    from threadpoolctl import threadpool_limits
    # One thread: the fits are small, and OpenMP workers spinning on a busy 2-core machine
    # made gradient boosting 8x slower than single-threaded.
    with threadpool_limits(1):
        for family, method, op, work, y, feats, groups in jobs:
            if groups is not None:     # several models' rows: scored leave-one-model-out
                f, lomo_preds[op] = fit_dense_shapes(op, work, y, groups[0], seed, score, sms, groups[1])
            else:
                f = fit_op(family, method, op, work, y, feats, folds, seed, only if score else only or ("physics+gbt",))
            f.shape = shapes.get((family, method))
            fit.ops[(family, method, op)] = f
            if progress:
                progress(family, method, op)
    if any(lomo_preds.values()):
        fit.layer_heldout = layer_error(dense_rows, lomo_preds)
    return fit


def _sm_count(hardware: str) -> int | None:
    """The profiled GPU's SM count for the wave features; None for a CPU or a device without a spec."""
    from rkvsim.models import resolve_hardware
    try:
        return resolve_hardware(hardware).sm_count or None
    except KeyError:
        return None


def _versions() -> dict:
    import sklearn
    return {"python": platform.python_version(), "numpy": np.__version__, "scikit-learn": sklearn.__version__}


# ---- artifact -----------------------------------------------------------------------------
def fit_folder(profile_dir: str | Path) -> Path:
    return Path(profile_dir) / FIT_DIR


def save_fit(fit: StepFit, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / FIT_PICKLE, pickle.dumps(fit, protocol=pickle.HIGHEST_PROTOCOL))
    doc = {"version": fit.version, "profile": fit.profile, "origin": fit.origin, "hardware": fit.hardware,
           "model": fit.model, "tables_sha256": fit.tables_sha256, "created": fit.created,
           "versions": fit.versions, "metric": "k-fold held-out mean absolute percentage error (fraction)",
           "operators": fit.summary(),
           "layer_leave_one_model_out": getattr(fit, "layer_heldout", {}) or {}}
    write_bytes(out / FIT_JSON, json.dumps(doc, indent=1, sort_keys=True).encode())
    return out


class FitError(RuntimeError):
    pass


def load_fit(profile_dir: str | Path, fit_dir: str | Path | None = None) -> StepFit:
    """The fit saved beside a profile (or in `fit_dir`); refuses one fitted on different tables."""
    folder = Path(profile_dir)
    path = Path(fit_dir or fit_folder(folder)) / FIT_PICKLE
    if not path.exists():
        raise FitError(f"{folder} has no fitted step costs; run: rkvprof fit {folder}")
    try:
        fit = legacy.loads(path.read_bytes())   # reads fits saved under the old module names too
    except Exception as e:   # a pickle from another scikit-learn / numpy version
        raise FitError(f"{path} cannot be read here ({type(e).__name__}: {e}); refit: rkvprof fit {folder}") from None
    if getattr(fit, "version", None) != FIT_VERSION:
        raise FitError(f"{path} has fit version {getattr(fit, 'version', None)}, this rkvsim reads {FIT_VERSION}; "
                       f"refit: rkvprof fit {folder}")
    if fit.tables_sha256 != tables_sha(folder):
        raise FitError(f"{path} was fitted on other tables than {folder} now holds; refit: rkvprof fit {folder}")
    return fit
