"""rkvprof: collection end to end, resume after kill -9, hardware refusal, Vidur import."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("torch")

from rkvsim.cli.main import rkvprof  # noqa: E402
from rkvsim.profiler.device import DeviceInfo, ProfilerError, hardware_name  # noqa: E402
from rkvsim.profiler.schema import SCHEMA_VERSION, TABLES  # noqa: E402

MODEL = "smollm2-135m"
METHODS = "fp16,kivi,gear,streamingllm,h2o,snapkv"
TABLE_NAMES = ("operators", "attention", "compression")


def collect_argv(out: Path, *extra: str) -> list[str]:
    return ["collect", "--model", MODEL, "--methods", METHODS, "--grid", "tiny", "--out", str(out),
            "--no-progress", *extra]


def read_tables(folder: Path) -> dict[str, pd.DataFrame]:
    return {n: pd.read_csv(folder / TABLES[n].filename) for n in TABLE_NAMES}


def keys(df: pd.DataFrame, name: str) -> list[tuple]:
    return [tuple(map(str, r)) for r in df[list(TABLES[name].key)].itertuples(index=False)]


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "prof"
    assert rkvprof(collect_argv(out)) == 0
    return out


def test_tiny_grid_writes_tables_and_meta(tiny_profile):
    meta = json.loads((tiny_profile / "meta.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["status"] == "complete"
    assert meta["hardware"] == "cpu" and meta["device_kind"] == "cpu"
    assert meta["device_name"] and meta["device"]["cpu_model"] and meta["torch_threads"] >= 1
    assert meta["model"] == MODEL and meta["grid"]["name"] == "tiny"
    assert meta["versions"]["torch"] and meta["versions"]["rkvsim"]
    assert len(meta["methods"]) == 6 and meta["reductions"] == []
    tables = read_tables(tiny_profile)
    for name, df in tables.items():
        assert list(df.columns) == list(TABLES[name].columns)
        assert (df["schema_version"] == SCHEMA_VERSION).all()
        assert len(set(keys(df, name))) == len(df), f"duplicate keys in {name}"
        assert (df["time_s_median"] > 0).all() and (df["time_s_p10"] <= df["time_s_p90"]).all()
        assert meta["rows"][name] == len(df)
    att = tables["attention"]
    # 6 methods x (2 batch x (2 prompt prefills + 1 chunk on a past) + 2 batch x 2 kv decodes),
    # real model heads.
    assert len(att) == 6 * 10
    assert set(att["method"]) == {"fp16", "kivi-4", "gear-4", "streamingllm-512", "h2o-512", "snapkv-1024"}
    assert set(att["num_q_heads"]) == {9} and set(att["num_kv_heads"]) == {3} and set(att["head_dim"]) == {64}
    # Quantized caches are smaller than fp16's for the same prompt.
    pre = att[(att.stage == "prefill") & (att.batch_size == 2) & (att.new_tokens == 192)].set_index("method")
    assert pre.loc["kivi-4", "cache_nbytes"] < pre.loc["fp16", "cache_nbytes"]
    ops = tables["operators"]
    assert {"attn_pre_proj", "mlp_up_proj", "mlp_down_proj", "input_layernorm", "attn_rope", "emb",
            "lm_head"} <= set(ops["op"])
    comp = tables["compression"]
    assert {"quantize_segment", "quantize_on_append", "compress_segment", "evict", "update_scores"} <= set(comp["op"])


def test_tiny_grid_times_chunks_on_a_past(tiny_profile):
    """Prefill rows with kv_len > 0: a 64-token chunk ending a 224-token prompt whose first
    160 tokens are cached; the cache after it is the method's for the whole prompt."""
    from rkvsim.models import Method

    from rkvsim.models import kv_bytes_per_head, parse_method, quantized_tokens
    from rkvsim.models.kv_bytes import gear_segment_bytes

    tables = read_tables(tiny_profile)
    att = tables["attention"]
    chunks = att[(att.stage == "prefill") & (att.kv_len > 0)]
    assert set(zip(chunks.kv_len, chunks.new_tokens)) == {(160, 64)} and len(chunks) == 6 * 2
    assert (chunks.cache_tokens == 224).all()  # per sequence; no method caps 224 tokens
    row = chunks[chunks.batch_size == 2].set_index("method")
    per_seq = 2 * 3  # batch x KV heads; fp32 on CPU
    for label in ("fp16", "kivi-4", "streamingllm-512", "h2o-512", "snapkv-1024"):
        m = parse_method(label)
        assert row.loc[label, "cache_nbytes"] == per_seq * kv_bytes_per_head(m, 64, 224, 224, 4), label
    gear = parse_method("gear-4")
    segments = (quantized_tokens(gear, 160), quantized_tokens(gear, 224) - quantized_tokens(gear, 160))
    expect = kv_bytes_per_head(Method("kivi", bits=gear.bits, group_size=gear.group_size, residual=gear.residual), 64, 224, 224, 4) + sum(
        gear_segment_bytes(gear, s, 64, 4) for s in segments)
    assert row.loc["gear-4", "cache_nbytes"] == per_seq * expect
    # The chunk's quantization event is also timed alone (kv_len 0: independent of the past).
    comp = tables["compression"]
    seg = comp[(comp.op == "compress_segment") & (comp.kv_len == 0)]
    assert segments[1] in set(seg.num_tokens)


