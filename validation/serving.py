"""`rkvsim validate-serving`: a real llama-server against the simulator, on one workload.

1. The scenario (scheduler kind slots) is loaded and its workload sampled with its seed:
   arrival times, prompt and output lengths, exactly what `rkvsim run` simulates.
2. The engine (rkvprof engine build) and an engine profile for this machine are found, or
   built / collected (quick grid) first, saying so.
3. llama-server starts with the scenario's settings and the method's KV type, pinned to its
   `threads` cores (the load generator gets the others, profiler.cpu_affinity); a short
   batched-bench probe (validation.serving_probe) times the host before and after the replay
   (validation.serving_client); the server is stopped, always.
4. The same workload is simulated with the engine profile's step costs, as profiled and
   scaled to the speed the probes measured; the probes' drift says whether the cell can
   verify a forecast at all.
5. Measured and simulated figures are compared (validation.serving_compare) and written as
   validation_serving.json (atomically), requests_measured.csv and an HTML report.
"""
from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rkvsim.models.files import atomic_write
from rkvsim.profiler.engine_bench import BenchSettings
from rkvsim.profiler.engine_build import EngineBuild, build_engine, cpu_name, find_engine
from rkvsim.profiler.engine_collect import ENGINE_GRIDS, EngineCollectConfig, collect_engine, model_gguf, profile_key
from rkvsim.models.files import cache_dir, read_json_if_exists, write_json
from rkvsim.simulator.config import Scenario
from rkvsim.simulator.pipeline import run_scenario
from rkvsim.simulator.simulation import build_workload
from rkvsim.simulator.llamacpp_cost import packaged_engine_profiles

from rkvsim.profiler.llamacpp_server import running_server, server_args
from rkvsim.validation.serving_client import replay
from rkvsim.validation.serving_compare import error_pct, measured_summary, simulated_summary
from rkvsim.validation.serving_prompts import PromptBank
from rkvsim.validation.serving_probe import (DRIFT_MAX_PCT, drift, plan_probe, profile_points, run_probe,
                                             scale_at_replay, speed, write_scaled_profile)
from rkvsim.profiler.cpu_affinity import pinned, split
from rkvsim.simulator.llamacpp_cost import read_engine_profile

RESULT_FILE = "validation_serving.json"
TOKENS_FILE = "tokens_measured.json"
SCHEMA_VERSION = 2     # 2: probes, the simulation at the probed speed, core pinning


class ValidationError(RuntimeError):
    """A run that cannot be done; one line naming the cause and the fix."""


def profile_cache_root() -> Path:
    return cache_dir() / "engine-profiles"


def bench_settings(sched) -> BenchSettings:
    return BenchSettings(n_batch=sched.n_batch, n_ubatch=sched.n_ubatch, threads=sched.threads,
                         flash_attn="on" if sched.flash_attn else "off", poll=sched.poll,
                         pin=sched.pin)


def _matches(meta: dict | None, eng: EngineBuild, sha: str, settings: BenchSettings, kv: set[str]) -> bool:
    """Is this engine profile a measurement of this machine, engine build, model and settings?"""
    if not meta or meta.get("status") != "complete":
        return False
    s = meta.get("settings", {})
    return (meta.get("llamacpp_commit") == eng.info.get("llamacpp_commit") and meta.get("model_sha256") == sha
            and meta.get("cpu") == cpu_name() and meta.get("threads") == settings.threads
            and all(s.get(k) == getattr(settings, k) for k in ("n_batch", "n_ubatch", "threads", "flash_attn", "poll"))
            and kv <= set(meta.get("kv_types", [])))


def engine_profile_for(scn: Scenario, eng: EngineBuild, say=print) -> Path:
    """The scenario's `profile:` if set; else a shipped or cached engine profile measured on this
    machine with these settings; else a quick-grid collection into the cache (said aloud)."""
    kv = {m.kind for m in scn.method_list}
    if scn.profile:
        return Path(scn.profile)
    settings = bench_settings(scn.scheduler)
    _gguf, sha = model_gguf(scn.model)
    cache = profile_cache_root() / profile_key(scn.model, settings, eng, sha)
    for folder in [*packaged_engine_profiles(scn.model, scn.hardware), cache]:
        if _matches(read_json_if_exists(folder / "meta.json"), eng, sha, settings, kv):
            return folder
    say(f"validate-serving: no engine profile of this machine for KV {','.join(sorted(kv))} yet; "
        f"collecting the quick grid into {cache} (about 5 minutes per KV type on a quiet 2-core host)")
    old = read_json_if_exists(cache / "meta.json") or {}
    kv_all = sorted(kv | set(old.get("kv_types", [])))
    collect_engine(EngineCollectConfig(model=scn.model, kv_types=kv_all, grid=ENGINE_GRIDS["quick"], out=cache,
                                       settings=settings, engine=eng, progress=True), say=say)
    return cache


@dataclass
class ServingRun:
    result: dict
    measured_cols: dict
    simulated_cols: dict
    out: Path


def load_description(arrival) -> str:
    d = arrival.model_dump()
    return " ".join(f"{k}={v}" for k, v in d.items())


