"""models/: architectures, hardware and KV bytes against values worked out by hand."""
import math

import numpy as np
import pytest

from rkvsim.models import (cached_tokens_vec, hardware_for_device, kv_bytes, kv_bytes_per_head,
                           kv_bytes_per_token, kv_fixed_overhead, parse_method, resolve_hardware,
                           resolve_model)

D = 128  # LLaMA-2-7B head dim
FULL = 2 * D * 2  # K and V of one token, one head, fp16 = 512 bytes


@pytest.mark.parametrize("name", ["llama-2-7b", "meta-llama/Llama-2-7b-hf", "meta-llama-Llama-2-7b-hf",
                                  "Llama-2-7b", "LLAMA_2_7B"])
def test_model_names_resolve(name):
    assert resolve_model(name).name == "llama-2-7b"


@pytest.mark.parametrize("name,short", [("meta-llama-Meta-Llama-3-8B", "llama-3-8b"),
                                        ("mistralai-Mistral-7B-v0.1", "mistral-7b"),
                                        ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
                                        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
                                        ("meta-llama/Llama-2-70b-hf", "llama-2-70b")])
def test_hub_ids_resolve(name, short):
    assert resolve_model(name).name == short


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="llama-2-7b"):
        resolve_model("gpt-9")


def test_parameter_counts_match_published_sizes():
    # LLaMA-2-7B: 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 2 x 32000 x 4096 + 4096
    assert resolve_model("llama-2-7b").num_params == 6_738_415_616
    assert resolve_model("llama-2-7b").weight_bytes == 2 * 6_738_415_616
    assert round(resolve_model("mistral-7b").num_params / 1e9, 2) == 7.24
    assert round(resolve_model("llama-3-8b").num_params / 1e9, 2) == 8.03
    assert round(resolve_model("llama-2-70b").num_params / 1e9, 1) == 69.0
    assert round(resolve_model("smollm2-135m").num_params / 1e6, 1) == 134.5  # tied embeddings


def test_hardware_specs_and_device_matching():
    a6000 = resolve_hardware("A6000")
    assert (a6000.memory_bytes, a6000.mem_bandwidth) == (48e9, 768e9)
    assert resolve_hardware("h100").name == "h100-sxm"
    assert hardware_for_device("NVIDIA RTX A6000").name == "a6000"
    assert hardware_for_device("NVIDIA H100 80GB HBM3").name == "h100-sxm"
    assert hardware_for_device("NVIDIA L40S").name == "l40s"
    assert hardware_for_device("NVIDIA L4").name == "l4"
    assert hardware_for_device("NVIDIA A100-SXM4-80GB").name == "a100-80g"
    assert hardware_for_device("NVIDIA A100-SXM4-40GB").name == "a100-40g"
    with pytest.raises(KeyError):
        resolve_hardware("tpu-v9")


def test_fp16_bytes():
    m = resolve_model("llama-2-7b")
    assert kv_bytes(m, parse_method("fp16"), 1000, 1000) == 1000 * 32 * 32 * FULL == 524_288_000
    assert kv_bytes(m, parse_method("fp16"), 1000, 1000, tp=2) == 262_144_000
    # GQA: LLaMA-2-70B keeps 8 KV heads over 80 layers
    assert kv_bytes_per_token(resolve_model("llama-2-70b"), parse_method("fp16")) == 2 * 80 * 8 * 128 * 2


