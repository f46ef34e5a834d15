"""bench/bench_sim.py --phases: its timers see every call of what they time and change no number."""
import importlib.util
from pathlib import Path

import numpy as np

from rkvsim.simulator.config import Scenario
from rkvsim.simulator.pipeline import run_scenario
from rkvsim.simulator.simulation import build_workload


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sim", Path(__file__).parents[1] / "bench" / "bench_sim.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run():
    scn = Scenario.model_validate({
        "name": "phases", "model": "llama-2-7b", "hardware": "a6000", "methods": ["fp16"],
        "scheduler": {"policy": "vllm-v1", "max_batch_size": 64, "max_batched_tokens": 4096},
        "workload": {"num_requests": 300, "arrival": {"process": "poisson", "rate": 3.0},
                     "lengths": {"source": "sharegpt", "max_prompt": 1024, "max_output": 1024}}})
    (run,) = run_scenario(scn, 0, workload=build_workload(scn, 0, "."), inflation=None).runs
    return run


def test_phase_timers_count_every_call_and_change_nothing(capsys):
    bench = _bench()
    plain = _run()
    acc, undo = bench.instrument()
    try:
        timed = _run()
    finally:
        undo()
    from rkvsim.simulator.replica import Replica
    assert not hasattr(Replica._plan_v1, "__wrapped__") and Replica._plan_v1.__name__ == "_plan_v1"
    for f in ("first_token", "finish", "itl_max"):
        assert np.array_equal(getattr(plain.log, f), getattr(timed.log, f), equal_nan=True)
    (rep,) = timed.replicas
    assert list(rep.steps.t_end) == list(plain.replicas[0].steps.t_end)
    steps, runs, covered = len(rep.steps), rep.runs, rep.run_steps
    assert runs > 0
    assert acc["run applying"][0] == runs                  # a lone replica applies each run once, at its end
    assert acc["run planning"][0] >= runs                  # some plans come back empty
    # every step outside a run is costed once, as decode-only or with prefill chunks
    assert acc["decode step cost"][0] + acc["mixed step cost"][0] == steps - covered
    # a plan per step outside a run, per run, and per wait for work (at most one per arrival)
    assert steps - covered + runs <= acc["scheduler plan"][0] <= steps - covered + runs + 300
    bench.report_phases(acc, 1.0, 300)
    out = capsys.readouterr().out
    assert "run applying" in out and "rest (SimPy, log)" in out
