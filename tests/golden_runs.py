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


def run_scenario(name: str, cli: str = DEFAULT_CLI) -> dict:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        _cli(cli, ["run", f"scenarios/{name}", "--out", str(tmp / "out")], _env(tmp))
        return _clean(json.loads((tmp / "out" / "summary.json").read_text()))


def run_sweep(name: str, cli: str = DEFAULT_CLI) -> dict:
    import pandas as pd

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        _cli(cli, ["sweep", f"scenarios/sweeps/{name}", "--workers", "2", "--out", str(tmp / "out")], _env(tmp))
        df = pd.read_parquet(tmp / "out" / "rows.parquet")
        return {"columns": sorted(df.columns), "rows": _clean(df.to_dict(orient="records"))}


def run_plan(cli: str = DEFAULT_CLI) -> dict:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        _cli(cli, ["plan", *PLAN_ARGS, "--out", str(tmp / "out")], _env(tmp))
        return _clean(json.loads((tmp / "out" / "plan.json").read_text()))


def golden_path(kind: str, name: str) -> Path:
    return GOLDEN / f"{kind}-{Path(name).stem}.json"


def all_runs():
    """(kind, name, thunk) for every golden."""
    out = [("scenario", n, lambda cli, n=n: run_scenario(n, cli)) for n in SCENARIOS]
    out += [("sweep", n, lambda cli, n=n: run_sweep(n, cli)) for n in SWEEPS]
    out.append(("plan", "sharegpt_poisson", lambda cli: run_plan(cli)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write tests/golden/*.json")
    ap.add_argument("--cli", default=DEFAULT_CLI, help="module run as `python -m MODULE`")
    ap.add_argument("--only", help="substring of the golden names to run")
    a = ap.parse_args()
    GOLDEN.mkdir(exist_ok=True)
    bad = 0
    for kind, name, thunk in all_runs():
        path = golden_path(kind, name)
        if a.only and a.only not in path.name:
            continue
        got = thunk(a.cli)
        text = json.dumps(got, indent=1, sort_keys=True) + "\n"
        if a.write:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
        else:
            same = path.exists() and path.read_text() == text
            bad += not same
            print(f"{'same' if same else 'DIFFERS'}  {path.relative_to(ROOT)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
