"""rkvsim.simulator.report: one self-contained HTML file from small synthetic frames."""
import numpy as np
import pandas as pd
import pytest

from rkvsim.simulator.report import render_report, verdict_lines, write_report

LABELS = ["fp16", "kivi-4", "h2o-512"]


def _lat(scale):
    return {"mean": scale, "p50": 0.9 * scale, "p90": 1.5 * scale, "p99": 2.0 * scale}


def _summary(labels=LABELS, cost="roofline-prior (uncalibrated)"):
    methods = {}
    for i, label in enumerate(labels):
        methods[label] = {
            "requests_completed": 50 - i, "requests_rejected": i, "output_tokens_per_s": 1000.0 * (1 + i),
            "requests_per_s": 2.0 + i, "prefill_tokens_per_s": 5e4, "ttft_s": _lat(0.2), "tpot_s": _lat(0.02 / (1 + i)),
            "e2e_s": _lat(5.0 / (1 + i)), "itl_s": _lat(0.02), "queue_s": _lat(0.1), "preemptions": 3 * i,
            "kv_peak_fraction": 0.97 - 0.1 * i, "mean_batch_size": 12.5,
        }
    return {"scenario": "demo-scenario", "seed": 7, "cost_source": cost, "methods": methods}


def _frames(labels=LABELS, n=50, steps=300, replicas=1):
    rng = np.random.default_rng(0)
    req, ts = [], []
    for label in labels:
        for i in range(n):
            rej = i % 17 == 0
            req.append({"method": label, "request_id": i, "arrival_s": i * 0.1, "prompt_tokens": 512,
                        "output_tokens": 64, "ttft_s": np.nan if rej else rng.gamma(2, 0.1),
                        "tpot_s": np.nan if rej else rng.gamma(2, 0.01), "e2e_s": np.nan if rej else rng.gamma(2, 2),
                        "queue_s": 0.0, "preemptions": 0, "rejected": rej, "replica": i % replicas})
        for r in range(replicas):
            t = np.sort(rng.uniform(0, 60, steps))
            ts += [{"method": label, "time_s": x, "kv_fraction": rng.uniform(), "batch_size": int(rng.integers(1, 32)),
                    "replica": r} for x in t]
    return pd.DataFrame(req), pd.DataFrame(ts)


def test_writes_self_contained_report(tmp_path):
    req, ts = _frames()
    out = tmp_path / "sub" / "report.html"
    write_report(out, _summary(), req, ts)
    text = out.read_text(encoding="utf-8")
    assert out.is_file() and text.startswith("<!DOCTYPE html>")
    for label in LABELS:
        assert label in text
    assert "costs: roofline-prior (uncalibrated)" in text
    assert "demo-scenario" in text
    assert 'src="https://cdn.plot.ly' not in text and "Plotly" in text  # plotly.js inline: works offline
    assert not list(out.parent.glob("*.tmp"))  # the temporary file was renamed away


def test_verdict_numbers_relative_to_fp16():
    lines = verdict_lines(_summary()["methods"])
    kivi = next(l for l in lines if l.startswith("kivi-4:"))
    assert "2.00x the output throughput of fp16" in kivi
    assert "p90 E2E 0.50x" in kivi and "TTFT p90 1.00x" in kivi
    assert "1 rejected" in kivi and "KV peaked at 87% of capacity" in kivi
    fp16 = next(l for l in lines if l.startswith("fp16:"))
    assert "output tokens/s" in fp16  # the baseline states absolute numbers


def test_verdict_without_fp16_and_with_missing_values():
    s = _summary(labels=["kivi-2"])
    s["methods"]["kivi-2"]["e2e_s"] = {"mean": None, "p50": None, "p90": None, "p99": None}
    s["methods"]["kivi-2"]["kv_peak_fraction"] = None
    (line,) = verdict_lines(s["methods"])
    assert "p90 E2E n/a" in line and "KV peak n/a" in line


def test_profile_cost_source_and_no_completed_requests():
    req, ts = _frames(labels=["fp16"], n=3)
    req["rejected"] = True
    html = render_report(_summary(labels=["fp16"], cost="profile:a6000@2025-03-01"), req, ts)
    assert "costs: profile:a6000@2025-03-01" in html


@pytest.mark.parametrize("replicas", [1, 2])
def test_size_stays_small(tmp_path, replicas):
    labels = [f"m{i}" for i in range(6)]
    req, ts = _frames(labels=labels, n=500, steps=20_000 // replicas, replicas=replicas)
    out = tmp_path / "big.html"
    write_report(out, _summary(labels=labels), req, ts)
    assert out.stat().st_size < 8 * 2 ** 20


def test_mixed_cost_sources_all_named():
    req, ts = _frames(labels=["fp16"], n=3)
    s = _summary(labels=["fp16"])
    s["cost_source"] = ["profile:a6000@2025-03-01", "roofline-prior (uncalibrated)"]
    html = render_report(s, req, ts)
    assert "costs: profile:a6000@2025-03-01, roofline-prior (uncalibrated)" in html
