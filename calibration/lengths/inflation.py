"""Length-inflation model: how much longer (or shorter) a response gets under a KV-cache
compression config, as r = L_compressed / L_uncompressed per prompt.

Data: the generation rows of rkvsim.calibration.generation.collect (generation/store.py format). For every
prompt that has the baseline row ('fp16', T=1.0, same random stream as the compressed
configs) each other config gives one pair (L_base, L_config) and so one ratio.

Model: per config label, a quantile map from the uncompressed length distribution to the
compressed one, as coarse as the data demands. Both samples (FP16 reply lengths and the
config's, over the same prompts) are sorted and cut into K equal-mass quantile bins, K =
n // MIN_PER_BIN (1 to MAX_BINS); bin k's ratio is the config's mean length in its k-th
bin over FP16's mean in its k-th bin. A request whose FP16 reply would be L tokens gets the
ratio interpolated (in log L) between the bins' FP16 mean lengths, the edge bin's beyond
them. With K = 1 that is the total-token ratio, which is all a few dozen prompts can
support; with hundreds the map follows the shape (say, short replies lengthened, capped
ones not). A config whose replies are distributed like FP16's gets ratio ~1. As the
workload's lengths are draws from the uncompressed distribution, the mapped ones are draws
from the compressed one (the inverse-CDF coupling), one per request, deterministic given
the workload. Prompt features beyond that were tried: two prompt-length strata scored worse
on held-out total tokens than one pool (mean |log error| 0.222 vs 0.211 over 20 splits and
13 configs, 31 prompts), so the map is conditioned on the uncompressed length alone.

Why not draw the per-prompt ratios L_config / L_fp16: most of their spread is sampling
noise, not compression. A second FP16 sample of one prompt is at most half or at least
1.5x as long in about half of the prompts (fp16-reseed, 70 prompts), and a 5-token baseline reply beside a 1,024-token one gives
r = 200. Drawn per request, such ratios put that noise on top of the workload's own (its
lengths are samples already) and pull short replies up by regression to the mean: on
ShareGPT lengths it made the simulator's KIVI-4 replies 1.5x as long as FP16's where the
generations' total tokens were 1.03x (lengths-1024, 26 prompts). A fine-grained quantile
map on so few prompts fails the other way: its tails are single replies (0.3x to 2.1x
on the same run). The paired per-prompt view is what `rkvsim lengths report` shows (D
shares, intervals); the simulator takes the distribution shift. No parametric shape is
assumed: the map cannot invent lengths the data never showed.

Held-out evaluation: prompts (not rows) are split by a seeded hash, the model is fitted on
the training prompts only, and the held-out prompts are scored (mean log-ratio error, KS
distance between held-out compressed lengths and the mapped held-out baseline lengths,
total-token ratio observed vs predicted). The returned model is then refitted, by the same
procedure, on every prompt (as one refits an estimator after cross-validation): the data
are a few dozen prompts, and holding a third of them back from the simulator would cost
more than it proves. Its `heldout` figures describe the procedure, not this very object.

Censoring: responses are capped at max_new_tokens. Capped replies are kept, as the top
(tied) quantiles of their distribution: a method that runs to the cap more often maps the
upper quantiles of FP16 up to the cap, and where both are at the cap the ratio is 1 --
how much longer than the cap a reply would have grown is not observed. Cap shares are
recorded per config, so a report can say how much of a config's tail is censored.

No torch / pandas here: the simulator imports this module.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rkvsim.calibration.generation.store import load_rows
from rkvsim.models.files import read_json, write_json
from rkvsim.models.methods import BASELINE, QUANTIZING, spec_of

SCHEMA = "rkvsim-inflation-v2"
# The generation dataset shipped with rkvsim that `verbosity: {data: shipped}`, `rkvsim lengths
# report` and `shipped_inflation()` use: the one at the paper's 1,024-token cap (data/lengths/
# stops at 512, where 75% of the FP16 replies hit the cap and lengthening could not show).
SHIPPED_DATA = Path(__file__).resolve().parents[1] / "data" / "lengths-1024"
# Prompts per quantile bin. At 70 prompts with 23 per bin, fp16-reseed (FP16 sampled again)
# came out 2.06x FP16 in the lowest bin: below the cap, a third of a few dozen replies is
# mostly one sample's luck. One bin gave 1.12x (bootstrap 90% interval 0.96-1.30).
MIN_PER_BIN = 50
MAX_BINS = 10
TEST_FRACTION = 0.25


# ---------------------------------------------------------------- data

def load_dataset(data_dir) -> list[dict]:
    """All complete rows of a generation folder (first occurrence per (prompt, config);
    a torn last line, e.g. from the still-running collector, is ignored)."""
    done, _bad = load_rows(Path(data_dir))
    return list(done.values())


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    label: str
    kind: str
    prompt_tokens: int
    base_len: int
    len: int
    base_cap: bool     # baseline hit max_new_tokens: ratio is an upper bound
    cap: bool          # this config hit max_new_tokens: ratio is a lower bound
    limit: int | None = None   # the row's max_new_tokens

    @property
    def ratio(self) -> float:
        # Floor at 1 token: a zero-length response would give 0 or inf ratios.
        return max(self.len, 1) / max(self.base_len, 1)


def pairs_from_rows(rows, baseline: str = "fp16") -> list[Pair]:
    """One Pair per (prompt with a baseline row, other config of that prompt)."""
    base = {str(r["prompt_id"]): r for r in rows if r["config"] == baseline}
    out = []
    for r in rows:
        pid = str(r["prompt_id"])
        if r["config"] == baseline or pid not in base:
            continue
        b = base[pid]
        out.append(Pair(pid, str(r["config"]), str(r.get("method", "")), int(b["prompt_tokens"]),
                        int(b["response_tokens"]), int(r["response_tokens"]),
                        bool(b.get("hit_cap", False)), bool(r.get("hit_cap", False)),
                        int(r["max_new_tokens"]) if r.get("max_new_tokens") else None))
    out.sort(key=lambda p: (p.label, p.prompt_id))
    return out


def d_shares(pairs) -> dict:
    """Shares of the paper's length difference D = (L_base - L) / L_base at +-50%:
    D >= 0.5 (at most half as long) and D <= -0.5 (at least 1.5x as long)."""
    if not pairs:
        return {"n": 0, "d_ge_50": float("nan"), "d_le_m50": float("nan")}
    d = np.array([(max(p.base_len, 1) - p.len) / max(p.base_len, 1) for p in pairs])
    return {"n": len(pairs), "d_ge_50": float(np.mean(d >= 0.5)), "d_le_m50": float(np.mean(d <= -0.5))}


def _unit_hash(seed: int, prompt_id: str) -> float:
    h = hashlib.sha256(f"{seed}|{prompt_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0 ** 64


def split_prompts(prompt_ids, seed: int = 0, test_fraction: float = TEST_FRACTION) -> tuple[list, list]:
    """(train, test) prompt ids. A hash threshold, so a prompt stays on its side as the
    dataset grows; with >= 2 prompts each side gets at least one (tiny data would
    otherwise often have no held-out prompt at all)."""
    ids = sorted(set(map(str, prompt_ids)))
    u = {p: _unit_hash(seed, p) for p in ids}
    test = [p for p in ids if u[p] < test_fraction]
    train = [p for p in ids if u[p] >= test_fraction]
    if len(ids) >= 2 and not test:
        p = min(train, key=u.get)
        train.remove(p)
        test.append(p)
    elif len(ids) >= 2 and not train:
        p = max(test, key=u.get)
        test.remove(p)
        train.append(p)
    return train, test


# ---------------------------------------------------------------- model

def quantile_bins(base_sorted, len_sorted, k: int) -> tuple[list[float], list[float]]:
    """(FP16 mean length, ratio) per equal-mass quantile bin, bins with the same FP16 mean
    (capped replies filling several bins) merged."""
    b = np.asarray(base_sorted, dtype=float)
    c = np.asarray(len_sorted, dtype=float)
    cuts = [len(b) * i // k for i in range(k + 1)]
    sums = [[b[lo:hi].sum(), c[lo:hi].sum(), hi - lo] for lo, hi in zip(cuts, cuts[1:])]
    merged: list[list[float]] = []
    for bs, cs, m in sums:
        if merged and merged[-1][0] / merged[-1][2] == bs / m:
            merged[-1] = [merged[-1][0] + bs, merged[-1][1] + cs, merged[-1][2] + m]
        else:
            merged.append([bs, cs, m])
    return [bs / m for bs, _cs, m in merged], [cs / bs for bs, cs, _m in merged]


@dataclass
class ConfigDist:
    """Baseline and config reply lengths of one config's paired prompts, each sorted."""
    kind: str
    base_len: list[int]             # FP16 reply lengths, ascending
    len: list[int]                  # this config's reply lengths, ascending (not paired)
    cap_share: float                # share of pairs where this config hit the cap
    base_cap_share: float           # share where the baseline hit the cap
    bins: int = 1

    @property
    def n(self) -> int:
        return len(self.base_len)

    def __post_init__(self):
        centre, ratio = quantile_bins(np.maximum(self.base_len, 1), np.maximum(self.len, 1), self.bins)
        self._x = np.log(centre)
        self._r = np.asarray(ratio)

    def ratio(self, base_tokens) -> np.ndarray:
        """The map's ratio at each FP16 length (interpolated in log length, clamped)."""
        logl = np.log(np.maximum(np.asarray(base_tokens, dtype=float), 1.0))
        return np.interp(logl, self._x, self._r)


