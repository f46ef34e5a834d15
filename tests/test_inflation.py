"""Length-inflation model and `rkvsim lengths report|fit` (rkvsim.calibration.lengths.inflation*)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rkvsim.calibration.generation import store as gen_store
from rkvsim.calibration.lengths.inflation import (InflationModel, d_shares, fit_inflation, for_method,
                                          load_dataset, load_model, pairs_from_rows, quantile_bins,
                                          save_model, split_prompts)
from rkvsim.calibration.lengths.inflation_report import build_report, token_ratio_interval, verdict
from rkvsim.models import default_method, parse_method
from rkvsim.models.files import write_json
from rkvsim.cli.main import rkvsim as main

REAL = Path(__file__).resolve().parents[1] / "calibration" / "data" / "lengths"
LABELS = {"fp16": "fp16", "fp16-reseed": "fp16", "kivi-4": "kivi", "kivi-2": "kivi", "gear-4": "gear",
          "gear-2": "gear", "streamingllm-128": "streamingllm", "streamingllm-64": "streamingllm",
          "h2o-128": "h2o", "h2o-64": "h2o", "snapkv-64": "snapkv", "snapkv-32": "snapkv"}


def row(pid, config, resp, prompt=50, cap=512):
    return {"prompt_id": pid, "config": config, "method": LABELS.get(config, "fp16"), "settings": {},
            "temperature": 1.0, "prompt_tokens": prompt, "response_tokens": resp,
            "hit_cap": resp >= cap, "finish_reason": "length" if resp >= cap else "stop"}


def synthetic(n=80, seed=1):
    """Every compressed config doubles the baseline length (times small noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pid, pt = f"p{i}", 10 + (i * 389) // max(n - 1, 1)   # distinct prompt lengths 10..399
        base = int(rng.integers(20, 200))
        rows.append(row(pid, "fp16", base, pt, cap=10_000))
        for lb in LABELS:
            if lb != "fp16":
                rows.append(row(pid, lb, int(round(2 * base * rng.uniform(0.9, 1.1))), pt, cap=10_000))
    return rows


def test_d_shares_on_hand_made_rows():
    rows = [row("a", "fp16", 100), row("a", "kivi-4", 40),      # D = 0.6  -> >= 50%
            row("b", "fp16", 100), row("b", "kivi-4", 150),     # D = -0.5 -> <= -50% (edge counts)
            row("c", "fp16", 100), row("c", "kivi-4", 100),     # D = 0
            row("d", "fp16", 100), row("d", "kivi-4", 50),      # D = 0.5  -> >= 50% (edge counts)
            row("e", "kivi-4", 999)]                            # no baseline: ignored
    pairs = pairs_from_rows(rows)
    assert {p.prompt_id for p in pairs} == {"a", "b", "c", "d"}
    s = d_shares(pairs)
    assert s["n"] == 4 and s["d_ge_50"] == pytest.approx(0.5) and s["d_le_m50"] == pytest.approx(0.25)
    assert np.isnan(d_shares([])["d_ge_50"])


def test_cap_flags_and_zero_length_floor():
    pairs = pairs_from_rows([row("a", "fp16", 0), row("a", "h2o-64", 512)])
    (p,) = pairs
    assert p.cap and not p.base_cap and p.ratio == 512.0   # floor 1 token, no inf


def test_split_by_prompt_is_disjoint_stable_and_nonempty():
    ids = [f"p{i}" for i in range(40)]
    train, test = split_prompts(ids, seed=3)
    assert set(train) | set(test) == set(ids) and not set(train) & set(test)
    assert split_prompts(list(reversed(ids)), seed=3) == (train, test)
    # growing the dataset never moves an existing prompt across the split
    train2, test2 = split_prompts(ids + [f"q{i}" for i in range(40)], seed=3)
    assert set(test) <= set(test2) and set(train) <= set(train2)
    assert split_prompts(ids, seed=4) != (train, test)
    tr, te = split_prompts(["x", "y"], seed=0)
    assert len(tr) == 1 and len(te) == 1


def test_fit_scores_on_held_out_prompts_and_refits_on_all():
    rows = synthetic()
    m = fit_inflation(rows, seed=0)
    train, test = split_prompts({r["prompt_id"] for r in rows}, seed=0)
    assert m.info["n_test_prompts"] == len(test) > 0
    assert m.configs["kivi-4"].n == len(train) + len(test)      # the simulator's map: every prompt
    assert all(h["n"] == len(test) and h["n_train"] == len(train) for h in m.heldout.values())


def test_quantile_bins_by_hand():
    # 4 prompts, 2 bins: FP16 {10, 20 | 30, 40}, config {15, 25 | 90, 110}.
    centre, ratio = quantile_bins([10, 20, 30, 40], [15, 25, 90, 110], 2)
    assert centre == [15, 35] and ratio == pytest.approx([40 / 30, 200 / 70])
    # Capped replies filling two bins merge into one.
    centre, ratio = quantile_bins([10, 512, 512, 512], [20, 512, 512, 300], 4)
    assert centre == [10, 512] and ratio == pytest.approx([2.0, 1324 / 1536])


def test_map_follows_the_shape_and_interpolates_in_log_length():
    # Short replies doubled, long ones 200 tokens longer (monotone, so the sorted config
    # lengths are the mapped sorted FP16 ones): with 80 prompts the map has 4 bins.
    base = np.arange(20, 420, 5)
    new = np.where(base < 200, 2 * base, base + 200)
    rows = []
    for i, (b, x) in enumerate(zip(base, new)):
        rows += [row(f"p{i}", "fp16", int(b), cap=10_000), row(f"p{i}", "kivi-4", int(x), cap=10_000)]
    m = fit_inflation(rows, seed=0, min_per_bin=20)
    d = m.configs["kivi-4"]
    assert d.bins == 4 and base[19] < 200                       # the first bin is all doubled
    r = m.ratios("kivi-4", [1, 30, 5000])
    assert r[0] == r[1] == pytest.approx(2.0)                   # clamped below the first bin
    top = new[60:].sum() / base[60:].sum()
    assert r[2] == pytest.approx(top) and top < 1.7             # and above the last
    mid = m.ratios("kivi-4", np.exp((d._x[2] + d._x[3]) / 2))[0]
    assert mid == pytest.approx((d._r[2] + d._r[3]) / 2)        # linear in log length between bins
    assert m.expected_ratio("kivi-4", 30) == pytest.approx(float(r[1]))


def test_resampling_noise_is_not_inflation():
    # The "config" is FP16 answered again: same length distribution, pairs shuffled. Per-prompt
    # ratios spread widely, yet the map must say ~1 at every length.
    rng = np.random.default_rng(3)
    base = rng.lognormal(5, 1, size=200).astype(int) + 1
    again = rng.permutation(base)
    rows = [row(f"p{i}", "fp16", int(b), cap=10_000) for i, b in enumerate(base)]
    rows += [row(f"p{i}", "fp16-reseed", int(b), cap=10_000) for i, b in enumerate(again)]
    m = fit_inflation(rows, seed=0)
    ratios = np.array([p.ratio for p in pairs_from_rows(rows)])
    assert np.mean((ratios >= 1.5) | (ratios <= 0.5)) > 0.4
    assert np.allclose(m.ratios("fp16-reseed", [5, 50, 150, 500, 3000]), 1.0)


def test_held_out_mapped_lengths_respect_the_rows_cap():
    from rkvsim.calibration.lengths.inflation import score_heldout
    rows = []
    for i in range(40):      # kivi-4 doubles every reply, but replies stop at 512 tokens
        b = 100 + 10 * i
        rows += [row(f"p{i}", "fp16", min(b, 512)) | {"max_new_tokens": 512},
                 row(f"p{i}", "kivi-4", min(2 * b, 512)) | {"max_new_tokens": 512}]
    pairs = pairs_from_rows(rows)
    assert {p.limit for p in pairs} == {512}
    m = fit_inflation(rows, seed=0)
    h = score_heldout(m, pairs)["kivi-4"]
    mapped = np.minimum([p.base_len * m.expected_ratio("kivi-4", p.base_len) for p in pairs], 512)
    assert h["token_ratio_pred"] == pytest.approx(mapped.sum() / sum(p.base_len for p in pairs))
    assert h["token_ratio_obs"] == pytest.approx(sum(p.len for p in pairs) / sum(p.base_len for p in pairs))


def test_small_config_gets_the_total_token_ratio():
    rows = synthetic(n=20)
    m = fit_inflation(rows, seed=0)
    assert all(d.bins == 1 for d in m.configs.values())
    pairs = [p for p in pairs_from_rows(rows) if p.label == "gear-4"]
    total = sum(p.len for p in pairs) / sum(p.base_len for p in pairs)
    assert np.allclose(m.ratios("gear-4", [1, 100, 10_000]), total)


def test_ratios_are_deterministic_and_unknown_labels_refused():
    m = fit_inflation(synthetic(), seed=0)
    base = np.array([20, 100, 300, 50, 380])
    a = m.ratios("kivi-2", base)
    assert a.shape == (5,) and np.array_equal(a, m.ratios("kivi-2", base))
    assert np.all((a > 1.8) & (a < 2.2))
    assert fit_inflation(synthetic(), seed=0).to_json() == m.to_json()
    h = m.heldout["h2o-64"]
    assert h["token_ratio_pred"] == pytest.approx(2.0, abs=0.05) and abs(h["mean_log_err"]) < 0.05
    with pytest.raises(KeyError):
        m.ratios("kivi-3", base)


def test_expected_ratio_takes_labels_and_method_names():
    m = fit_inflation(synthetic(), seed=0)
    assert m.expected_ratio("fp16", 100) == 1.0
    assert m.expected_ratio("h2o-512", 100) == m.expected_ratio("h2o-128", 100) == \
        pytest.approx(2.0, abs=0.1)
    assert m.expected_ratio("kivi-2", 100) == float(m.ratios("kivi-2", [100])[0])


def test_for_method_mapping():
    m = fit_inflation(synthetic(n=12), seed=0)
    assert for_method(default_method("fp16"), m) is None
    assert m.for_method(parse_method("kivi-4")) == "kivi-4"
    assert m.for_method(parse_method("kivi-2")) == "kivi-2"
    assert m.for_method(parse_method("gear-8")) == "gear-4"           # nearest bits
    # eviction at the paper's budgets -> the larger (milder) scaled config
    assert m.for_method(parse_method("streamingllm-512")) == "streamingllm-128"
    assert m.for_method(parse_method("h2o-512")) == "h2o-128"
    assert m.for_method(parse_method("snapkv-1024")) == "snapkv-64"
    assert m.for_method(parse_method("h2o-32")) == "h2o-128"          # default ignores the budget
    assert m.resolve("fp16", 0) is None
    only_kivi = fit_inflation([r for r in synthetic(n=12) if r["config"] in ("fp16", "kivi-2")])
    with pytest.raises(ValueError):
        only_kivi.resolve("gear", 4)


def test_json_round_trip(tmp_path):
    m = fit_inflation(synthetic(), seed=2)
    path = save_model(m, tmp_path / "sub" / "inflation.json")
    back = load_model(path)
    assert back.to_json() == m.to_json() and back.labels() == m.labels()
    base = np.array([30, 250])
    assert np.array_equal(back.ratios("gear-4", base), m.ratios("gear-4", base))
    assert not list(path.parent.glob("*.tmp"))           # atomic write left nothing behind
    bad = json.loads(path.read_text()) | {"schema": "other"}
    with pytest.raises(ValueError):
        InflationModel.from_json(bad)


def _write_dataset(folder: Path, rows, n_target: int):
    with gen_store.RowWriter(gen_store.part_path(folder)) as w:
        for r in rows:
            w.append(r)
    with open(gen_store.part_path(folder), "ab") as f:
        f.write(b'{"prompt_id": "torn", "conf')                   # a writer's torn tail
    configs = {lb: {"label": lb, "method": k} for lb, k in LABELS.items()}
    write_json(folder / "meta.json", {"n": n_target, "configs": configs,
                                                      "model": {"name": "tiny"},
                                                      "settings": {"max_new_tokens": 512}})


def test_report_on_tmp_dataset(tmp_path, capsys):
    rows = [row("a", "fp16", 100)] + [row("a", lb, 200) for lb in LABELS if lb != "fp16"]
    rows += [row("b", "fp16", 100)] + [row("b", lb, 512) for lb in LABELS if lb != "fp16"]
    _write_dataset(tmp_path, rows, n_target=5)
    assert len(load_dataset(tmp_path)) == len(rows)
    assert main(["lengths", "report", "--data", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["incomplete"] and rep["n_complete_prompts"] == 2 and rep["n_target"] == 5
    kivi = next(c for c in rep["configs"] if c["config"] == "kivi-4")
    assert kivi["d_le_m50"] == 1.0 and kivi["cap_share"] == 0.5 and kivi["paper_row"] == "KIVI"
    assert kivi["paper_d_le_m50"] == pytest.approx(0.449)
    page = tmp_path / "out" / "lengths.html"
    assert main(["lengths", "report", "--data", str(tmp_path), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "still being collected" in out and "noise floor" in out and "StreamingLLM" in out
    text = page.read_text()
    assert "<table>" in text and "kivi-4" in text and "plotly" in text and "Total reply tokens" in text
    assert not list(page.parent.glob("*.tmp"))
    assert main(["lengths", "report", "--data", str(tmp_path / "nope")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["lengths", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "m.json")]) == 0
    assert load_model(tmp_path / "m.json").info["n_prompts"] == 2


def test_token_ratio_interval_and_verdict():
    def pairs(base, new):
        return pairs_from_rows([row(f"p{i}", "fp16", b, cap=10_000) for i, b in enumerate(base)]
                               + [row(f"p{i}", "kivi-4", x, cap=10_000) for i, x in enumerate(new)])

    rng = np.random.default_rng(0)
    base = rng.integers(50, 300, size=40)
    doubled = pairs(base, 2 * base + rng.integers(-5, 5, size=40))
    lo, hi = token_ratio_interval(doubled, "kivi-4")
    assert 1.9 < lo < 2.0 < hi < 2.1 and verdict(lo, hi) == "longer"
    assert token_ratio_interval(doubled, "kivi-4") == (lo, hi)          # seeded: reproducible
    same = pairs(base, rng.permutation(base))                          # same lengths, shuffled
    lo, hi = token_ratio_interval(same, "kivi-4")
    assert lo < 1 < hi and verdict(lo, hi) == "n.s."
    assert verdict(*token_ratio_interval(pairs(base, base // 3), "kivi-4")) == "shorter"
    assert verdict(*token_ratio_interval(doubled[:1], "kivi-4")) == "–"


def test_report_counts_runs_to_the_cap_where_the_baseline_ended():
    # a: baseline ends at 100, kivi-4 runs to the cap; b: baseline ends, kivi-4 too; c: baseline capped.
    rows = [row("a", "fp16", 100), row("a", "kivi-4", 512), row("b", "fp16", 100), row("b", "kivi-4", 90),
            row("c", "fp16", 512), row("c", "kivi-4", 512)]
    rep = build_report(rows + [row("a", "fp16-reseed", 50), row("b", "fp16-reseed", 300)], None)
    kivi = next(c for c in rep["configs"] if c["config"] == "kivi-4")
    # fp16 100 predicts 50 (acc 0%: |100-50|/50 = 1) and 300 (acc 1 - 200/300 = 33.3%)
    assert rep["resample_accuracy"] == {"n": 2, "accuracy_clipped": pytest.approx(100 / 6)}
    assert kivi["base_stopped"] == 2 and kivi["cap_share_when_base_stopped"] == 0.5
    assert kivi["cap_share"] == pytest.approx(2 / 3)


def test_real_dataset_smoke():
    if not REAL.is_dir():
        pytest.skip("no calibration/data/lengths")
    rows = load_dataset(REAL)
    counts = Counter(r["prompt_id"] for r in rows)
    if sum(c >= 14 for c in counts.values()) < 2:
        pytest.skip("fewer than 2 complete prompts collected so far")
    complete = {p for p, c in counts.items() if c >= 14}
    rows = [r for r in rows if r["prompt_id"] in complete]
    m = fit_inflation(rows, seed=0)
    assert {"kivi-4", "h2o-128", "streamingllm-128", "snapkv-64"} <= set(m.labels())
    r = m.ratios(m.for_method(parse_method("h2o-512")), np.array([30, 300]))
    assert np.all(np.isfinite(r) & (r > 0))
    rep = build_report(rows, None)
    assert all(c["n"] == len(complete) for c in rep["configs"])