def test_kivi_bytes_by_hand():
    kivi4 = parse_method("kivi-4")
    # n=1000, R=128, G=32: quantized = (1000-128)//32*32 = 864, full precision = 136
    fp = 136 * FULL                      # 69,632
    payload = 2 * 864 * D * 4 // 8       # 110,592
    key_scales = 864 // 32 * D * 2 * 2   # 13,824: (scale, zero) per channel per 32 tokens
    val_scales = 864 * (D // 32) * 2 * 2  # 13,824: (scale, zero) per token per 32 channels
    assert fp + payload + key_scales + val_scales == 207_872
    assert kv_bytes_per_head(kivi4, D, 1000, 1000) == 207_872
    assert kv_bytes(resolve_model("llama-2-7b"), kivi4, 1000, 1000) == 207_872 * 1024
    # below the residual window nothing is quantized
    assert kv_bytes_per_head(parse_method("kivi-2"), D, 100, 100) == 100 * FULL
    # marginal bytes per token: 4-bit payload 128 + key scales 16 + value scales 16, per head
    assert kv_bytes_per_token(resolve_model("llama-2-7b"), kivi4) == 160 * 1024
    assert kv_bytes_per_token(resolve_model("llama-2-7b"), parse_method("kivi-2")) == (64 + 32) * 1024


def test_gear_bytes_by_hand():
    gear = parse_method("gear-4")
    # prefill segment of 864 quantized tokens: rank ceil(0.02 * min(864, 128)) = 3,
    # low-rank (864 + 128) * 3 * 2 = 5,952 bytes, outliers ceil(0.02 * 864 * 128) = 2,212
    # at 2 + 4 bytes = 13,272; K and V: 2 * (5,952 + 13,272) = 38,448
    assert kv_bytes_per_head(gear, D, 1000, 1000) == 207_872 + 38_448
    # 64 decode tokens later: quantized 928 (two more groups of 32, rank 1, 82 outliers each:
    # 2 * ((32 + 128) * 2 + 82 * 6) = 1,624 per group); KIVI part at 1064 tokens = 218,112
    assert kv_bytes_per_head(gear, D, 1000, 1064) == 218_112 + 38_448 + 2 * 1_624


def test_eviction_bytes_by_hand():
    assert kv_bytes_per_head(parse_method("streamingllm-512"), D, 3000, 3100) == 512 * FULL
    assert kv_bytes_per_head(parse_method("h2o-512"), D, 3000, 3100) == 512 * (FULL + 4)  # + fp32 score
    assert kv_bytes_per_head(parse_method("snapkv-1024"), D, 3000, 3100) == (1024 + 100) * FULL
    assert kv_bytes_per_head(parse_method("snapkv-1024"), D, 500, 600) == 600 * FULL
    assert kv_bytes_per_head(parse_method("h2o-512"), D, 100, 200) == 200 * (FULL + 4)


def test_fixed_overhead_covers_the_residual_window():
    m = resolve_model("llama-2-7b")
    kivi = parse_method("kivi-4")
    per = kv_bytes_per_token(m, kivi)
    over = kv_fixed_overhead(m, kivi)
    for n in range(1, 3000, 7):
        assert kv_bytes(m, kivi, n, n) <= per * n + over + 1e-6
    assert kv_fixed_overhead(m, parse_method("fp16")) == 0


def test_cached_tokens_vec_matches_scalar():
    prompt = np.array([10, 600, 3000, 3000])
    total = prompt + np.array([0, 5, 100, 2000])
    for label in ("fp16", "kivi-4", "streamingllm-512", "h2o-512", "snapkv-1024"):
        m = parse_method(label)
        want = [m.cached_tokens(int(p), int(t)) for p, t in zip(prompt, total)]
        assert cached_tokens_vec(m, prompt, total).tolist() == want


@pytest.mark.parametrize("text,label", [("kivi", "kivi-4"), ("KIVI-2", "kivi-2"), ("gear-8", "gear-8"),
                                        ("stream", "streamingllm-512"), ("h2o-1024", "h2o-1024"),
                                        ("snapkv-2048", "snapkv-2048"), ("none", "fp16")])
def test_parse_method(text, label):
    assert parse_method(text).label == label


@pytest.mark.parametrize("bad", ["kivi-3", "zip", "fp16-4"])
def test_bad_methods_are_refused(bad):
    with pytest.raises(ValueError):
        parse_method(bad)


def test_h2o_split_keeps_heavy_hitters_at_an_eighth():
    m = parse_method("h2o-1024")
    assert (m.heavy, m.recent, m.token_cap) == (64, 960, 1024)
    assert math.isclose(parse_method("streamingllm-256").sink, 32)


@pytest.mark.parametrize("label", ["kivi-2", "kivi-4", "kivi-8", "gear-2", "gear-4"])
def test_bytes_parts_add_up_to_bytes_per_head_exactly(label):
    """spec.bytes_parts (a function of the context plus one of the prompt) must give the very
    integers bytes_per_head gives: the simulator's block tables are built from it."""
    import numpy as np
    from rkvsim.models import parse_method
    from rkvsim.models.methods import method_from_entry
    kind, bits = label.split("-")
    for m in (parse_method(label), method_from_entry({"kind": kind, "bits": int(bits), "group_size": 64, "residual": 32})):
        f_total, f_prompt = m.spec.bytes_parts
        p = np.arange(0, 2500, 3)[:, None]
        t = p + np.arange(0, 2500, 7)[None, :]
        for hd in (64, 128):
            want = m.spec.bytes_per_head(m, hd, p, t, 2)
            got = f_total(m, hd, t, 2) + (0 if f_prompt is None else f_prompt(m, hd, p, 2))
            assert got.dtype == np.int64 and np.array_equal(got, want), (m.label, hd)


@pytest.mark.parametrize("label", ["kivi-2", "kivi-4", "gear-4", "fp16", "streamingllm-512", "h2o-512", "snapkv-1024"])
@pytest.mark.parametrize("whole", [True, False])
def test_kv_layout_tables_give_the_formula_blocks(label, whole):
    import numpy as np
    from dataclasses import replace
    from rkvsim.models import parse_method, resolve_hardware, resolve_model
    from rkvsim.simulator.kv_memory import kv_layout
    lay = kv_layout(resolve_model("llama-2-7b"), resolve_hardware("a6000"), parse_method(label), 1, 16, 0.9, 4096, 64,
                    exact=True, whole_windows=whole)
    formula = replace(lay)
    object.__setattr__(formula, "_parts", None)
    object.__setattr__(formula, "_by_ctx", False)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 3000, 500)
    ctx = prompt + rng.integers(0, 6000, 500)         # past the first table's size: it grows
    np.testing.assert_array_equal(lay.decode_blocks_vec(prompt, ctx), formula.decode_blocks_vec(prompt, ctx))
    np.testing.assert_array_equal(lay.prefill_blocks_vec(ctx), formula.prefill_blocks_vec(ctx))
    assert all(lay.decode_blocks(int(a), int(b)) == formula.decode_blocks(int(a), int(b)) for a, b in zip(prompt[:50], ctx[:50]))
    assert all(lay.prefill_blocks(int(a)) == formula.prefill_blocks(int(a)) for a in ctx[:50])
    # one request's blocks (a plain layout computes them without the tables) are the arrays' too
    assert [lay.decode_blocks(int(a), int(b)) for a, b in zip(prompt[:50], ctx[:50])] == \
        lay.decode_blocks_vec(prompt[:50], ctx[:50]).tolist()
    assert [lay.prefill_blocks(int(a)) for a in ctx[:50]] == lay.prefill_blocks_vec(ctx[:50]).tolist()


