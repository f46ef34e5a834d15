"""Golden outputs: every shipped scenario and sweep (and one plan), run through the CLI, reduced to
the numbers they print, so that a refactor that should change no number can prove it.

    python tests/golden_runs.py --write            # regenerate tests/golden/*.json (after a
                                                   # change that is meant to move numbers)
    python tests/golden_runs.py --cli MODULE ...   # run through another CLI module (how the first
                                                   # goldens came from the pre-refactor tree)

Each run is a fresh subprocess with an empty RKVSIM_CACHE and RKVSIM_PROFILES, so nothing a user
trained or installed (a length predictor, a profile) leaks in. Fields that name paths or dates are
dropped; every number is kept exactly (floats compare bit for bit through their JSON repr).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
SCENARIOS = sorted(p.name for p in (ROOT / "scenarios").glob("*.yaml"))
SWEEPS = sorted(p.name for p in (ROOT / "scenarios" / "sweeps").glob("*.yaml"))
PLAN_ARGS = ["scenarios/sharegpt_poisson.yaml", "--rate", "6", "--slo", "ttft_p99<=2s,e2e_p90<=30s",
             "--max-gpus", "2", "--seeds", "2", "--bisect-steps", "2", "--workers", "2",
             "--set", "workload.num_requests=80", "--set", "methods=[fp16,kivi-4,h2o-512]", "--json"]
DEFAULT_CLI = "rkvsim.cli"
# Keys whose values name paths, dates or wall-clock times, at any depth.
DROP = {"path", "out", "results", "report", "created", "date", "wall_s", "elapsed_s", "scenario_path",
        "profile_path", "negative_samples_source"}


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in sorted(x.items()) if k not in DROP}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return x


def _cli(cli: str, args: list[str], env: dict) -> None:
    r = subprocess.run([sys.executable, "-m", cli, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env["RKVSIM_CACHE"] = str(tmp / "cache")
    env["RKVSIM_PROFILES"] = str(tmp / "profiles")
    return env


# The goldens in tests/golden/v0/ are the numbers from before scheduler policies had names; every
# paged scenario, sweep and plan must still give them under `--set scheduler.policy=vllm-v0`. They
# ran on the A6000 when it had no calibration (the roofline prior); since the A6000 borrows the
# nearest profiled GPU's fit (calibration/steps/gpu_carry.py), they pin that prior explicitly, so
# the check stays about the scheduler alone.
V0_SET = ["--set", "scheduler.policy=vllm-v0", "--set", "profile=roofline"]
V0_DIR = GOLDEN / "v0"


def _is_paged(name: str) -> bool:
    import yaml
    return (yaml.safe_load((ROOT / "scenarios" / name).read_text()).get("scheduler") or {}).get("kind") != "slots"


def run_scenario(name: str, cli: str = DEFAULT_CLI, extra: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        _cli(cli, ["run", f"scenarios/{name}", "--out", str(tmp / "out"), *extra], _env(tmp))
        return _clean(json.loads((tmp / "out" / "summary.json").read_text()))


def run_sweep(name: str, cli: str = DEFAULT_CLI, extra: list[str] = ()) -> dict:
    import pandas as pd

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        _cli(cli, ["sweep", f"scenarios/sweeps/{name}", "--workers", "2", "--out", str(tmp / "out"), *extra],
             _env(tmp))
        df = pd.read_parquet(tmp / "out" / "rows.parquet")
        return {"columns": sorted(df.columns), "rows": _clean(df.to_dict(orient="records"))}


def run_plan(cli: str = DEFAULT_CLI, extra: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        _cli(cli, ["plan", *PLAN_ARGS, *extra, "--out", str(tmp / "out")], _env(tmp))
        return _clean(json.loads((tmp / "out" / "plan.json").read_text()))


def golden_path(kind: str, name: str, v0: bool = False) -> Path:
    return (V0_DIR if v0 else GOLDEN) / f"{kind}-{Path(name).stem}.json"


def all_runs(v0: bool = False):
    """(kind, name, thunk) for every golden; v0: the paged ones under vllm-v0."""
    x = V0_SET if v0 else []
    # v0: the scenarios that existed then (a newer one has no v0 numbers to keep).
    out = [("scenario", n, lambda cli, n=n: run_scenario(n, cli, x)) for n in SCENARIOS
           if not v0 or (_is_paged(n) and golden_path("scenario", n, True).exists())]
    out += [("sweep", n, lambda cli, n=n: run_sweep(n, cli, x)) for n in SWEEPS]
    out.append(("plan", "sharegpt_poisson", lambda cli: run_plan(cli, x)))
    return out


def contains(want, got, path: str = "") -> list[str]:
    """Where `got` differs from `want` on want's keys (new keys in got are allowed: a v0 golden
    predates fields such as the scheduler policy and prefix-cache counters)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [path or "."]
        return [d for k, v in want.items() for d in (contains(v, got[k], f"{path}.{k}") if k in got
                                                      else [f"{path}.{k} missing"])]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path} length"]
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in contains(a, b, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, float) and math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-300):
        # numpy's SIMD sums and LAPACK round differently on other CPUs: the same tree gave ...436604
        # and ...4366 on two Intel machines, and the llama.cpp scenarios (their profile's fit) move
        # by 1e-11 relative on an AMD EPYC. 1e-9 still catches any change of a number a change
        # makes (a moved rule or cost moves numbers by far more).
        return []
    return [] if want == got else [f"{path}: {want!r} != {got!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write tests/golden/*.json")
    ap.add_argument("--cli", default=DEFAULT_CLI, help="module run as `python -m MODULE`")
    ap.add_argument("--only", help="substring of the golden names to run")
    ap.add_argument("--v0", action="store_true", help="check tests/golden/v0/ under scheduler.policy=vllm-v0 "
                                                      "(never written: those are the old numbers)")
    a = ap.parse_args()
    GOLDEN.mkdir(exist_ok=True)
    bad = 0
    for kind, name, thunk in all_runs(a.v0):
        path = golden_path(kind, name, a.v0)
        if a.only and a.only not in path.name:
            continue
        got = thunk(a.cli)
        text = json.dumps(got, indent=1, sort_keys=True) + "\n"
        if a.v0:
            diffs = contains(json.loads(path.read_text()), json.loads(text))
            bad += bool(diffs)
            print(f"{'same' if not diffs else 'DIFFERS'}  {path.relative_to(ROOT)}  {diffs[:3]}")
        elif a.write:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
        else:
            same = path.exists() and not contains(json.loads(path.read_text()), json.loads(text)) \
                and not contains(json.loads(text), json.loads(path.read_text()))
            bad += not same
            print(f"{'same' if same else 'DIFFERS'}  {path.relative_to(ROOT)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
