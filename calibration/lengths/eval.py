"""Naive baselines and the held-out evaluation of a length predictor.

A score means little alone: ShareGPT reply lengths are noisy, and a constant can
already reach a fair paper accuracy. So every evaluation scores, on the same
held-out rows, the fitted predictor and three baselines fitted on the training rows:

* `median`       - the training median reply length, for every prompt;
* `best-const`   - the constant with the best clipped paper accuracy on the
                   training rows (searched over the training quantiles);
* `prompt-bucket`- the training median reply length within each decile of prompt
                   tokens (does prompt size alone say anything?).

(The constant minimising the *unclipped* error would be the 1/L-weighted median, a
handful of tokens on ShareGPT: it wins the unclipped mean and loses everything
else, which is one reason the clipped mean is the headline.)
"""
from __future__ import annotations

import numpy as np

from rkvsim.calibration.lengths.sharegpt import count_tokens

from rkvsim.calibration.lengths.metrics import bucket_edges, per_sample_accuracy, summarize


def best_constant(lengths, n_candidates: int = 199) -> float:
    """The constant prediction with the best mean clipped paper accuracy on `lengths`."""
    y = np.asarray(lengths, dtype=float)
    cands = np.unique(np.quantile(y, np.linspace(0.005, 0.995, n_candidates)))
    scores = [per_sample_accuracy(np.full(len(y), c), y).mean() for c in cands]
    return float(cands[int(np.argmax(scores))])


class PromptBucketBaseline:
    """Per decile of prompt tokens, the median reply length of its training rows."""

    def __init__(self, n_buckets: int = 10):
        self.n_buckets = n_buckets

    def fit(self, prompt_tokens, lengths):
        x = np.asarray(prompt_tokens, dtype=float)
        y = np.asarray(lengths, dtype=float)
        self.edges_ = np.unique(np.quantile(x, np.linspace(0, 1, self.n_buckets + 1)[1:-1]))
        b = np.digitize(x, self.edges_)
        fallback = float(np.median(y))
        self.values_ = np.array([float(np.median(y[b == k])) if np.any(b == k) else fallback
                                 for k in range(len(self.edges_) + 1)])
        return self

    def predict(self, prompt_tokens) -> np.ndarray:
        return self.values_[np.digitize(np.asarray(prompt_tokens, dtype=float), self.edges_)]


def evaluate(predictor, train_texts, train_lengths, test_texts, test_lengths) -> dict:
    """{name: summary} for the predictor ("model" and "model (tokens only)") and the
    baselines, all on the test rows. True buckets are the training terciles; the predictor's
    buckets are its own (predict_bucket), the baselines' are their predictions cut there."""
    y_tr = np.asarray(train_lengths, dtype=float)
    y_te = np.asarray(test_lengths, dtype=float)
    edges = bucket_edges(y_tr)
    tok_tr = [count_tokens(t) for t in train_texts]
    tok_te = [count_tokens(t) for t in test_texts]
    preds = {
        "model": predictor.predict(test_texts),
        "model (tokens only)": predictor.predict(tok_te),
        "baseline: median": np.full(len(y_te), float(np.median(y_tr))),
        "baseline: best-const": np.full(len(y_te), best_constant(y_tr)),
        "baseline: prompt-bucket": PromptBucketBaseline().fit(tok_tr, y_tr).predict(tok_te),
    }
    buckets = {"model": predictor.predict_bucket(test_texts), "model (tokens only)": predictor.predict_bucket(tok_te)}
    return {"bucket_edges": edges.tolist(),
            "results": {k: summarize(p, y_te, edges, buckets.get(k)) for k, p in preds.items()}}
