"""Length-inflation model: how much longer (or shorter) a response gets under a KV-cache
compression config, as r = L_compressed / L_uncompressed per prompt.

Data: the generation rows of rkvsim.calibration.gen_collect (gen_store format). For every
prompt that has the baseline row ('fp16', T=1.0, same random stream as the compressed
configs) each other config gives one pair (L_base, L_config) and so one ratio.

Model, kept deliberately simple for a small sample: per config label, the empirical
distribution of log r (a bootstrap: sampling draws an observed ratio). When a config has
enough pairs the prompts are stratified into 2 or 3 prompt-length bins (quantile edges,
every bin >= MIN_PER_BIN pairs); otherwise one pooled bin. No parametric shape is assumed,
so the model cannot invent ratios it never saw -- and cannot extrapolate either.

Held-out evaluation: prompts (not rows) are split by a seeded hash, the model is fitted on
the training prompts only, and the held-out prompts are scored (mean log-ratio error, KS
distance between held-out log r and model draws at the same prompt lengths, mean ratio
observed vs predicted). The returned model is the training-split one, so its reported
held-out figures describe exactly the object the simulator uses.

Censoring: responses are capped at max_new_tokens. When the compressed row hit the cap its
ratio is a lower bound; when the baseline hit the cap the ratio is an upper bound. Such
pairs are kept (dropping them would bias the model towards short responses) and their
shares are recorded per config, so a report can say how much of a config's tail is
censored.

No torch / pandas here: the simulator imports this module.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .gen_store import load_rows, write_json_atomic

SCHEMA = "rkvsim-inflation-v1"
MIN_PER_BIN = 20          # fewer pairs per bin would make the bin's distribution noise
MAX_BINS = 3
TEST_FRACTION = 0.25
QUANTIZED = ("kivi", "gear")
EVICTING = ("streamingllm", "h2o", "snapkv")


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
                        bool(b.get("hit_cap", False)), bool(r.get("hit_cap", False))))
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

@dataclass
class ConfigDist:
    """Empirical log-ratio distribution of one config, per prompt-length bin."""
    kind: str
    edges: list[float]              # inner bin edges on prompt_tokens (len = bins - 1)
    log_r: list[list[float]]        # sorted log ratios per bin
    n: int
    cap_share: float                # share of pairs where this config hit the cap
    base_cap_share: float           # share where the baseline hit the cap

    def bin_of(self, prompt_tokens) -> np.ndarray:
        return np.searchsorted(np.asarray(self.edges, dtype=float),
                               np.asarray(prompt_tokens, dtype=float), side="right")


def _bins_for(pt: np.ndarray, min_per_bin: int) -> list[float]:
    """Inner edges of the most bins (<= MAX_BINS) with every bin holding min_per_bin."""
    for k in range(MAX_BINS, 1, -1):
        if len(pt) < k * min_per_bin:
            continue
        # Edge = the first value of each next k-quantile group; a value equal to an edge
        # goes up (side="right"), so without ties every bin gets floor or ceil of n/k.
        srt = np.sort(pt)
        edges = sorted(set(float(srt[i * len(pt) // k]) for i in range(1, k)))
        counts = np.bincount(np.searchsorted(edges, pt, side="right"), minlength=len(edges) + 1)
        if len(edges) == k - 1 and counts.min() >= min_per_bin:
            return edges
    return []


def _fit_config(pairs: list[Pair], min_per_bin: int) -> ConfigDist:
    pt = np.array([p.prompt_tokens for p in pairs], dtype=float)
    lr = np.log([p.ratio for p in pairs])
    edges = _bins_for(pt, min_per_bin)
    b = np.searchsorted(edges, pt, side="right")
    return ConfigDist(kind=pairs[0].kind, edges=edges,
                      log_r=[sorted(lr[b == i].tolist()) for i in range(len(edges) + 1)],
                      n=len(pairs), cap_share=float(np.mean([p.cap for p in pairs])),
                      base_cap_share=float(np.mean([p.base_cap for p in pairs])))


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

    def sample_ratio(self, method_label: str, prompt_tokens, rng: np.random.Generator) -> np.ndarray:
        """One ratio per request, drawn from the observed ratios of its prompt-length bin."""
        d = self._dist(method_label)
        pt = np.atleast_1d(np.asarray(prompt_tokens))
        bins = d.bin_of(pt)
        out = np.empty(len(pt), dtype=float)
        for i, vals in enumerate(d.log_r):
            sel = np.flatnonzero(bins == i)
            if len(sel):
                out[sel] = np.exp(np.asarray(vals)[rng.integers(0, len(vals), size=len(sel))])
        return out

    def expected_ratio(self, method_label: str, prompt_tokens: int) -> float:
        """Mean ratio (not exp of mean log) of the prompt's bin: what multiplies mean length."""
        d = self._dist(method_label)
        return float(np.mean(np.exp(d.log_r[int(d.bin_of(prompt_tokens))])))

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
        if kind == "fp16":
            return None
        cands = [(lb, d) for lb, d in self.configs.items() if d.kind == kind]
        if not cands:
            raise ValueError(f"no inflation data for method kind {kind!r}; labels: {', '.join(self.labels())}")

        def number(lb: str) -> int:
            tail = lb.rpartition("-")[2]
            return int(tail) if tail.isdigit() else 0

        if kind in QUANTIZED:
            want = float(compression) if compression is not None else 4.0
            return min(cands, key=lambda c: (abs(number(c[0]) - want), number(c[0])))[0]
        return max(cands, key=lambda c: number(c[0]))[0]

    def for_method(self, method) -> str | None:
        """Label for an rkvsim.models.Method (see resolve for the mapping)."""
        if method.kind == "fp16":
            return None
        setting = method.bits if method.kind in QUANTIZED else (method.token_cap or method.budget)
        return self.resolve(method.kind, setting)

    # -- persistence
    def to_json(self) -> dict:
        return {"schema": SCHEMA, "baseline": self.baseline, "seed": self.seed, "info": self.info,
                "heldout": self.heldout,
                "configs": {lb: {"kind": d.kind, "edges": d.edges, "log_r": d.log_r, "n": d.n,
                                 "cap_share": d.cap_share, "base_cap_share": d.base_cap_share}
                            for lb, d in sorted(self.configs.items())}}

    @classmethod
    def from_json(cls, obj: dict) -> "InflationModel":
        if obj.get("schema") != SCHEMA:
            raise ValueError(f"inflation model has schema {obj.get('schema')!r}, expected {SCHEMA!r}")
        configs = {lb: ConfigDist(kind=c["kind"], edges=[float(x) for x in c["edges"]],
                                  log_r=[[float(x) for x in b] for b in c["log_r"]], n=int(c["n"]),
                                  cap_share=float(c["cap_share"]), base_cap_share=float(c["base_cap_share"]))
                   for lb, c in obj["configs"].items()}
        return cls(configs, obj["baseline"], int(obj["seed"]), obj.get("info", {}), obj.get("heldout", {}))


