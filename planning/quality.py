"""A method's negative-sample rate (the paper's Algorithm 1, calibration/quality/negatives.py) from per-sample
LongBench scores, where the scores hold a run at the method's setting.

The shipped scores (../shared/data/rethink-kv/longbench_scores) are the paper's runs of
Llama-3-8B-Instruct: file prefixes such as `kivi_<model>_8192_b1_4bits_group32_residual128`,
`gear_..._4bits`, `h2o_..._c512_w64_k7_maxpool`, `streamingllm_..._c512_w64_k7_maxpool`, and the
uncompressed baseline `hf_...`. A method matches a prefix of its kind with the same setting
(bits, group size and residual for KIVI; bits for GEAR; total cached tokens for eviction,
preferring the w64 variant); anything else has no quality data, and says so.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from rkvsim.models import BASELINE, Method

DEFAULT_THRESHOLD = 0.1


def default_scores_dir() -> Path | None:
    """../shared/data/rethink-kv/longbench_scores beside the checkout, or from the cwd."""
    here = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rethink-kv" / "longbench_scores"
    cwd = Path.cwd().parent / "shared" / "data" / "rethink-kv" / "longbench_scores"
    return next((p for p in (here, cwd) if p.is_dir()), None)


def match_prefix(method: Method, prefixes: list[str]) -> str | None:
    if method.spec.paper_scores is None:
        return None
    pat = method.spec.paper_scores(method)
    hits = sorted(p for p in prefixes if re.search(pat, p))
    if not hits:
        return None
    return next((p for p in hits if "_w64_" in p), hits[0])


def baseline_prefix(prefixes: list[str]) -> str | None:
    return next((p for p in sorted(prefixes) if p.startswith("hf_")), None)


def negative_rate(method: Method, scores_dir: Path | None, threshold: float = DEFAULT_THRESHOLD) -> dict | None:
    """{"rate", "negatives", "benign", "prefix", "threshold"} or None when there is no data."""
    if scores_dir is None or method.family == BASELINE:
        return None
    from rkvsim.calibration.quality.negatives import available_prefixes, count_negatives, load_scores
    prefixes = available_prefixes(scores_dir)
    pre, base = match_prefix(method, prefixes), baseline_prefix(prefixes)
    if pre is None or base is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tasks missing for one method are skipped and counted below
        res = count_negatives(load_scores(scores_dir, base), {method.label: load_scores(scores_dir, pre)},
                              threshold=threshold)
    # The benign samples of the tasks this method was scored on (a skipped task counts for neither).
    skipped = set(res.skipped.get(method.label, []))
    benign = sum(n for t, n in res.benign_by_task.items() if t not in skipped)
    n = res.counts[method.label]
    return {"rate": n / benign if benign else None, "negatives": n, "benign": benign, "prefix": pre,
            "threshold": threshold}
