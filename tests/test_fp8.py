"""FP8 KV (e4m3, vLLM's --kv-cache-dtype fp8), added as a method through its spec and its kernel
alone: these tests check it end to end, from bytes to the simulator and the profiler."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rkvsim.cli.main import rkvprof, rkvsim
from rkvsim.kernels import make_kernel
from rkvsim.kernels.fp8 import E4M3_MAX
from rkvsim.models import (Method, kv_bytes, kv_bytes_per_head, kv_bytes_per_token, kv_fixed_overhead,
                           parse_method, resolve_hardware, resolve_model)
from rkvsim.simulator.cost_model import RooflineCostModel, StepBatch
from rkvsim.simulator.kv_memory import kv_layout

B, HQ, HKV, D = 2, 8, 4, 64


def qkv(n: int, seed: int = 0, head_gain=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h in (HQ, HKV, HKV))
    if head_gain is not None:   # KV heads of very different magnitudes
        gain = torch.tensor(head_gain, dtype=torch.float32).view(1, HKV, 1, 1)
        k, v = k * gain, v * gain
    return q, k, v


def exact(q, k, v, causal):
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    logits = q.double() @ k.transpose(-1, -2) / math.sqrt(D)
    if causal:
        n, m = logits.shape[-2:]
        logits = logits.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(m - n + 1), float("-inf"))
    return torch.softmax(logits, -1) @ v


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def test_spec_names_and_settings():
    m = parse_method("fp8")
    assert (m.kind, m.label, m.scale, m.family) == ("fp8", "fp8", "tensor", "quantizing")
    assert parse_method("fp8-head").label == "fp8-head" and parse_method("fp8-head").scale == "head"
    assert parse_method("fp8_e4m3") == m
    assert Method("fp8", scale="head") == parse_method("fp8-head")
    with pytest.raises(ValueError, match="fp8.scale"):
        Method("fp8", scale="channel")
    with pytest.raises(ValueError, match="unknown setting"):
        Method("fp8", bits=4)


def test_bytes_are_one_per_element_and_half_of_fp16():
    llama = resolve_model("llama-2-7b")
    fp8, fp16 = parse_method("fp8"), parse_method("fp16")
    assert kv_bytes_per_head(fp8, 128, 300, 700) == 700 * 2 * 128
    assert kv_bytes(llama, fp8, 300, 700) * 2 == kv_bytes(llama, fp16, 300, 700)
    assert kv_bytes_per_token(llama, fp8) * 2 == kv_bytes_per_token(llama, fp16)
    assert kv_fixed_overhead(llama, fp8) == 0.0   # no full-precision window
    a6000 = resolve_hardware("a6000")
    lay8, lay16 = (kv_layout(llama, a6000, m, 1, 16, 0.9, 8192, 256) for m in (fp8, fp16))
    assert lay8.num_blocks == pytest.approx(2 * lay16.num_blocks, rel=1e-3)


@pytest.mark.parametrize("label", ["fp8", "fp8-head"])
def test_kernel_is_close_to_exact_attention_and_holds_what_the_spec_says(label):
    m = parse_method(label)
    kern = make_kernel(m)
    q, k, v = qkv(96, seed=1)
    out, cache = kern.prefill(q[:, :, :64], k[:, :, :64], v[:, :, :64])
    assert rel(out, exact(q[:, :, :64], k[:, :, :64], v[:, :, :64], True)) < 1e-5   # prefill: exact K/V
    assert cache.k.dtype == torch.float8_e4m3fn and cache.nbytes == B * HKV * kv_bytes_per_head(m, D, 64, 64, 4)
    for t in range(64, 96):
        s = slice(t, t + 1)
        out, cache = kern.decode(q[:, :, s], k[:, :, s], v[:, :, s], cache)
        err = rel(out, exact(q[:, :, s], k[:, :, :t + 1], v[:, :, :t + 1], False))
        assert 0 < err < 0.08, (t, err)   # lossy, and only as lossy as 3 mantissa bits allow
    assert cache.num_tokens == 96 and cache.nbytes == B * HKV * kv_bytes_per_head(m, D, 64, 96, 4)
    assert cache.scale_nbytes == 4 * (2 if m.scale == "tensor" else 2 * HKV)


def test_per_head_scales_help_when_heads_differ_in_magnitude():
    q, k, v = qkv(80, seed=2, head_gain=[1e-3, 1.0, 30.0, 1.0])
    errs = {}
    for label in ("fp8", "fp8-head"):
        _, cache = make_kernel(label).prefill(q, k, v)
        errs[label] = rel(cache.keys()[:, 0], k[:, 0].double())
    # One scale for all heads leaves the small head's values in e4m3's subnormal range.
    assert errs["fp8-head"] < 0.25 * errs["fp8"]   # measured: 0.027 vs 0.173


def test_chunked_prefill_keeps_the_first_chunks_scales_and_saturates():
    m = parse_method("fp8")
    kern = make_kernel(m)
    q, k, v = qkv(64, seed=3)
    k[:, :, 40:] *= 100            # later tokens far beyond the first chunk's range
    out, cache = kern.prefill(q[:, :, :32], k[:, :, :32], v[:, :, :32], last=False)
    out, cache = kern.extend(q[:, :, 32:], k[:, :, 32:], v[:, :, 32:], cache, last=True)
    assert cache.num_tokens == 64 and cache.nbytes == B * HKV * kv_bytes_per_head(m, D, 64, 64, 4)
    back = cache.keys()
    assert torch.isfinite(back).all()
    assert back.abs().max() <= E4M3_MAX * cache.k_scale.max() * (1 + 1e-6)
    # The chunk itself attends its exact K/V over the dequantized past.
    ref_past = torch.cat([back[:, :, :32], k[:, :, 32:]], 2)
    vals = torch.cat([cache.values()[:, :, :32], v[:, :, 32:]], 2)
    assert rel(out, exact(q[:, :, 32:], ref_past, vals, True)) < 1e-5


def test_roofline_reads_half_the_bytes_with_no_dequant_round_trip():
    llama, a6000 = resolve_model("llama-2-7b"), resolve_hardware("a6000")
    ctx = np.full(64, 3000, np.int64)
    batch = StepBatch(np.zeros(0, np.int64), np.zeros(0, np.int64), ctx, ctx)
    b8 = RooflineCostModel(llama, a6000, parse_method("fp8")).breakdown(batch)
    b16 = RooflineCostModel(llama, a6000, parse_method("fp16")).breakdown(batch)
    kivi = RooflineCostModel(llama, a6000, parse_method("kivi-4")).breakdown(batch)
    assert "kv_dequant" not in b8 and "kv_dequant" in kivi   # fused: no fp16 copy through DRAM
    assert 0.45 < b8["attn_decode"] / b16["attn_decode"] < 0.6
    assert sum(b8.values()) < sum(b16.values())
    # kv_bytes_sum reproduces the spec's bytes.
    cm = RooflineCostModel(llama, a6000, parse_method("fp8"))
    assert cm.kv_bytes_sum(ctx, ctx) == pytest.approx(64 * kv_bytes(llama, parse_method("fp8"), 3000, 3000))


def test_runs_beside_the_other_methods_in_rkvsim_run(tmp_path):
    out = tmp_path / "o"
    rc = rkvsim(["run", "scenarios/heavy_kv.yaml", "--set", "methods=[fp16,fp8,kivi-4]",
                 "--set", "workload.num_requests=120", "--out", str(out)])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())["methods"]
    assert set(s) == {"fp16", "fp8", "kivi-4"}
    assert s["fp8"]["kv_capacity_tokens"] == pytest.approx(2 * s["fp16"]["kv_capacity_tokens"], rel=2e-3)
    assert s["fp8"]["requests_completed"] == 120


def test_calibrated_profile_without_fp8_stands_in_fp16_attention_and_says_so():
    from rkvsim.calibration.steps.profiles import find_profile
    from rkvsim.simulator.calibrated import calibrated_cost_model

    model, cpu = resolve_model("smollm2-135m"), resolve_hardware("cpu")
    folder = find_profile(cpu, model)
    assert folder is not None, "the shipped CPU profile is missing"
    cm = calibrated_cost_model(folder, model, cpu, parse_method("fp8"), 1, 2048, 64, 2048)
    assert any("FP16 attention" in n and "fp8" in n for n in cm.notes)
    ctx = np.full(8, 512, np.int64)
    assert cm.step_time(StepBatch(np.zeros(0, np.int64), np.zeros(0, np.int64), ctx, ctx)) > 0


def test_profiler_times_fp8_attention(tmp_path):
    out = tmp_path / "p"
    rc = rkvprof(["collect", "--model", "smollm2-135m", "--methods", "fp16,fp8", "--grid", "tiny",
                  "--parts", "attention,compression", "--out", str(out), "--no-progress"])
    assert rc == 0
    import pandas as pd
    att = pd.read_csv(out / "attention.csv")
    assert {"fp16", "fp8"} <= set(att["method"]) and (att.loc[att["method"] == "fp8", "time_s_median"] > 0).all()
    comp = out / "compression.csv"
    assert not comp.exists() or "fp8" not in set(pd.read_csv(comp)["method"])   # fused: nothing of its own
