"""Wall time of the README's `rkvsim plan` example, in three modes from the same tree:

    python bench/bench_plan.py                 # step by step, event skipping, skipping + early stop
    python bench/bench_plan.py --modes fast    # only the default mode

  step     every engine step one SimPy event (`--set step_by_step=true`), every simulation to its end
  skip     event skipping (simulator/decode_run.py), every simulation to its end (`--no-early-stop`)
  fast     the default: skipping, and the rate bisection's simulations stop once their miss is
           decided (simulator/slo_stop.py)

Each mode is one `rkvsim plan` process (its start-up, imports and cost tables included, as a
user waits for them). The cost tables come from the compiled store (~/.cache/rkvsim/compiled,
calibration/steps/compiled_store.py) as a user's second plan finds it; `--cold` gives every mode
an empty store (the rest of the cache, fits included, is shared), so each compiles its tables as a first plan does. The plans must be identical (plan.json, less the count of simulations
stopped early); the script says so, and prints each mode's time and its ratio to `step`.
Goal (issue 18): <= 10 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ["scenarios/sharegpt_poisson.yaml", "--rate", "10", "--slo", "ttft_p99<=2s,e2e_p90<=30s",
           "--max-gpus", "6", "--tp", "1,2", "--seeds", "3", "--set", "workload.num_requests=300",
           "--set", "methods=[fp16,kivi-4,h2o-512]"]
MODES = {"step": ["--set", "step_by_step=true", "--no-early-stop"], "skip": ["--no-early-stop"], "fast": []}


def run_mode(extra: list[str], out: Path, workers: int | None, cold: bool = False) -> tuple[float, dict]:
    w = ["--workers", str(workers)] if workers else []
    env = dict(os.environ)
    if cold:
        from rkvsim.models.files import cache_dir
        cache = out.parent / f"cache-{out.name}"
        cache.mkdir(parents=True)
        (cache_dir() / "fits").mkdir(parents=True, exist_ok=True)
        for p in cache_dir().iterdir():     # fits, length tables...: not what is timed
            if p.name != "compiled":
                (cache / p.name).symlink_to(p)
        env["RKVSIM_CACHE"] = str(cache)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "rkvsim.cli", "plan", *EXAMPLE, *extra, *w, "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"bench_plan: rkvsim plan exited {r.returncode}: {r.stderr[-1500:]}")
    return wall, json.loads((out / "plan.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="step,skip,fast", help="comma-separated: step, skip, fast")
    ap.add_argument("--workers", type=int, help="plan's --workers (default: its own, every core)")
    ap.add_argument("--cold", action="store_true", help="every mode starts from an empty compiled store")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    walls, plans = {}, {}
    with tempfile.TemporaryDirectory() as t:
        for m in modes:
            walls[m], plans[m] = run_mode(MODES[m], Path(t) / m, a.workers, a.cold)
            p = plans[m]
            print(f"{m:5s} {walls[m]:7.1f} s   {p['simulations']} simulations, "
                  f"{p.get('simulations_stopped_early', 0)} stopped early, "
                  f"{'empty' if a.cold else 'user'} compiled store", flush=True)
    ref = modes[0]
    for m in modes[1:]:
        print(f"{m} / {ref}: x{walls[ref] / walls[m]:.2f} faster")
    strip = [{k: v for k, v in p.items() if k != "simulations_stopped_early"} for p in plans.values()]
    same = all(s == strip[0] for s in strip)
    print("plans identical" if same else "PLANS DIFFER")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