@pytest.mark.parametrize("exact", [True, False])
def test_a_layout_without_decode_shrinks_never_lowers_a_requests_blocks(exact):
    """KVLayout.decode_shrinks False lets the replica skip its shrink checks: over every method,
    such a layout's decode blocks never fall from one context to the next, and the methods whose
    blocks do fall (a window, a quantizer's fold) say so."""
    import numpy as np
    from rkvsim.models import kinds, parse_method, resolve_hardware, resolve_model
    from rkvsim.models.methods import default_method
    from rkvsim.simulator.kv_memory import kv_layout
    labels = [*kinds(), "kivi-2", "gear-4", "streamingllm-512", "h2o-512", "snapkv-1024"]
    prompt = np.repeat(np.arange(1, 1500, 37), 1)[:, None]
    ctx = prompt + np.arange(0, 1200)[None, :]
    fell = set()
    for label in labels:
        m = parse_method(label) if "-" in label else default_method(label)
        lay = kv_layout(resolve_model("llama-2-7b"), resolve_hardware("a6000"), m, 1, 16, 0.9, 4096, 64, exact=exact)
        blocks = lay.decode_blocks_vec(np.broadcast_to(prompt, ctx.shape), ctx)
        falls = bool((np.diff(blocks, axis=1) < 0).any())
        assert not falls or lay.decode_shrinks, f"{label}: blocks fall but decode_shrinks is False"
        if falls:
            fell.add(m.kind)
    if exact:
        assert {"kivi", "streamingllm"} <= fell, fell     # the check can fail: shrinking methods are found
