"""How far a forecast can be trusted where it stands: every calibrated run carries, per part of its
step cost, the error that way of obtaining it showed where it was measured (cost_trust), read from
what measured it (the profile's fit scores, the shipped transfer checks)."""
import json

import numpy as np
import pytest

from rkvsim.calibration.steps.data_files import packaged
from rkvsim.calibration.steps.trust import TRUST_FILE, dense_trust, transfer_checks


def _scenario(**kw):
    from rkvsim.simulator.config import Scenario
    base = dict(name="t", model="llama-2-7b", hardware="a6000", methods=["fp16", "kivi-4"],
                workload={"num_requests": 8, "arrival": {"process": "closed_loop", "concurrency": 4},
                          "prompt": {"dist": "uniform", "low": 64, "high": 256},
                          "output": {"dist": "uniform", "low": 8, "high": 24}})
    base.update(kw)
    return Scenario.model_validate(base)


def _trust(**kw) -> dict[str, list[dict]]:
    from rkvsim.simulator.pipeline import run_scenario
    summary = run_scenario(_scenario(**kw)).summary()
    return {m: v["cost_trust"] for m, v in summary["methods"].items()}


def _fit_json(gpu: str) -> dict:
    from rkvsim.calibration.steps.profiles import packaged_store
    return json.loads((packaged_store() / gpu / "vidur" / "fit" / "fit.json").read_text())


def test_carried_gpu_quotes_its_own_measured_pair_and_the_attention_checks():
    """A6000 (nobody's profile ships): the A40's dense fit, with LLaMA-2-7B's own held-out layer error,
    its carry to the A6000 as measured against the paper's A6000 table, the attention checks; KIVI adds
    its unmeasured A6000 ratio."""
    tr = _trust()
    by = {t["part"]: t for t in tr["fp16"]}
    layer = _fit_json("a40")["layer_leave_one_model_out"]["shape+gbt"]["llama-2-7b"]
    assert by["dense"]["median_pct"] == pytest.approx(round(100 * layer, 2))
    checks = transfer_checks()
    pair = next(r for r in checks["dense_gpu_carry"] if r["from"] == "a40" and r["to"] == "a6000")
    assert by["dense carry"]["median_pct"] == pytest.approx(round(100 * pair["mape"], 2)) and by["dense carry"]["cases"] == 1
    cells = [st["mape"] for d in checks["attention"].values() for st in d.values()]
    assert by["attention"]["median_pct"] == pytest.approx(round(100 * float(np.median(cells)), 2))
    assert by["attention"]["worst_pct"] == pytest.approx(round(100 * max(cells), 2)) and by["attention"]["cases"] == 4
    assert "method ratio" not in by
    # The per-step CPU time: the measured A40 host's line for vLLM V1's parts, its error on the medians.
    cpu = json.loads(packaged("cpu_overheads", "vidur.json").read_text())["hosts"]["a40"]["1"]["v1"]
    assert by["cpu"]["median_pct"] == pytest.approx(round(100 * cpu["mape"], 2)) and "V1" in by["cpu"]["how"]
    ratio = [t for t in tr["kivi-4"] if t["part"] == "method ratio"]
    assert len(ratio) == 1 and ratio[0]["median_pct"] is None      # said, without a number


def test_unprofiled_model_quotes_every_held_out_model_and_a_profiled_shape_its_k_fold():
    tr = {t["part"]: t for t in _trust(hardware="a100-80g", model="llama-2-70b", tp=2)["fp16"]}
    layer = _fit_json("a100-80g")["layer_leave_one_model_out"]["shape+gbt"]
    assert "llama-2-70b" not in layer and tr["dense"]["cases"] == len(layer)
    assert tr["dense"]["median_pct"] == pytest.approx(round(100 * float(np.median(list(layer.values()))), 2))
    assert tr["dense"]["worst_pct"] == pytest.approx(round(100 * max(layer.values()), 2))
    # LLaMA-2-70B at TP 2 is the A100 attention table's own shape: its decode and prefill fits' k-fold error.
    assert tr["attention"]["cases"] == 2 and tr["attention"]["how"].startswith("k-fold")
    assert "dense carry" not in tr


def test_roofline_prior_quotes_its_dense_checks_and_no_attention_number():
    tr = {t["part"]: t for t in _trust(profile="roofline")["fp16"]}
    prior = [r["mape"] for r in transfer_checks()["dense_gpu_carry"] if r["from"] == "prior"]
    assert tr["dense"]["median_pct"] == pytest.approx(round(100 * float(np.median(prior)), 2))
    assert tr["attention"]["median_pct"] is None


def test_dense_trust_without_any_scoring_says_how_to_get_it(tmp_path):
    class Unscored:
        layer_heldout, ops, model_names = {}, {}, ["m"]
    t = dense_trust(Unscored(), str(tmp_path), "m")
    assert t.median_pct is None and t.how == f"not scored: run rkvprof fit {tmp_path}"


def test_cli_prints_the_trust_line_and_the_report_has_its_table(tmp_path):
    from rkvsim.cli.main import rkvsim
    import yaml
    scn = _scenario().model_dump(exclude_none=True)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(scn))))
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert rkvsim(["run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 0
    text = out.getvalue()
    assert "trust (measured error" in text and "dense carry" in text and "not measured" in text
    html = (tmp_path / "o" / "report.html").read_text()
    assert "How far to trust these costs" in html and "calibration/data/trust/transfer.json" in html


def test_shipped_transfer_checks_are_what_validate_transfer_computes(shared_dir):
    """calibration/data/trust/transfer.json = `rkvsim validate-transfer --trust-out` on ../shared."""
    from rkvsim.validation import gpu_transfer
    from rkvsim.validation.attention_transfer import run
    shipped = json.loads(packaged(*TRUST_FILE).read_text())
    a6000 = shared_dir / "data" / "rethink-kv" / "profiles" / "a6000"
    att = run(a6000, shared_dir / "data" / "vidur-profiles" / "older-a100")
    for direction, stages in att.items():
        for stage, r in stages.items():
            assert shipped["attention"][direction][stage]["mape"] == pytest.approx(r["mape"], rel=1e-6)
    dense = {(r["to"], r["from"]): r["mape"] for r in gpu_transfer.run(a6000)}
    got = {(r["to"], r["from"]): r["mape"] for r in shipped["dense_gpu_carry"]}
    assert got.keys() == dense.keys()
    for k, v in dense.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k
    assert shipped["command"].startswith("rkvsim validate-transfer --trust-out")
