"""Issue 15: GPU profiles imported from Vidur's layout, shape transfer across models, measured TP
communication, the cost source of every part, and models named by a Hugging Face config."""
import json

import numpy as np
import pandas as pd
import pytest

from rkvsim.models import ConfigError, resolve_hardware, resolve_model, spec_from_hf_config

OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
       "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
SHAPES = {  # org/name: (heads, kv heads, hidden, intermediate, vocab, gated)
    "meta-llama/Llama-2-7b-hf": (32, 32, 4096, 11008, 32768, True),
    "meta-llama/Meta-Llama-3-8B": (32, 8, 4096, 14336, 128256, True),
    "codellama/CodeLlama-34b-Instruct-hf": (64, 8, 8192, 22016, 32768, True),
    "internlm/internlm-20b": (40, 40, 5120, 13824, 103168, True),
}


def _law(op, t, tp, heads, kv, h, i, gated):
    """A synthetic shape law: 4 us + FLOPs at 100 TFLOP/s + bytes at 1 TB/s (ms, Vidur's unit)."""
    from rkvsim.calibration.steps.features import dense_work
    w = dense_work(op, t, h, i, heads, kv, h // heads, 32000, tp, 2, gated=gated)
    return (4e-6 + w["flops"] / 1e14 + (w["vflops"] / 2e13) + w["bytes"] / 1e12) * 1e3


def _vidur_tree(root, gpu="a100", noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    for name, (heads, kv, h, i, vocab, gated) in SHAPES.items():
        rows = []
        for tp in (1, 2, 4):
            for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
                r = {"n_head": heads, "n_kv_head": kv, "n_embd": h, "n_expanded_embd": i, "vocab_size": vocab,
                     "use_gated_mlp": gated, "num_tokens": t, "num_tensor_parallel_workers": tp}
                for op in OPS:
                    v = float(_law(op, np.array([t]), tp, heads, kv, h, i, gated)[0]) * (1 + noise * rng.normal())
                    for s in ("min", "max", "mean", "median"):
                        r[f"time_stats.{op}.{s}"] = v
                    r[f"time_stats.{op}.std"] = 0.0
                rows.append(r)
        d = root / "compute" / gpu / name
        d.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(d / "mlp.csv", index=False)
    net = root / "network" / "a100_dgx"
    net.mkdir(parents=True)
    rows = []
    for w in (2, 4):
        for size in (2048, 8192, 65536, 1 << 20, 1 << 24):
            for rep in range(3):
                ms = (0.01 * w + size / 100e9 * 1e3) * (1 + 0.01 * rep)
                rows.append({"time_stats.all_reduce.min": ms, "time_stats.all_reduce.max": ms,
                             "time_stats.all_reduce.mean": ms, "time_stats.all_reduce.median": ms,
                             "time_stats.all_reduce.std": 0.0, "rank": 0, "num_workers": w, "size": size,
                             "collective": "all_reduce", "devices_per_node": w, "max_devices_per_node": 8})
            rows.append({**rows[-1], "devices_per_node": 1, "time_stats.all_reduce.median": 99.0})   # other node
    pd.DataFrame(rows).to_csv(net / "all_reduce.csv", index=False)
    return root


def test_import_repo_layout_one_profile_per_gpu_with_every_model(tmp_path):
    from rkvsim.profiler.profile import load_profile
    from rkvsim.profiler.vidur_repo import import_vidur_repo
    src = _vidur_tree(tmp_path / "vidur")
    res = import_vidur_repo(src, "a100", tmp_path / "out", commit="abc123")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["hardware"] == "a100-80g" and meta["provenance"]["repository"] == "microsoft/vidur"
    assert meta["provenance"]["commit"] == "abc123" and meta["provenance"]["licence"] == "MIT"
    assert set(meta["models"]) == {"llama-2-7b", "llama-3-8b", "codellama-34b", "internlm-20b"}
    prof = load_profile(tmp_path / "out")
    ops = prof.tables["operators"]
    # Every model's rows survive (the key holds the shape), converted ms -> s.
    assert res.rows["operators"] == len(ops) == 4 * 3 * 13 * len(OPS)
    row = ops[(ops.op == "mlp_up_proj") & (ops.hidden == 5120) & (ops.num_tokens == 64) & (ops.tp == 2)]
    assert len(row) == 1
    want = _law("mlp_up_proj", np.array([64]), 2, 40, 40, 5120, 13824, True)[0] / 1e3
    assert row["time_s_median"].iloc[0] == pytest.approx(want, rel=1e-12)


def test_import_refuses_a_gpu_the_tree_has_not(tmp_path):
    from rkvsim.profiler.device import ProfilerError
    from rkvsim.profiler.vidur_repo import import_vidur_repo
    src = _vidur_tree(tmp_path / "vidur")
    with pytest.raises(ProfilerError, match="--gpu h100"):
        import_vidur_repo(src, "h100", tmp_path / "out")


def test_shape_transfer_recovers_a_synthetic_shape_law(tmp_path):
    """Leave-one-model-out on rows that follow a known law: the physics law recovers it exactly
    (it is in its span), the shape-transfer estimator within a percent."""
    from rkvsim.calibration.steps.fit import fit_profile
    from rkvsim.profiler.profile import load_profile
    from rkvsim.profiler.vidur_repo import import_vidur_repo
    import_vidur_repo(_vidur_tree(tmp_path / "vidur"), "a100", tmp_path / "out")
    fit = fit_profile(load_profile(tmp_path / "out"))
    assert fit.models == sorted(["llama-2-7b", "llama-3-8b", "codellama-34b", "internlm-20b"])
    for op in ("attn_pre_proj", "mlp_up_proj", "mlp_down_proj", "input_layernorm"):
        f = fit.get("dense", "all", op)
        assert set(f.heldout_models["physics"]) == set(fit.models)
        assert max(f.heldout_models["physics"].values()) < 1e-6, (op, f.heldout_models["physics"])
        assert max(f.heldout_models["shape+gbt"].values()) < 0.02, (op, f.heldout_models["shape+gbt"])
    # A whole layer (the sum of its operators at each tokens x TP), scored the same way.
    assert set(fit.layer_heldout["physics"]) == set(fit.models)
    assert max(fit.layer_heldout["physics"].values()) < 1e-6, fit.layer_heldout
    assert max(fit.layer_heldout["shape+gbt"].values()) < 0.02, fit.layer_heldout


def test_wave_features_carry_tile_quantisation_to_a_held_out_shape():
    """A GEMM whose time steps with its tile waves (128 x 128 tiles, 108 SMs): told the SM count, the
    shape-transfer fit predicts held-out hidden sizes inside the profiled range at least twice as
    well as without it (measured on the A100 import: InternLM-20B's up projection 10.4% -> 6.7%)."""
    from rkvsim.calibration.steps.features import dense_work, wave_features
    from rkvsim.calibration.steps.fit import fit_dense_shapes
    tokens = np.unique(np.concatenate([2 ** np.arange(0, 13), np.arange(16, 4097, 96)])).astype(float)
    works, ys, groups = [], [], []
    for h in (2048, 3072, 4096, 5120, 6144, 8192):
        for tp in (1, 2):
            w = dense_work("attn_pre_proj", tokens, h, 4 * h, h // 128, h // 128, 128, 32000, tp, 2)
            waves = np.ceil(np.ceil(w["tokens"] / 128) * np.ceil(w["n_out"] / 128) / 108)
            works.append(w)
            ys.append(3e-6 + waves * w["k_in"] * 1.4e-8)
            groups += [f"h{h}"] * len(tokens)
    work = {k: np.concatenate([w[k] for w in works]) for k in works[0]}
    y, groups = np.concatenate(ys), np.array(groups, dtype=object)
    assert wave_features(work, 108).shape == (len(y), 10)
    err = {sms: fit_dense_shapes("attn_pre_proj", work, y, groups, 0, True, sms)[0].heldout_models["shape+gbt"]
           for sms in (None, 108)}
    inside = ("h3072", "h4096", "h5120", "h6144")
    assert np.mean([err[108][m] for m in inside]) < 0.5 * np.mean([err[None][m] for m in inside]), err
    assert max(err[108][m] for m in inside) < 0.06, err


def test_parallel_block_sums_two_adds_and_has_one_norm(tmp_path):
    """Phi-2 (attention and MLP in parallel): its timed residual add is two element-wise adds
    (Vidur's profiler sums attention + MLP + residual), and a layer has no post-attention norm."""
    from rkvsim.calibration.steps.compile import dense_tables
    from rkvsim.calibration.steps.features import dense_work
    from rkvsim.calibration.steps.fit import fit_profile
    from rkvsim.profiler.profile import load_profile
    from rkvsim.profiler.vidur_repo import import_vidur_repo
    t = np.array([64.0])
    one = dense_work("add", t, 2560, 10240, 32, 32, 80, 51200)
    two = dense_work("add", t, 2560, 10240, 32, 32, 80, 51200, parallel=True)
    assert two["bytes"][0] == 2 * one["bytes"][0] and two["vflops"][0] == 2 * one["vflops"][0]
    phi = resolve_model("phi-2")
    assert phi.parallel_block and not resolve_model("llama-2-7b").parallel_block
    for cfg, want in (({"model_type": "gptj"}, True), ({"model_type": "falcon", "parallel_attn": True}, True),
                      ({"model_type": "llama"}, False)):
        spec = spec_from_hf_config({**cfg, "hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16,
                                    "intermediate_size": 8192, "vocab_size": 50000})
        assert spec.parallel_block is want, cfg
    # The same fit costs a parallel block's layer below a sequential one's of the same shape: one norm
    # fewer, its add doubled (both costed from the fit's own operators).
    import dataclasses
    import_vidur_repo(_vidur_tree(tmp_path / "vidur"), "a100", tmp_path / "out")
    fit = fit_profile(load_profile(tmp_path / "out"), score=False)
    seq = dataclasses.replace(phi, name="phi-2-sequential", parallel_block=False)
    a, b = (dense_tables(fit, m, 1, 512, transfer=True)[0] for m in (phi, seq))

    def op_s(op, parallel=False):
        return fit.get("dense", "all", op).predict(dense_work(op, t, 2560, 10240, 32, 32, 80, 51200, gated=False,
                                                              parallel=parallel))[0]
    want = phi.num_layers * (op_s("post_attention_layernorm") + op_s("add") - op_s("add", parallel=True))
    assert b[64] - a[64] == pytest.approx(want, rel=1e-6)


def test_leave_one_model_out_cli_prints_every_model(tmp_path, capsys):
    from rkvsim.cli.main import rkvprof
    from rkvsim.profiler.vidur_repo import import_vidur_repo
    import_vidur_repo(_vidur_tree(tmp_path / "vidur"), "a100", tmp_path / "out")
    rc = rkvprof(["fit", str(tmp_path / "out"), "--leave-one-model-out", "--candidates", "physics"])
    out = capsys.readouterr().out
    assert rc == 0 and "leave-one-model-out" in out and "layer (sum of ops)" in out and "floor" in out
    for m in ("llama-2-7b", "llama-3-8b", "codellama-34b", "internlm-20b"):
        assert m in out


def test_twin_floor_compares_runs_of_the_same_operator_shape():
    """The reproducibility floor: a model's rows whose exact work another model's run also timed,
    predicted by the other runs' mean. Three models, two sharing a shape at some token counts."""
    from rkvsim.calibration.steps.features import dense_work
    from rkvsim.calibration.steps.fit import twin_floor
    t = np.array([64.0, 128.0, 256.0])
    a = dense_work("input_layernorm", t, 4096, 11008, 32, 32, 128, 32000)
    b = dense_work("input_layernorm", t, 4096, 14336, 32, 8, 128, 128256)   # the same norm (hidden 4096)
    c = dense_work("input_layernorm", t, 5120, 13824, 40, 40, 128, 103168)  # no twin
    work = {k: np.concatenate([a[k], b[k], c[k]]) for k in a}
    ya = np.array([10.0, 20.0, 40.0])
    y = np.concatenate([ya, ya * 1.1, ya * 3])
    groups = np.array(["a"] * 3 + ["b"] * 3 + ["c"] * 3, dtype=object)
    floor = twin_floor(work, y, groups)
    assert set(floor) == {"a", "b"}
    assert floor["a"] == (pytest.approx(0.1), 3)              # |1.1 - 1| / 1
    assert floor["b"] == (pytest.approx(0.1 / 1.1), 3)        # |1 - 1.1| / 1.1
    # A twin key the work does not show (rotary's head size) splits rows of equal work apart.
    assert twin_floor(work, y, groups, {"head_dim": np.array([128] * 3 + [64] * 3 + [128] * 3)}) == {}


def test_a_model_with_kernels_no_profiled_model_runs_says_so():
    """Phi-2 (LayerNorm, plain GELU MLP) predicted from Llama-like profiles: the dense part and the notes
    name the kernels the profile never timed; a Llama-like model gets no such caveat."""
    from rkvsim.calibration.steps.compile import unprofiled_kernels
    phi, neox = resolve_model("phi-2"), spec_from_hf_config(
        {"model_type": "gpt_neox", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
         "intermediate_size": 8192, "vocab_size": 50304, "hidden_act": "gelu"})
    assert phi.layer_norm and not phi.gated_mlp and neox.layer_norm and not neox.gated_mlp
    assert unprofiled_kernels(phi, ["llama-2-7b", "qwen-72b"]) == ["norm layernorm", "mlp activation gelu (plain)"]
    assert unprofiled_kernels(phi, ["llama-2-7b", "phi-2"]) == []
    assert unprofiled_kernels(resolve_model("llama-3-8b"), ["llama-2-7b", "some-unregistered-model"]) == []
    assert not resolve_model("mistral-7b").layer_norm


def test_compiled_costs_name_the_kernels_the_profile_never_timed(tmp_path):
    from rkvsim.calibration.steps.compile import compile_costs
    from rkvsim.calibration.steps.fit import fit_profile
    from rkvsim.models import parse_method
    from rkvsim.profiler.profile import load_profile
    from rkvsim.profiler.vidur_repo import import_vidur_repo
    import_vidur_repo(_vidur_tree(tmp_path / "vidur"), "a100", tmp_path / "out")
    from rkvsim.calibration.steps.profiles import find_attention_donor, fit_for
    fit = fit_profile(load_profile(tmp_path / "out"), score=False)     # Llama-like models only, no attention
    h100 = resolve_hardware("h100-sxm")
    att = fit_for(find_attention_donor(h100))                         # the shipped A100 attention
    donor = (att, resolve_hardware(att.hardware), h100)
    neox = spec_from_hf_config({"model_type": "gpt_neox", "hidden_size": 2048, "num_hidden_layers": 16,
                                "num_attention_heads": 16, "intermediate_size": 8192, "vocab_size": 50304})
    kw = dict(max_tokens=512, max_batch=8, max_ctx=512, donor=donor)
    c = compile_costs(fit, neox, parse_method("fp16"), **kw)
    assert c.parts["dense"].endswith("[kernels not profiled: norm layernorm, mlp activation gelu (plain)]")
    assert any("runs kernels none of the profiled models ran" in n for n in c.notes)
    llama = compile_costs(fit, resolve_model("mistral-7b"), parse_method("fp16"), **kw)
    assert "kernels not profiled" not in llama.parts["dense"]


def test_comm_fit_keeps_one_node_and_interpolates_measured_sizes(tmp_path):
    from rkvsim.calibration.steps.comm import curve_time, fit_folder
    res = fit_folder(_vidur_tree(tmp_path / "vidur") / "network")
    f = res["hosts"]["a100_dgx"]["all_reduce"]["4"]
    assert 99.0 / 1e3 not in f["time_s"]                    # the cross-node rows are left out
    curve = (tuple(np.log(f["size_bytes"])), tuple(np.log(f["time_s"])))
    for size, t in zip(f["size_bytes"], f["time_s"]):
        assert curve_time(curve, size) == pytest.approx(t, rel=1e-12)
    assert curve_time(curve, 1.0) == pytest.approx(f["time_s"][0])          # latency floor
    big = curve_time(curve, 2 * f["size_bytes"][-1])
    assert big > f["time_s"][-1]                                            # bandwidth past the last size
    assert f["bandwidth_Bps"] == pytest.approx(100e9, rel=0.05)


def test_shipped_comm_curves_cover_the_gpus_that_name_them():
    from rkvsim.calibration.steps.comm import lookup
    for hw, tps in (("a100-80g", (2, 4, 8)), ("h100-sxm", (2, 4, 8))):
        for tp in tps:
            hit = lookup(resolve_hardware(hw).network, tp)
            assert hit is not None and "measured" in hit[2]
    assert lookup(resolve_hardware("a6000").network, 2) is None


def test_topology_a_tp4_ring_on_a6000_crosses_pcie():
    from rkvsim.simulator.roofline import ring_allreduce_s
    a6000 = resolve_hardware("a6000")
    assert a6000.ring_link(2)[0] == a6000.link_bandwidth
    assert a6000.ring_link(4)[0] == a6000.pcie_bandwidth < a6000.link_bandwidth
    nbytes = 64 << 20
    # Four GPUs over PCIe take longer than the NVLink pair, though the ring sends less per link.
    assert ring_allreduce_s(nbytes, 4, a6000) > ring_allreduce_s(nbytes, 2, a6000)
    a100 = resolve_hardware("a100-80g")
    assert a100.ring_link(8)[0] == a100.link_bandwidth


def _scenario(tmp_path, **kw):
    from rkvsim.simulator.config import Scenario
    base = dict(name="t", model="llama-2-7b", hardware="a6000", methods=["fp16"],
                workload={"num_requests": 12, "arrival": {"process": "closed_loop", "concurrency": 4},
                          "prompt": {"dist": "uniform", "low": 64, "high": 256},
                          "output": {"dist": "uniform", "low": 8, "high": 24}})
    base.update(kw)
    return Scenario.model_validate(base)


def test_hf_config_inline_and_path(tmp_path):
    cfg = {"_name_or_path": "Qwen/Qwen3-14B", "model_type": "qwen3", "hidden_size": 5120, "num_hidden_layers": 40,
           "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 17408,
           "vocab_size": 151936, "max_position_embeddings": 40960, "torch_dtype": "bfloat16"}
    m = resolve_model(cfg)
    assert (m.name, m.num_kv_heads, m.head_dim, m.gated_mlp) == ("qwen3-14b", 8, 128, True)
    assert 14.0e9 < m.num_params < 15.2e9
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(cfg))
    assert resolve_model(str(tmp_path / "qwen" / "config.json")) == m
    from rkvsim.simulator.config import load_scenario
    (tmp_path / "s.yaml").write_text("model: qwen/config.json\nhardware: h100-sxm\nworkload:\n  num_requests: 4\n"
                                     "  arrival: {process: closed_loop, concurrency: 2}\n"
                                     "  prompt: {dist: uniform, low: 16, high: 32}\n"
                                     "  output: {dist: uniform, low: 4, high: 8}\n")
    scn = load_scenario(tmp_path / "s.yaml")
    assert resolve_model(scn.model) == m
    with pytest.raises(ConfigError, match="hidden_size"):
        spec_from_hf_config({"num_hidden_layers": 2})


def test_mistral_window_and_phi_ungated_from_configs():
    mis = spec_from_hf_config({"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
                               "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                               "vocab_size": 32000, "sliding_window": 4096})
    assert mis.sliding_window == 4096
    phi = spec_from_hf_config({"model_type": "phi", "hidden_size": 2560, "num_hidden_layers": 32,
                               "num_attention_heads": 32, "intermediate_size": 10240, "vocab_size": 51200})
    assert not phi.gated_mlp and phi.num_params == pytest.approx(resolve_model("phi-2").num_params)


def test_moe_reads_only_the_experts_its_tokens_touch():
    from rkvsim.models import parse_method
    from rkvsim.simulator.cost_model import RooflineCostModel
    mix = resolve_model("mixtral-8x7b")
    assert 46e9 < mix.num_params < 47.5e9
    assert mix.experts_touched(1) == pytest.approx(2.0)
    assert 2.0 < mix.experts_touched(4) < mix.experts_touched(64) <= 8.0
    hw = resolve_hardware("h100-sxm")
    moe = RooflineCostModel(mix, hw, parse_method("fp16"), tp=2)
    # The same shape as one dense model with all 8 experts' weights in every MLP would read them all.
    from dataclasses import replace
    dense_all = RooflineCostModel(replace(mix, num_experts=0, experts_per_token=0,
                                          intermediate_size=8 * mix.intermediate_size), hw, parse_method("fp16"), tp=2)
    assert moe._dense(1)[0] < 0.5 * dense_all._dense(1)[0]          # batch 1 reads 2 of 8 experts
    assert moe._dense(4096)[0] > moe._dense(1)[0]
    assert mix.weight_bytes == mix.num_params * 2       # memory holds every expert


def test_cost_parts_say_where_each_part_comes_from(tmp_path):
    from rkvsim.simulator.pipeline import run_scenario
    scn = _scenario(tmp_path, hardware="h100-sxm", model="llama-2-70b", tp=4)
    summary = run_scenario(scn).summary()
    assert summary["cost_source"].startswith("profile:h100-sxm@")
    parts = next(iter(summary["methods"].values()))["cost_parts"]
    assert "dense:profile(h100-sxm" in parts
    assert "attention:transfer(a100-80g" in parts
    assert "comm:measured(h100_dgx all_reduce x4)" in parts
    assert "cpu:" in parts
    carried = run_scenario(_scenario(tmp_path, hardware="l40s", tp=2)).summary()
    cp = next(iter(carried["methods"].values()))["cost_parts"]
    assert "dense:carried(profile(a40@" in cp and "-> l40s)" in cp and "comm:ring-formula(pcie4)" in cp
    prior = run_scenario(_scenario(tmp_path, hardware="l40s", tp=2, profile="roofline")).summary()
    lp = next(iter(prior["methods"].values()))["cost_parts"]
    assert "dense:roofline-prior" in lp and "comm:ring-formula(pcie4)" in lp
    assert "kernels not profiled" not in parts + cp


def test_shipped_tables_are_what_the_importers_compute_from_shared(shared_dir, tmp_path):
    """The packaged H100 profile, comm curves and method ratios are recomputed from ../shared here."""
    from rkvsim.calibration.steps import comm, method_ratios
    from rkvsim.profiler.profile import load_profile, packaged_profiles
    from rkvsim.profiler.vidur_repo import import_vidur_repo
    vidur = shared_dir / "data" / "vidur-profiles"
    import_vidur_repo(vidur, "h100", tmp_path / "h100")
    shipped = next(p for p in packaged_profiles() if p.parent.name == "h100-sxm")
    a = load_profile(shipped).tables["operators"].drop(columns="source")
    b = load_profile(tmp_path / "h100").tables["operators"].drop(columns="source")
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    assert load_profile(shipped).meta["models"] == load_profile(tmp_path / "h100").meta["models"]
    assert json.loads(comm.packaged().read_text())["hosts"] == comm.fit_folder(vidur / "network")["hosts"]
    got = method_ratios.fit_ratios(shared_dir / "data" / "rethink-kv" / "profiles" / "a6000")
    assert json.loads(method_ratios.packaged().read_text())["methods"] == json.loads(json.dumps(got["methods"]))


def test_ratio_at_returns_the_measured_ratio_on_its_grid():
    from rkvsim.calibration.steps.method_ratios import ratio_at, ratio_table
    label, tabs = ratio_table("kivi-4", "kivi")
    t = tabs["decode"]
    x, y = np.meshgrid(t["x"], t["y"], indexing="ij")
    np.testing.assert_allclose(ratio_at(t, x.ravel(), y.ravel()), np.exp(np.asarray(t["log_ratio"])).ravel(),
                               rtol=1e-12)
    assert ratio_table("kivi-2", "kivi")[0] == "kivi-4"        # another setting: the kind's measured one
    assert ratio_table("snapkv-1024", "snapkv") is None        # never measured


def test_kivi_on_h100_is_its_fp16_attention_times_the_a6000_ratio():
    from rkvsim.calibration.steps.method_ratios import REF_KV_HEADS, ratio_at, ratio_table
    from rkvsim.calibration.steps.profiles import compiled_costs, find_profile
    from rkvsim.models import parse_method
    hw, model = resolve_hardware("h100-sxm"), resolve_model("llama-2-7b")
    folder = find_profile(hw, model)
    fp = compiled_costs(folder, model, parse_method("fp16"), 1, 2048, 64, 2048)
    kv = compiled_costs(folder, model, parse_method("kivi-4"), 1, 2048, 64, 2048)
    assert "a6000-ratio(kivi-4)" in kv.parts["attention"] and "transfer(a100-80g" in kv.parts["attention"]
    B, C = np.meshgrid(kv.dec_b, kv.dec_c, indexing="ij")
    want = fp.dec * ratio_at(ratio_table("kivi-4", "kivi")[1]["decode"], B.ravel() * 32 / REF_KV_HEADS,
                             C.ravel()).reshape(B.shape)
    np.testing.assert_allclose(kv.dec, want, rtol=1e-12)


def test_validate_transfer_both_ways(shared_dir):
    from rkvsim.validation.attention_transfer import run
    res = run(shared_dir / "data" / "rethink-kv" / "profiles" / "a6000", shared_dir / "data" / "vidur-profiles" / "older-a100")
    assert len(res) == 2
    for direction in res.values():
        for stage in ("decode", "prefill"):
            r = direction[stage]
            assert r["rows"] > 1000 and np.isfinite(r["mape"]) and 0 < r["bias"]
