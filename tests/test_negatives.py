"""rkvsim.calibration.quality.negatives: Algorithm 1 counting, paper-compat mode and the CLI."""
import json
import math

import pytest

from rkvsim.calibration.quality.negatives import (
    MissingTaskWarning, ScoresNotFoundError, available_prefixes, count_negatives, load_scores, threshold_curve,
)
from rkvsim.cli.main import rkvsim as main

BASE = "hf_m"


def write(d, prefix, task, scores, order=None):
    """One score file; `order` lets a test shuffle rows so only ids can line them up."""
    ids = order if order is not None else list(scores)
    rows = [{"id": i, "score": scores[i]} for i in ids]
    (d / f"{prefix}_{task}_eval.json").write_text(json.dumps(rows))


def run_cli(capsys, *argv):
    rc = main(["negatives", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- benign filter --------------------------------------------------------------------------


def test_benign_is_at_least_the_median_and_positive():
    # median 0.4: ids 2, 3, 4 are benign; the method fails everything.
    base = {"qasper": {str(i): s for i, s in enumerate([0.0, 0.2, 0.4, 0.6, 0.8])}}
    meth = {"m": {"qasper": {str(i): 0.0 for i in range(5)}}}
    res = count_negatives(base, meth, threshold=0.1)
    assert res.benign == 3 and res.counts == {"m": 3}


def test_zero_median_keeps_only_positive_baselines_in_strict_mode():
    base = {"trec": {"a": 0.0, "b": 0.0, "c": 0.0, "d": 1.0}}  # median 0
    meth = {"m": {"trec": {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}}}
    strict = count_negatives(base, meth, threshold=0.1)
    assert strict.benign_by_task == {"trec": 1} and strict.counts == {"m": 1}


# ---- sets, boundary, matching ---------------------------------------------------------------


def test_a_set_is_negative_only_when_every_member_fails():
    base = {"lcc": {i: 1.0 for i in "wxyz"}}
    fails = lambda bad: {"lcc": {i: (0.0 if i in bad else 1.0) for i in "wxyz"}}  # noqa: E731
    methods = {"a": fails("wx"), "b": fails("xy")}
    res = count_negatives(base, methods, {"both": ["a", "b"]}, threshold=0.1)
    assert res.counts == {"a": 2, "b": 2, "both": 1}
    assert res.by_type["both"] == {"code": 1}


def test_threshold_boundary_counts_as_failure():
    base = {"samsum": {"on": 1.0, "above": 1.0, "below": 1.0}}
    meth = {"m": {"samsum": {"on": 0.9, "above": math.nextafter(0.9, 1.0), "below": 0.5}}}
    assert count_negatives(base, meth, threshold=0.1).counts["m"] == 2  # 0.9 <= (1 - 0.1) * 1.0
    assert count_negatives(base, meth, threshold=0.5).counts["m"] == 1
    assert count_negatives(base, meth, threshold=0.0).counts["m"] == 3


def test_samples_are_matched_by_id_not_position(tmp_path):
    scores = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    write(tmp_path, BASE, "qmsum", scores)
    # Reversed rows, id 3 fails; an unknown id 9 must be ignored and id 0 is missing.
    write(tmp_path, "m", "qmsum", {3: 0.0, 2: 1.0, 1: 1.0, 9: 0.0})
    base, meth = load_scores(tmp_path, BASE), load_scores(tmp_path, "m")
    with pytest.warns(MissingTaskWarning, match="qmsum"):
        res = count_negatives(base, {"m": meth}, threshold=0.1)
    assert res.counts == {"m": 1} and res.by_task == {"m": {"qmsum": 1}}


def test_missing_task_is_skipped_with_a_warning_naming_it(tmp_path, capsys):
    write(tmp_path, BASE, "trec", {0: 1.0})
    write(tmp_path, BASE, "lcc", {0: 1.0})
    write(tmp_path, "m", "trec", {0: 0.0})
    with pytest.warns(MissingTaskWarning, match="lcc"):
        res = count_negatives(load_scores(tmp_path, BASE), {"m": load_scores(tmp_path, "m")})
    assert res.counts == {"m": 1} and res.skipped == {"m": ["lcc"]}
    rc, out, err = run_cli(capsys, "--scores", tmp_path, "--baseline", BASE, "--method", "m=m", "--json")
    assert rc == 0 and "lcc" in err and "warning" in err
    assert json.loads(out)["counts"] == {"m": 1}


# ---- paper compatibility --------------------------------------------------------------------


def paper_fixture():
    # passage_count: median 0, so in paper mode all four are benign; ids 0, 1 are 0-vs-0 ties,
    # id 2 is 0 vs 0.5 (no failure), id 3 is a real failure. trec has one real failure.
    base = {"passage_count": {"0": 0.0, "1": 0.0, "2": 0.0, "3": 1.0}, "trec": {"0": 1.0, "1": 1.0}}
    meth = {"m": {"passage_count": {"0": 0.0, "1": 0.0, "2": 0.5, "3": 0.0}, "trec": {"0": 0.0, "1": 1.0}}}
    return base, meth


def test_paper_mode_double_counts_passage_count_and_zero_ties():
    base, meth = paper_fixture()
    strict = count_negatives(base, meth, threshold=0.1)
    paper = count_negatives(base, meth, threshold=0.1, compat="paper")
    assert strict.counts["m"] == 2  # passage_count id 3 + trec id 0
    # passage_count: (1 failure + 2 ties) x 2 copies; trec: 1
    assert paper.by_task["m"] == {"passage_count": 6, "trec": 1} and paper.counts["m"] == 7
    d = paper.decomposition()["m"]
    assert d == {"count": 7, "passage_count_doubled": 3, "zero_ties": 2, "strict": 2}
    assert d["strict"] == strict.counts["m"]
    assert paper.benign == 2 * 4 + 2 and strict.benign == 1 + 2


def test_paper_cli_prints_the_decomposition(tmp_path, capsys):
    base, meth = paper_fixture()
    for task, s in base.items():
        write(tmp_path, BASE, task, s)
    for task, s in meth["m"].items():
        write(tmp_path, "m_x", task, s)
    rc, out, _ = run_cli(capsys, "--scores", tmp_path, "--baseline", BASE, "--method", "m=m_x",
                         "--compat", "paper", "--json")
    assert rc == 0
    row = json.loads(out)["decomposition"]["m"]
    assert row == {"paper": 7, "passage_count_doubled": 3, "zero_ties": 2, "strict": 2, "strict_recount": 2}
    rc, out, _ = run_cli(capsys, "--scores", tmp_path, "--baseline", BASE, "--method", "m=m_x", "--compat", "paper")
    assert rc == 0 and "0-vs-0" in out and "MISMATCH" not in out


# ---- curve, files, CLI ----------------------------------------------------------------------


def test_curve_falls_with_threshold_and_agrees_with_the_count():
    base, meth = paper_fixture()
    curve = threshold_curve(base, meth, thresholds=[0.0, 0.1, 0.6, 1.0])
    assert curve.counts["m"] == sorted(curve.counts["m"], reverse=True)
    assert curve.counts["m"][1] == count_negatives(base, meth, threshold=0.1).counts["m"]


def test_a_shorter_prefix_does_not_swallow_a_longer_one(tmp_path):
    write(tmp_path, "gear_b1_4bits", "qasper", {0: 1.0})
    assert available_prefixes(tmp_path) == ["gear_b1_4bits"]
    with pytest.raises(ScoresNotFoundError):
        load_scores(tmp_path, "gear_b1")


@pytest.fixture
def small_dir(tmp_path):
    write(tmp_path, BASE, "qasper", {0: 1.0, 1: 0.5})
    write(tmp_path, BASE, "gov_report", {0: 1.0, 1: 0.5})
    write(tmp_path, "kivi_x", "qasper", {0: 0.1, 1: 0.5})
    write(tmp_path, "kivi_x", "gov_report", {0: 0.1, 1: 0.5})
    write(tmp_path, "h2o_x", "qasper", {0: 1.0, 1: 0.5})
    write(tmp_path, "h2o_x", "gov_report", {0: 0.2, 1: 0.5})
    return tmp_path


@pytest.mark.parametrize("flag", [("--method", "kivi=nope"), ("--baseline", "nope")])
def test_a_prefix_without_files_exits_2_naming_the_flag(small_dir, capsys, flag):
    argv = {"--baseline": BASE, "--method": "kivi=kivi_x"}
    argv[flag[0]] = flag[1]
    rc, out, err = run_cli(capsys, "--scores", small_dir, *[x for kv in argv.items() for x in kv])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and flag[0] in err and "nope" in err
    assert "available prefixes: h2o_x, hf_m, kivi_x" in err


def test_a_set_with_an_unknown_member_exits_2(small_dir, capsys):
    rc, _, err = run_cli(capsys, "--scores", small_dir, "--baseline", BASE, "--method", "kivi=kivi_x",
                         "--set", "s=kivi,zzz")
    assert rc == 2 and "zzz" in err


def test_json_shape(small_dir, capsys, tmp_path):
    html = tmp_path / "out" / "curve.html"
    rc, out, _ = run_cli(capsys, "--scores", small_dir, "--baseline", BASE, "--method", "kivi=kivi_x",
                         "--method", "h2o=h2o_x", "--set", "both=kivi,h2o", "--threshold", "0.1",
                         "--json", "--plot", html)
    assert rc == 0
    doc = json.loads(out)
    assert {"threshold", "mode", "counts", "by_task", "by_type"} <= set(doc)
    assert doc["threshold"] == 0.1 and doc["mode"] == "strict"
    assert doc["counts"] == {"kivi": 2, "h2o": 1, "both": 1}
    assert doc["by_task"]["kivi"] == {"qasper": 1, "gov_report": 1}
    assert doc["by_type"]["kivi"] == {"single-doc QA": 1, "summarization": 1}
    text = html.read_text()
    assert text.rstrip().endswith("</html>") and "Plotly.newPlot" in text
    assert [p.name for p in html.parent.iterdir()] == ["curve.html"]  # no temp file left behind


def test_default_output_is_a_table_with_the_benign_count(small_dir, capsys):
    rc, out, _ = run_cli(capsys, "--scores", small_dir, "--baseline", BASE, "--method", "kivi=kivi_x")
    assert rc == 0 and "summarization" in out and "benign samples: 2" in out


# ---- the paper's data -----------------------------------------------------------------------

LB = "Meta-Llama-3-8B-instruct_8192_b1"
SHARED_METHODS = {
    "kivi": f"kivi_{LB}_4bits_group32_residual128",
    "gear": f"gear_{LB}_4bits",
    "h2o": f"h2o_{LB}_c512_w32_k7_maxpool",
    "streamingllm": f"streamingllm_{LB}_c512_w32_k7_maxpool",
}


def test_shared_scores_have_negatives_for_every_method(shared_dir):
    d = shared_dir / "data" / "rethink-kv" / "longbench_scores"
    base = load_scores(d, f"hf_{LB}")
    methods = {name: load_scores(d, p) for name, p in SHARED_METHODS.items()}
    strict = count_negatives(base, methods, threshold=0.1)
    paper = count_negatives(base, methods, threshold=0.1, compat="paper")
    for name in SHARED_METHODS:
        assert strict.counts[name] > 0
        assert paper.counts[name] >= strict.counts[name]
        assert paper.decomposition()[name]["strict"] == strict.counts[name]
