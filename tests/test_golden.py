"""Every shipped scenario and sweep, and one plan, give exactly the numbers in tests/golden/
(floats to 1e-9 relative: the last bits of numpy sums and LAPACK fits depend on the CPU).

A change that is meant to move numbers regenerates them (`python tests/golden_runs.py --write`)
and says why in its commit; any other change must leave them identical. tests/golden/v0/ holds
the numbers from before scheduler policies had names: every paged scenario, sweep and plan still
gives them under `--set scheduler.policy=vllm-v0` (new fields may be added, none may change)."""
import json

import pytest

import golden_runs as g


def _check(kind, name, thunk, request, v0):
    if kind == "plan":
        request.getfixturevalue("shared_dir")   # its negative-sample rates read ../shared
    path = g.golden_path(kind, name, v0)
    want = json.loads(path.read_text())
    got = json.loads(json.dumps(thunk(g.DEFAULT_CLI), sort_keys=True))
    diffs = g.contains(want, got)
    if not v0:
        diffs += g.contains(got, want)   # the current goldens: no field added either
    assert not diffs, f"{path.name} differs ({len(diffs)}): {diffs[:5]}; rerun python tests/golden_runs.py"


@pytest.mark.parametrize("kind,name,thunk", g.all_runs(), ids=[f"{k}-{n}" for k, n, _ in g.all_runs()])
def test_golden(kind, name, thunk, request):
    _check(kind, name, thunk, request, v0=False)


@pytest.mark.parametrize("kind,name,thunk", g.all_runs(v0=True), ids=[f"v0-{k}-{n}" for k, n, _ in g.all_runs(v0=True)])
def test_golden_vllm_v0(kind, name, thunk, request):
    _check(kind, name, thunk, request, v0=True)
