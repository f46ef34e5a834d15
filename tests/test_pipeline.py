"""One run pipeline: `rkvsim run`, a sweep task and a direct `run_scenario` call give the same
numbers for the same scenario and seed, because they are the same code."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from rkvsim.cli.main import rkvsim
from rkvsim.planning.tasks import flatten_metrics, run_task
from rkvsim.simulator.config import load_scenario
from rkvsim.simulator.kv_memory import DoesNotFitError
from rkvsim.simulator.pipeline import run_scenario

ROOT = Path(__file__).resolve().parents[1]
SET = {"workload.num_requests": 60, "methods": ["fp16", "kivi-4", "fp8"]}


def test_run_sweep_task_and_pipeline_agree(tmp_path):
    path = ROOT / "scenarios" / "light_kv.yaml"
    args = [a for k, v in SET.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]
    assert rkvsim(["run", str(path), "--out", str(tmp_path / "o"), *args]) == 0
    from_cli = json.loads((tmp_path / "o" / "summary.json").read_text())

    scn = load_scenario(path, SET)
    direct = run_scenario(scn, None, path.parent).summary()
    assert json.dumps(direct, sort_keys=True) == json.dumps(from_cli, sort_keys=True)

    base = yaml.safe_load(path.read_text())
    rows = run_task(base, str(path.parent), SET, scn.seed, 0, "k")
    assert [r["method"] for r in rows] == ["fp16", "kivi-4", "fp8"]
    for r in rows:
        want = flatten_metrics(from_cli["methods"][r["method"]])
        for k, v in want.items():
            assert (math.isnan(v) and math.isnan(r[k])) or r[k] == v, (r["method"], k)


def test_a_setup_that_does_not_fit_raises_or_is_recorded():
    scn = load_scenario(ROOT / "scenarios" / "light_kv.yaml",
                        {"model": "llama-2-70b", "hardware": "l4", "workload.num_requests": 5, "methods": ["fp16"]})
    with pytest.raises(DoesNotFitError):
        run_scenario(scn)
    res = run_scenario(scn, keep_going=True)
    assert res.runs == [] and "fp16" in res.does_not_fit


def test_progress_sees_every_setup_in_order():
    scn = load_scenario(ROOT / "scenarios" / "light_kv.yaml", {**SET, "workload.num_requests": 10})
    seen = []
    run_scenario(scn, on_variant=lambda v, i, n: seen.append((v.label, i, n)))
    assert seen == [("fp16", 0, 3), ("kivi-4", 1, 3), ("fp8", 2, 3)]