def test_rerun_of_complete_profile_measures_nothing(tiny_profile, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_profile, copy)
    before = {n: (copy / TABLES[n].filename).read_bytes() for n in TABLE_NAMES}
    assert rkvprof(collect_argv(copy)) == 0
    assert "measured 0" in capsys.readouterr().out
    assert before == {n: (copy / TABLES[n].filename).read_bytes() for n in TABLE_NAMES}


def _data_rows(folder: Path) -> int:
    total = 0
    for n in TABLE_NAMES:
        p = folder / TABLES[n].filename
        if p.exists():
            total += max(0, p.read_bytes().count(b"\n") - 1)
    return total


def test_resume_after_kill_9(tiny_profile, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rkvsim.cli.rkvprof", *collect_argv(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _data_rows(out) < 30 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    total = sum(len(df) for df in read_tables(tiny_profile).values())
    done_before = _data_rows(out)
    assert 0 < done_before < total, "the collection should have been killed part-way"
    kept = {n: (out / TABLES[n].filename).read_bytes() for n in TABLE_NAMES if (out / TABLES[n].filename).exists()}
    assert json.loads((out / "meta.json").read_text())["status"] == "running"

    assert rkvprof(collect_argv(out)) == 0
    for n, data in kept.items():  # finished rows survive untouched
        assert (out / TABLES[n].filename).read_bytes().startswith(data.rsplit(b"\n", 1)[0])
    again, full = read_tables(out), read_tables(tiny_profile)
    for n in TABLE_NAMES:
        assert len(set(keys(again[n], n))) == len(again[n]), f"duplicates in {n}"
        assert set(keys(again[n], n)) == set(keys(full[n], n))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["runs"][-1]["skipped"] >= done_before


def test_torn_last_line_is_cut_and_remeasured(tiny_profile, tmp_path):
    out = tmp_path / "torn"
    shutil.copytree(tiny_profile, out)
    path = out / "attention.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    # Drop the last 5 rows and leave half of a sixth, as a kill mid-write would.
    path.write_bytes(b"".join(lines[:-6]) + lines[-6][: len(lines[-6]) // 2])
    assert rkvprof(collect_argv(out)) == 0
    df = pd.read_csv(path)
    assert len(df) == len(set(keys(df, "attention"))) == len(pd.read_csv(tiny_profile / "attention.csv"))
    assert not df.isna().all(axis=1).any()


def test_refuses_to_resume_into_another_models_profile(tiny_profile, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(tiny_profile, out)
    argv = collect_argv(out)
    argv[argv.index(MODEL)] = "llama-2-7b"
    assert rkvprof(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model" in err


def test_gpu_claim_on_cpu_is_refused_in_one_line(tmp_path, capsys):
    rc = rkvprof(collect_argv(tmp_path / "x", "--gpu", "a6000"))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "a6000" in err
    assert not (tmp_path / "x" / "meta.json").exists()


def test_gpu_claim_in_subprocess_exit_code():
    r = subprocess.run([sys.executable, "-m", "rkvsim.cli.rkvprof", "collect", "--model", MODEL, "--grid", "tiny",
                        "--out", "/nonexistent/never-written", "--gpu", "a6000", "--device", "cpu"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_hardware_name_matches_detected_gpu():
    a6000 = DeviceInfo("cuda", "cuda:0", "NVIDIA RTX A6000")
    assert hardware_name(a6000, None) == "a6000"
    assert hardware_name(a6000, "a6000") == "a6000"
    with pytest.raises(ProfilerError):
        hardware_name(a6000, "h100")
    assert hardware_name(DeviceInfo("cuda", "cuda:0", "NVIDIA Odd GPU 9"), None) == "nvidia-odd-gpu-9"
    with pytest.raises(ProfilerError):
        hardware_name(DeviceInfo("cuda", "cuda:0", "NVIDIA Odd GPU 9"), "a6000")
    cpu = DeviceInfo("cpu", "cpu", "Some CPU")
    assert hardware_name(cpu, "cpu") == hardware_name(cpu, None) == "cpu"


def test_attention_timer_with_stand_in_kernel(tmp_path):
    """The timer only needs the kernel interface (prefill/decode, cache.num_tokens/nbytes)."""
    import torch

    from rkvsim.models import default_method, resolve_model
    from rkvsim.profiler.collect import CollectConfig, collect
    from rkvsim.profiler.grids import get_grid

    class Cache:
        def __init__(self, k):
            self.k = k

        @property
        def num_tokens(self):
            return self.k.shape[2]

        @property
        def nbytes(self):
            return 2 * self.k.numel() * self.k.element_size()

    class StandIn:
        def prefill(self, q, k, v, last=True):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), Cache(k)

        def extend(self, q, k, v, cache, last=True):
            return q, Cache(torch.cat([cache.k, k], dim=2))

        def decode(self, q, k, v, cache):
            return q, Cache(torch.cat([cache.k, k], dim=2))

    cfg = CollectConfig(model=resolve_model(MODEL), methods=[default_method("fp16")], grid=get_grid("tiny"),
                        out=tmp_path / "standin", parts=("attention",), kernel_factory=lambda m: StandIn(),
                        kernel_source="test stand-in")
    res = collect(cfg)
    df = pd.read_csv(tmp_path / "standin" / "attention.csv")
    assert res.measured == len(df) == 10
    dec = df[(df.stage == "decode") & (df.kv_len == 192) & (df.batch_size == 2)].iloc[0]
    assert dec.cache_tokens == 193 and dec.cache_nbytes == 2 * 2 * 3 * 193 * 64 * 4
    chunk = df[(df.stage == "prefill") & (df.kv_len == 160) & (df.batch_size == 2)].iloc[0]
    assert chunk.new_tokens == 64 and chunk.cache_tokens == 224


def test_cpu_reduces_heads_of_big_models_and_says_so():
    from rkvsim.models import resolve_model
    from rkvsim.profiler.grids import attention_heads

    h = attention_heads(resolve_model("llama-2-7b"), "cpu")
    assert h.reduced and h.num_q_heads == h.num_kv_heads < 32
    assert not attention_heads(resolve_model("llama-2-7b"), "cuda").reduced
    g = attention_heads(resolve_model("llama-3-8b"), "cpu")
    assert g.num_q_heads // g.num_kv_heads == 4


def test_schema_has_one_version_and_keys_in_columns():
    for t in TABLES.values():
        assert t.columns[0] == "schema_version"
        assert set(t.key) <= set(t.columns)
        assert {"time_s_median", "time_s_p10", "time_s_p90", "repeats"} <= set(t.columns)


@pytest.fixture(scope="module")
def vidur_import(shared_dir, tmp_path_factory):
    src = shared_dir / "data" / "rethink-kv" / "profiles" / "a6000"
    out = tmp_path_factory.mktemp("vidur") / "a6000"
    rc = rkvprof(["import-vidur", str(src), "--gpu", "a6000", "--model", "meta-llama/Llama-2-7b-hf",
                   "--out", str(out)])
    assert rc == 0
    return src, out


def test_import_vidur_covers_five_methods_with_plausible_times(vidur_import):
    src, out = vidur_import
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "vidur-import" and meta["hardware"] == "a6000"
    assert meta["source_path"] == str(src.resolve()) and meta["schema_version"] == SCHEMA_VERSION
    assert all(len(f["sha256"]) == 64 for f in meta["files"].values())
    assert "Llama-2-7b-hf/mlp.csv" in meta["files"]
    att = pd.read_csv(out / "attention.csv")
    assert (att["schema_version"] == SCHEMA_VERSION).all()
    methods = {"fp16", "kivi-4", "gear-4", "h2o-512", "streamingllm-512"}
    assert set(att["method"]) == methods
    assert len(set(keys(att, "attention"))) == len(att)
    for m in methods:
        for stage in ("prefill", "decode"):
            rows = att[(att.method == m) & (att.stage == stage)]
            assert len(rows) > 1000
            # Seconds, not ms: one LLaMA-7B layer's attention on an A6000 is microseconds to ms.
            assert rows.time_s_median.between(1e-6, 0.05).all()
    dec = att[(att.method == "fp16") & (att.stage == "decode")]
    small = dec[(dec.batch_size == 1) & (dec.kv_len == dec.kv_len.min())].time_s_median.iloc[0]
    big = dec[(dec.batch_size == dec.batch_size.max()) & (dec.kv_len == dec.kv_len.max())].time_s_median.iloc[0]
    assert big > 10 * small
    # Heavy KV: KIVI decodes faster than fp16 (the paper's observation 2).
    heavy = att[(att.stage == "decode") & (att.batch_size == 64) & (att.kv_len == 2048)].set_index("method")
    assert heavy.loc["kivi-4", "time_s_median"] < heavy.loc["fp16", "time_s_median"]
    ops = pd.read_csv(out / "operators.csv")
    shared = ops[ops.method == "all"]
    assert set(shared.tp) == {1, 2, 4} and len(set(keys(ops, "operators"))) == len(ops)
    up = shared[(shared.op == "mlp_up_proj") & (shared.tp == 1) & (shared.num_tokens == 4096)].time_s_median.iloc[0]
    assert 1e-3 < up < 2e-2  # ~6.7 ms in the CSV


def test_import_vidur_refuses_unknown_gpu(shared_dir, tmp_path, capsys):
    src = shared_dir / "data" / "rethink-kv" / "profiles" / "a6000"
    assert rkvprof(["import-vidur", str(src), "--gpu", "b9000", "--model", "llama-2-7b", "--out", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_load_profile_refuses_other_hardware_and_model(tiny_profile):
    from rkvsim.profiler.profile import load_profile

    prof = load_profile(tiny_profile, hardware="cpu", model=MODEL)
    assert prof.origin.startswith("profile:cpu@") and set(prof.tables) == set(TABLE_NAMES)
    with pytest.raises(ProfilerError, match="a6000"):
        load_profile(tiny_profile, hardware="a6000")
    with pytest.raises(ProfilerError):
        load_profile(tiny_profile, model="llama-2-7b")


def test_packaged_cpu_profiles_are_small_complete_and_loadable():
    from rkvsim.profiler.profile import load_profile, packaged_profiles

    folders = packaged_profiles()
    if not folders:
        pytest.skip("no packaged profiles under profiler/data")
    for folder in folders:
        prof = load_profile(folder)
        if prof.meta.get("source") == "vidur-import":
            # Imported GPU profiles (tests/test_transfer.py checks they are what the importer computes).
            assert prof.meta["provenance"]["repository"] == "microsoft/vidur" and len(prof.meta["models"]) >= 6
            assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 2_500_000
            assert "operators" in prof.tables
            continue
        assert prof.meta["grid"]["name"] == "quick" and prof.meta["out_of_memory"] == []
        assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000
        assert {"attention", "operators", "compression"} <= set(prof.tables)
        if prof.meta["model"] == "llama-2-7b" and prof.meta["hardware"] == "cpu":
            # Heads were cut on the CPU: meta says so and every row states the heads it timed.
            assert prof.meta["reductions"][0]["what"] == "attention_heads"
            assert set(prof.tables["attention"].num_q_heads) == {prof.meta["attention_heads_profiled"]["num_q_heads"]}
