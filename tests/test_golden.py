"""Every shipped scenario and sweep, and one plan, give exactly the numbers in tests/golden/.

A change that is meant to move numbers regenerates them (`python tests/golden_runs.py --write`)
and says why in its commit; any other change must leave them identical."""
import json

import pytest

import golden_runs as g


@pytest.mark.parametrize("kind,name,thunk", g.all_runs(), ids=[f"{k}-{n}" for k, n, _ in g.all_runs()])
def test_golden(kind, name, thunk, request):
    if kind == "plan":
        request.getfixturevalue("shared_dir")   # its negative-sample rates read ../shared
    path = g.golden_path(kind, name)
    want = json.loads(path.read_text())
    got = json.loads(json.dumps(thunk(g.DEFAULT_CLI), sort_keys=True))
    if kind == "sweep":
        assert got["columns"] == want["columns"]
        for i, (a, b) in enumerate(zip(got["rows"], want["rows"])):
            assert a == b, f"{path.name}: row {i} differs"
        assert len(got["rows"]) == len(want["rows"])
    else:
        assert got == want, f"{path.name} differs: rerun python tests/golden_runs.py to see which"
