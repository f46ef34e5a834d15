"""A GPU nobody profiled: the nearest profiled GPU's operators carried by the datasheet roofline."""
from types import SimpleNamespace

import numpy as np
import pytest

from rkvsim.calibration.steps.features import dense_work
from rkvsim.calibration.steps.gpu_carry import dense_ratio, dense_roofline_s, rank_donors
from rkvsim.models import HARDWARE, resolve_hardware


def _hw(*names):
    return [resolve_hardware(n) for n in names]


@pytest.mark.parametrize("dst,expect", [
    ("a6000", "a40"),        # same die class, GDDR
    ("l40s", "a40"),         # GDDR first, though the A100's peak FLOP/s is nearer
    ("l4", "a40"),
    ("h200", "h100-sxm"),
    ("a100-40g", "a100-80g"),
    ("a40", "a100-80g"),     # no other GDDR GPU profiled: the nearest HBM one
    ("a100-80g", "h100-sxm"),
])
def test_donor_rule(dst, expect):
    got = rank_donors(resolve_hardware(dst), _hw("a100-80g", "a40", "h100-sxm"))
    assert got[0].name == expect
    assert dst not in [g.name for g in got]


def test_donor_rule_ignores_listing_order():
    a = rank_donors(resolve_hardware("l40s"), _hw("h100-sxm", "a40", "a100-80g"))
    b = rank_donors(resolve_hardware("l40s"), _hw("a100-80g", "h100-sxm", "a40"))
    assert [h.name for h in a] == [h.name for h in b]


def test_no_donor_for_a_cpu_or_without_gpu_profiles(monkeypatch, tmp_path):
    from rkvsim.calibration.steps import profiles
    assert profiles.find_gpu_donor(resolve_hardware("cpu")) is None
    monkeypatch.setattr(profiles, "packaged_store", lambda: tmp_path / "none")
    monkeypatch.setenv(profiles.PROFILES_ENV, str(tmp_path / "empty"))
    assert profiles.find_gpu_donor(resolve_hardware("l40s")) is None


def test_carry_recovers_a_roofline_law_exactly():
    """An operator that runs at the datasheet roofline on the source (no fixed part) runs at the
    destination's roofline once carried, in both regimes (a GEMM at many tokens, a norm)."""
    from rkvsim.calibration.steps.compile import dense_time
    src, dst = resolve_hardware("a40"), resolve_hardware("h100-sxm")
    t = np.array([1.0, 16.0, 256.0, 4096.0])
    for op in ("mlp_up_proj", "input_layernorm", "attn_pre_proj"):
        def build(tokens, op=op):
            return dense_work(op, tokens, 4096, 11008, 32, 8, 128, 32000, 1, 2)
        est = SimpleNamespace(predict=lambda w: dense_roofline_s(w, src))
        f = SimpleNamespace(estimator=est, transfer=None, ranges={"tokens": [1.0, 4096.0]},
                            physics=SimpleNamespace(coef_=[0.0], predict=lambda w: dense_roofline_s(w, src)))
        got = dense_time(f, build, t, False, src, dst)
        np.testing.assert_allclose(got, dense_roofline_s(build(t), dst), rtol=1e-12)


def test_carry_keeps_the_fixed_part():
    """A launch-bound operator (its law's constant) costs the same on the other GPU: only the part
    that grows with the work is scaled."""
    from rkvsim.calibration.steps.compile import dense_time
    src, dst = resolve_hardware("a40"), resolve_hardware("h100-sxm")
    t = np.array([1.0, 64.0])

    def build(tokens):
        return dense_work("add", tokens, 4096, 11008, 32, 8, 128, 32000, 1, 2)
    c0 = 5e-6
    law = lambda w: c0 + dense_roofline_s(w, src)  # noqa: E731
    f = SimpleNamespace(estimator=SimpleNamespace(predict=law), transfer=None, ranges={"tokens": [1.0, 64.0]},
                        physics=SimpleNamespace(coef_=[c0], predict=law))
    got = dense_time(f, build, t, False, src, dst)
    np.testing.assert_allclose(got, c0 + dense_roofline_s(build(t), dst), rtol=1e-12)
    assert np.all(dense_ratio(build(t), src, dst) < 1)       # H100 moves bytes faster than an A40


def test_unprofiled_gpu_runs_calibrated_and_says_so():
    from rkvsim.simulator.calibrated import CalibratedCostModel
    from rkvsim.simulator.config import Scenario
    from rkvsim.simulator.simulation import make_cost_model
    from rkvsim.models import parse_method
    base = {"name": "t", "model": "llama-2-7b", "methods": ["fp16"],
            "workload": {"num_requests": 4, "arrival": {"process": "poisson", "rate": 1.0},
                         "prompt": {"dist": "fixed", "value": 64}, "output": {"dist": "fixed", "value": 8}}}
    cm = make_cost_model(Scenario.model_validate({**base, "hardware": "l40s"}), parse_method("fp16"), 1)
    assert isinstance(cm, CalibratedCostModel)
    assert "carried to l40s" in cm.source and cm.source.startswith("profile:a40@")
    assert cm.cost_parts["dense"].startswith("carried(") and "-> l40s" in cm.cost_parts["dense"]
    assert "a100-80g" in cm.cost_parts["attention"]       # the A40 measured no attention: the A100's
    prior = make_cost_model(Scenario.model_validate({**base, "hardware": "l40s", "profile": "roofline"}),
                            parse_method("fp16"), 1)
    assert not isinstance(prior, CalibratedCostModel)
    # A profiled GPU keeps its own profile.
    own = make_cost_model(Scenario.model_validate({**base, "hardware": "a100-80g"}), parse_method("fp16"), 1)
    assert "carried" not in own.source


def test_carried_costs_follow_the_datasheet():
    """Same model and batch: the carried step is faster on an H200 than on the H100 it comes from
    (more bandwidth, same FLOP/s) in decode, and equal in compute-bound dense work per FLOP."""
    from rkvsim.simulator.config import Scenario
    from rkvsim.simulator.cost_model import StepBatch
    from rkvsim.simulator.simulation import make_cost_model
    from rkvsim.models import parse_method
    base = {"name": "t", "model": "llama-2-7b", "methods": ["fp16"],
            "workload": {"num_requests": 4, "arrival": {"process": "poisson", "rate": 1.0},
                         "prompt": {"dist": "fixed", "value": 64}, "output": {"dist": "fixed", "value": 8}}}
    h100 = make_cost_model(Scenario.model_validate({**base, "hardware": "h100-sxm"}), parse_method("fp16"), 1)
    h200 = make_cost_model(Scenario.model_validate({**base, "hardware": "h200"}), parse_method("fp16"), 1)
    ctx = np.full(8, 1024, np.int64)
    z = np.zeros(0, np.int64)
    dec = StepBatch(z, z, ctx, ctx.copy())
    d100, a100 = h100.operator_split(dec)
    d200, a200 = h200.operator_split(dec)
    assert d200 < d100 and a200 < a100
    assert HARDWARE["h200"].dense_flops == HARDWARE["h100-sxm"].dense_flops