def _fit_config(pairs: list[Pair], min_per_bin: int) -> ConfigDist:
    return ConfigDist(kind=pairs[0].kind, base_len=sorted(p.base_len for p in pairs),
                      len=sorted(p.len for p in pairs),
                      cap_share=float(np.mean([p.cap for p in pairs])),
                      base_cap_share=float(np.mean([p.base_cap for p in pairs])),
                      bins=int(min(MAX_BINS, max(1, len(pairs) // min_per_bin))))


@dataclass
class InflationModel:
    """Fitted state: one ConfigDist per label, plus how it was fitted and scored."""
    configs: dict[str, ConfigDist]
    baseline: str = "fp16"
    seed: int = 0
    info: dict = field(default_factory=dict)      # split, sizes, data provenance
    heldout: dict = field(default_factory=dict)   # per label held-out metrics

    def labels(self) -> list[str]:
        return sorted(self.configs)

    def _dist(self, label: str) -> ConfigDist:
        try:
            return self.configs[label]
        except KeyError:
            raise KeyError(f"no inflation data for {label!r}; known: {', '.join(self.labels())}") from None

    def ratios(self, method_label: str, base_tokens) -> np.ndarray:
        """Length ratio of `method_label` over FP16 for requests whose FP16 replies are
        `base_tokens` long (the quantile map; deterministic)."""
        return self._dist(method_label).ratio(np.atleast_1d(base_tokens))

    def expected_ratio(self, method: str, base_tokens: float) -> float:
        """Ratio for one request; `method` is a config label ("kivi-2") or any rkvsim method
        name ("h2o-512", "fp16"), mapped as `for_method` does (fp16: 1.0)."""
        if method in self.configs:
            label = method
        else:
            from rkvsim.models import parse_method
            label = self.for_method(parse_method(method))
        return 1.0 if label is None else float(self.ratios(label, [base_tokens])[0])

    def resolve(self, method_kind: str, compression: float | None = None) -> str | None:
        """The config label standing in for a method of `method_kind` whose setting number
        is `compression` (bits for quantizers, cached-token budget for eviction).

        Quantizers: same bits, else the nearest bits (ties -> fewer bits, the harsher).
        Eviction: the LARGER-budget (milder) config of that kind, whatever `compression`
        says. This is a scaling assumption: the dataset's budgets (64/128 tokens) were
        scaled down to SmolLM2's short ShareGPT prompts and 512-token responses, so the
        paper's 512-token budgets have no literal counterpart; the milder scaled budget is
        taken as the paper setting's analogue. fp16 -> None (ratio 1)."""
        kind = method_kind.lower()
        if spec_of(kind).family == BASELINE:
            return None
        cands = [(lb, d) for lb, d in self.configs.items() if d.kind == kind]
        if not cands:
            raise ValueError(f"no inflation data for method kind {kind!r}; labels: {', '.join(self.labels())}")

        def number(lb: str) -> int:
            tail = lb.rpartition("-")[2]
            return int(tail) if tail.isdigit() else 0

        if spec_of(kind).family == QUANTIZING:
            want = float(compression) if compression is not None else 4.0
            return min(cands, key=lambda c: (abs(number(c[0]) - want), number(c[0])))[0]
        return max(cands, key=lambda c: number(c[0]))[0]

    def for_method(self, method) -> str | None:
        """Label for an rkvsim.models.Method (see resolve for the mapping)."""
        if method.family == BASELINE or not self.has_kind(method.kind):
            return None   # no generations of this kind: its answers keep FP16's lengths (see run notes)
        # The number of its label: bits for quantizers, the cached-token budget otherwise.
        return self.resolve(method.kind, method.spec.number(method) if method.spec.number else None)

    def has_kind(self, kind: str) -> bool:
        return any(d.kind == kind for d in self.configs.values())

    # -- persistence
    def to_json(self) -> dict:
        return {"schema": SCHEMA, "baseline": self.baseline, "seed": self.seed, "info": self.info,
                "heldout": self.heldout,
                "configs": {lb: {"kind": d.kind, "base_len": d.base_len, "len": d.len, "bins": d.bins,
                                 "cap_share": d.cap_share, "base_cap_share": d.base_cap_share}
                            for lb, d in sorted(self.configs.items())}}

    @classmethod
    def from_json(cls, obj: dict) -> "InflationModel":
        if obj.get("schema") != SCHEMA:
            raise ValueError(f"inflation model has schema {obj.get('schema')!r}, expected {SCHEMA!r}")
        configs = {lb: ConfigDist(kind=c["kind"], base_len=[int(x) for x in c["base_len"]],
                                  len=[int(x) for x in c["len"]], bins=int(c["bins"]),
                                  cap_share=float(c["cap_share"]), base_cap_share=float(c["base_cap_share"]))
                   for lb, c in obj["configs"].items()}
        return cls(configs, obj["baseline"], int(obj["seed"]), obj.get("info", {}), obj.get("heldout", {}))


def for_method(method, model: InflationModel) -> str | None:
    """Module-level spelling of InflationModel.for_method."""
    return model.for_method(method)


def save_model(model: InflationModel, path) -> Path:
    path = Path(path)
    write_json(path, model.to_json())
    return path


def load_model(path) -> InflationModel:
    return InflationModel.from_json(read_json(path, "inflation model (rkvsim lengths fit --out)"))


# ---------------------------------------------------------------- fit + held-out score

def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance (max gap between the empirical CDFs)."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, x, side="right") / len(a)
                               - np.searchsorted(b, x, side="right") / len(b))))


def score_heldout(model: InflationModel, pairs: list[Pair]) -> dict:
    """Per label, on held-out pairs: the mapped baseline lengths (capped at the rows'
    max_new_tokens) against the observed compressed ones: KS distance of the two length
    samples, total-token ratio observed vs predicted (what throughput sees), and the
    per-prompt log error (mostly sampling noise: compare it with fp16-reseed's)."""
    out = {}
    for lb in model.labels():
        test = [p for p in pairs if p.label == lb]
        if not test:
            continue
        base = np.array([max(p.base_len, 1) for p in test], dtype=float)
        obs = np.array([max(p.len, 1) for p in test], dtype=float)
        # The held-out replies were generated under a cap, so the mapped lengths are capped too.
        limit = np.array([p.limit or np.inf for p in test], dtype=float)
        pred = np.minimum(base * model.ratios(lb, base), limit)
        err = np.log(obs) - np.log(pred)
        d = model.configs[lb]
        out[lb] = {"n": len(test), "n_train": d.n, "bins_train": d.bins, "mean_log_err": float(np.mean(err)),
                   "mae_log": float(np.mean(np.abs(err))), "ks": _ks(np.log(obs), np.log(pred)),
                   "token_ratio_obs": float(obs.sum() / base.sum()),
                   "token_ratio_pred": float(pred.sum() / base.sum()),
                   "cap_share": float(np.mean([p.cap for p in test]))}
    return out


def fit_inflation(rows, baseline: str = "fp16", seed: int = 0, test_fraction: float = TEST_FRACTION,
                  min_per_bin: int = MIN_PER_BIN) -> InflationModel:
    """Score the procedure on a seeded prompt split, then fit it on all prompts."""
    pairs = pairs_from_rows(rows, baseline)
    if not pairs:
        raise ValueError(f"no prompt has both a {baseline!r} row and another config's row")
    train_ids, test_ids = split_prompts({p.prompt_id for p in pairs}, seed, test_fraction)
    test_set = set(test_ids)

    def fit(use) -> InflationModel:
        by_label: dict[str, list[Pair]] = {}
        for p in use:
            by_label.setdefault(p.label, []).append(p)
        return InflationModel({lb: _fit_config(ps, min_per_bin) for lb, ps in by_label.items()},
                              baseline=baseline, seed=seed)

    split_model = fit([p for p in pairs if p.prompt_id not in test_set])
    model = fit(pairs)
    model.info = {"n_prompts": len(train_ids) + len(test_ids), "n_train_prompts": len(train_ids),
                  "n_test_prompts": len(test_ids), "test_fraction": test_fraction,
                  "fitted_on": "all prompts; heldout = the same procedure fitted on the training split",
                  "model": "quantile map of FP16 reply lengths onto the config's", "min_per_bin": min_per_bin,
                  "split": "sha256(seed|prompt_id) < test_fraction",
                  "censoring": "replies that hit max_new_tokens are kept as the top (tied) quantiles; "
                               "where both distributions are at the cap the ratio is 1, as nothing "
                               "beyond the cap was observed"}
    model.heldout = score_heldout(split_model, [p for p in pairs if p.prompt_id in test_set])
    return model


def shipped_inflation(seed: int = 0) -> InflationModel:
    """The inflation model fitted on the shipped generations, e.g. for
    `lengths.predictor.load(inflation=shipped_inflation())`."""
    return fit_inflation(load_dataset(SHIPPED_DATA), seed=seed)


def finite_or_none(x):
    """JSON has no NaN: map it to null."""
    return None if isinstance(x, float) and math.isnan(x) else x