def for_method(method, model: InflationModel) -> str | None:
    """Module-level spelling of InflationModel.for_method."""
    return model.for_method(method)


def save_model(model: InflationModel, path) -> Path:
    path = Path(path)
    write_json_atomic(path, model.to_json())
    return path


def load_model(path) -> InflationModel:
    with open(path, encoding="utf-8") as f:
        return InflationModel.from_json(json.load(f))


# ---------------------------------------------------------------- fit + held-out score

def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance (max gap between the empirical CDFs)."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, x, side="right") / len(a)
                               - np.searchsorted(b, x, side="right") / len(b))))


def score_heldout(model: InflationModel, pairs: list[Pair], seed: int = 0, draws: int = 200) -> dict:
    """Per label: held-out log-ratio error against the model's bin mean log r, KS distance
    between held-out log r and model draws at the same prompt lengths, mean ratios."""
    rng = np.random.default_rng(seed)
    out = {}
    for lb in model.labels():
        test = [p for p in pairs if p.label == lb]
        if not test:
            continue
        d = model.configs[lb]
        pt = np.array([p.prompt_tokens for p in test])
        obs = np.log([p.ratio for p in test])
        bin_mean = np.array([np.mean(v) for v in d.log_r])[d.bin_of(pt)]
        sim = np.log(model.sample_ratio(lb, np.repeat(pt, draws), rng))
        out[lb] = {"n": len(test), "mean_log_err": float(np.mean(obs - bin_mean)),
                   "mae_log": float(np.mean(np.abs(obs - bin_mean))), "ks": _ks(obs, sim),
                   "mean_ratio_obs": float(np.mean(np.exp(obs))),
                   "mean_ratio_pred": float(np.mean([model.expected_ratio(lb, int(x)) for x in pt])),
                   "cap_share": float(np.mean([p.cap for p in test]))}
    return out


def fit_inflation(rows, baseline: str = "fp16", seed: int = 0, test_fraction: float = TEST_FRACTION,
                  min_per_bin: int = MIN_PER_BIN) -> InflationModel:
    """Fit on the training prompts of a seeded prompt split; score on the held-out ones."""
    pairs = pairs_from_rows(rows, baseline)
    if not pairs:
        raise ValueError(f"no prompt has both a {baseline!r} row and another config's row")
    train_ids, test_ids = split_prompts({p.prompt_id for p in pairs}, seed, test_fraction)
    train_set, test_set = set(train_ids), set(test_ids)
    by_label: dict[str, list[Pair]] = {}
    for p in pairs:
        if p.prompt_id in train_set:
            by_label.setdefault(p.label, []).append(p)
    model = InflationModel({lb: _fit_config(ps, min_per_bin) for lb, ps in by_label.items()},
                           baseline=baseline, seed=seed)
    model.info = {"n_prompts": len(train_ids) + len(test_ids), "n_train_prompts": len(train_ids),
                  "n_test_prompts": len(test_ids), "test_fraction": test_fraction,
                  "min_per_bin": min_per_bin, "split": "sha256(seed|prompt_id) < test_fraction",
                  "censoring": "pairs where a response hit max_new_tokens are kept; the ratio is a "
                               "lower bound when the compressed response hit the cap, an upper bound "
                               "when the baseline did"}
    model.heldout = score_heldout(model, [p for p in pairs if p.prompt_id in test_set], seed)
    return model


def finite_or_none(x):
    """JSON has no NaN: map it to null."""
    return None if isinstance(x, float) and math.isnan(x) else x