def validate_serving(scn: Scenario, base_dir: Path, out: Path, method_label: str | None = None,
                     deadline_s: float = 900.0, say=print, engine: EngineBuild | None = None,
                     bank: PromptBank | None = None, probe: bool = True,
                     drift_max_pct: float = DRIFT_MAX_PCT) -> ServingRun:
    if scn.scheduler.kind != "slots":
        raise ValidationError("scheduler.kind: validate-serving drives a llama.cpp server; use a scenario with "
                              "scheduler: {kind: slots, ...} such as scenarios/llamacpp_f16.yaml")
    methods = {m.label: m for m in scn.method_list}
    label = method_label or next(iter(methods))
    if label not in methods:
        raise ValidationError(f"--method {label}: the scenario's methods are {', '.join(methods)}")
    method = methods[label]
    if engine is None:
        engine = find_engine()
        if engine is None:
            say("validate-serving: llama.cpp is not built on this machine yet; building it first")
            engine = build_engine(say=say)
    profile = engine_profile_for(scn, engine, say)
    scn = scn.model_copy(update={"profile": str(profile)})
    wl = build_workload(scn, scn.seed, base_dir)
    sched = scn.scheduler
    too_long = [i for i in range(len(wl.prompt)) if wl.prompt[i] + wl.output[i] > sched.ctx_slot]
    gguf, _sha = model_gguf(scn.model)
    out.mkdir(parents=True, exist_ok=True)
    open_loop = wl.arrivals is not None

    # ---- measure ------------------------------------------------------------------------
    def argv(port: int) -> list[str]:
        return server_args(engine.server, gguf, method.kind, sched, port)

    keep = [i for i in range(len(wl.prompt)) if i not in set(too_long)]
    if too_long:
        say(f"validate-serving: {len(too_long)} requests exceed the {sched.ctx_slot}-token slot context; "
            "they are not sent (the simulator rejects them too)")
    cores = split(sched.threads, sched.pin)
    settings = bench_settings(sched)
    prof_meta, prof_rows = read_engine_profile(profile)
    plan = plan_probe(prof_rows, method.kind, wl.prompt[keep], sched.n_parallel) if probe else None
    pin_note = (f"server on core(s) {','.join(map(str, cores.engine))}, load generator on "
                f"{','.join(map(str, cores.client))}" if cores.engine else "not pinned")
    say(f"validate-serving: llama-server ({engine.label}) -np {sched.n_parallel} -c {sched.ctx_size} "
        f"-ctk/-ctv {method.kind} -t {sched.threads} ({pin_note}): replaying {len(keep)} requests "
        f"({load_description(scn.workload.arrival)})")
    t_start = time.time()
    load_before = os.getloadavg()
    probes: dict = {}

    def run_probe_now(when: str) -> None:
        # The server is idle here (before the first request, after the last), so the probe
        # times the engine's cores as the replay found them.
        if plan is not None:
            probes[when] = speed(run_probe(engine.batched_bench, gguf, plan, settings), profile_points(prof_rows, plan))

    with running_server(argv, out / "server.log", cores=cores.engine) as server:
        server_id = {"pid": server.proc.pid, "port": server.port}
        bank = bank or PromptBank(server.tokenize)
        bank.tokenize = server.tokenize
        prompts_all = bank.prompts(wl.prompt, scn.seed)
        prompts = [prompts_all[i] for i in keep]
        # Not part of the workload: warms the server and leaves its slots in LRU order 0, 1, ...
        server.warm_up(sched.n_parallel, max(prompts_all, key=len)[:256])
        arrivals = wl.arrivals[keep] if open_loop else None
        run_probe_now("before")
        from rich.progress import Progress
        with Progress(transient=True) as prog, pinned(cores.client):
            task = prog.add_task(f"{label}: requests", total=len(keep))
            ms, wall = replay(server.host, server.port, prompts, wl.output[keep], arrivals,
                              concurrency=wl.concurrency, think_time_s=wl.think_time_s, deadline_s=deadline_s,
                              on_done=lambda _m: prog.advance(task))
        run_probe_now("after")
    for m, i in zip(ms, keep):
        m.rid = i
    bad_counts = [m.rid for m in ms if m.ok and m.prompt_n not in (-1, m.prompt)]
    if bad_counts:
        raise ValidationError(f"the server evaluated other prompt lengths than sent for requests {bad_counts[:5]}")

    # ---- simulate -----------------------------------------------------------------------
    measured = measured_summary(ms, open_loop)
    probe_info = None
    if plan is not None:
        d = drift(probes["before"], probes["after"])
        probe_info = {"plan": plan.as_dict(), "before": probes["before"], "after": probes["after"],
                      "scale": scale_at_replay(probes["before"], probes["after"]), "drift_pct": d,
                      "drift_max_pct": drift_max_pct, "verifiable": d["max_abs"] <= drift_max_pct}
    sims = simulate_replay(scn, base_dir, wl, label, profile, probe_info, out, open_loop, (prof_meta, prof_rows))
    run, simulated, simulated_as_profiled = sims["run"], sims["simulated"], sims["simulated_as_profiled"]
    result = {
        "schema_version": SCHEMA_VERSION,
        "scenario": scn.name,
        "method": label,
        "requests": len(wl.prompt),
        "requests_sent": len(keep),
        "seed": scn.seed,
        "load": load_description(scn.workload.arrival),
        "engine": engine.label,
        "engine_commit": engine.info.get("llamacpp_commit"),
        "server_settings": sched.model_dump(),
        "server_process": server_id,    # stopped before the comparison is written
        "cost_source": run.cost_source,
        "engine_profile": str(profile),
        "cpu": cpu_name(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "warm_up_requests": sched.n_parallel,   # one per slot before the replay, not measured
        "replay_wall_s": wall,
        "measured": measured,
        "simulated": simulated,
        "error_pct": error_pct(measured, simulated),
        "probe": probe_info,     # None: run without probes (simulated = as profiled)
        "simulated_as_profiled": simulated_as_profiled,
        "error_pct_as_profiled": error_pct(measured, simulated_as_profiled),
        "cpu_affinity": cores.as_dict(),
        "failures": sorted({m.error for m in ms if m.error})[:10],
    }
    mcols = {"ttft_s": [m.first_token - m.sent for m in ms if m.ok], "e2e_s": [m.finish - m.sent for m in ms if m.ok],
             "tpot_s": [(m.finish - m.first_token) / (m.output - 1) for m in ms if m.ok and m.output > 1]}
    log = run.log
    done = np.isfinite(log.finish)
    scols = {"ttft_s": (log.first_token - log.arrival)[done], "e2e_s": (log.finish - log.arrival)[done],
             "tpot_s": ((log.finish - log.first_token) / np.maximum(log.output - 1, 1))[done & (log.output > 1)]}
    write_json(out / RESULT_FILE, result, sort_keys=True, default=str)
    _write_requests(out / "requests_measured.csv", ms)
    # Every token's arrival time: what validation/serving_steps.py rebuilds the server's iterations from.
    write_json(out / TOKENS_FILE, {"t0": "replay start", "unit": "s",
                                          "requests": {str(m.rid): [round(t, 6) for t in m.token_times] for m in ms}})
    from rkvsim.validation.serving_report import write_report
    write_report(out / "validation_serving.html", result, mcols, scols)
    return ServingRun(result, mcols, scols, out)


def simulate_replay(scn: Scenario, base_dir: Path, wl, label: str, profile: Path, probe_info: dict | None,
                    out: Path, open_loop: bool, profile_data: tuple[dict, list[dict]] | None = None) -> dict:
    """The replay's workload simulated as profiled and, with probes, at the probed speed: the
    profile scaled by the probes' factors, written beside the results so the figures can be
    re-derived. {"run", "simulated", "simulated_as_profiled"}; run is the one compared."""
    scn = scn.model_copy(update={"profile": str(profile)})
    (as_profiled,) = run_scenario(scn, scn.seed, base_dir, workload=wl, inflation=None, labels=[label]).runs
    run = as_profiled
    if probe_info is not None:
        meta, rows = profile_data or read_engine_profile(profile)
        scaled = write_scaled_profile(profile, rows, meta, probe_info["scale"], out / "engine_profile_at_replay")
        (run,) = run_scenario(scn.model_copy(update={"profile": str(scaled)}), scn.seed, base_dir, workload=wl,
                              inflation=None, labels=[label]).runs
    return {"run": run, "simulated": simulated_summary(run, open_loop),
            "simulated_as_profiled": simulated_summary(as_profiled, open_loop)}


def resimulate(scn: Scenario, base_dir: Path, res: dict, out: Path, profile: Path | None = None) -> dict:
    """A replay's measured side as it was; its simulated side and errors from the code (and the
    engine profile) as they are now, at the speed its probes measured then."""
    if profile is None:
        from rkvsim.profiler.engine_build import find_engine
        profile = engine_profile_for(scn, find_engine())
    wl = build_workload(scn, scn.seed, base_dir)
    open_loop = wl.arrivals is not None
    sims = simulate_replay(scn, base_dir, wl, res["method"], Path(profile), res.get("probe"), out, open_loop)
    m = res["measured"]
    res = {**res, "simulated": sims["simulated"], "simulated_as_profiled": sims["simulated_as_profiled"],
           "error_pct": error_pct(m, sims["simulated"]),
           "error_pct_as_profiled": error_pct(m, sims["simulated_as_profiled"]),
           "cost_source": sims["run"].cost_source, "engine_profile": str(profile),
           "resimulated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(out / RESULT_FILE, res, sort_keys=True, default=str)
    return res


def _write_requests(path: Path, ms: list) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["request_id", "prompt_tokens", "output_tokens", "sent_s", "first_token_s", "finish_s",
                "tokens_received", "prompt_ms", "error"])
    for m in ms:
        w.writerow([m.rid, m.prompt, m.output, m.sent, m.first_token, m.finish, m.received, m.prompt_ms, m.error or ""])
    data = buf.getvalue().encode()
    atomic_write(path, lambda f: f.write(data))

