"""`rkvprof collect`: plan every row, skip those a previous run finished, time the rest."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rkvsim.models import Method, ModelSpec

from rkvsim.profiler import device as devmod
from rkvsim.profiler.attention_ops import attention_tasks, default_kernel_factory
from rkvsim.profiler.compression_ops import compression_tasks
from rkvsim.profiler.dense_ops import dense_tasks
from rkvsim.profiler.grids import Grid, attention_heads
from rkvsim.profiler.meta import collected_meta, mismatch, now_utc
from rkvsim.profiler.schema import META_FILE, TABLES
from rkvsim.models.files import read_json_if_exists, write_json
from rkvsim.profiler.store import TableWriter
from rkvsim.profiler.tasks import Context, Task

PARTS = ("operators", "attention", "compression")


@dataclass
class CollectConfig:
    model: ModelSpec
    methods: list[Method]
    grid: Grid
    out: Path
    device: str | None = None        # None: cuda when available, else cpu
    gpu: str | None = None           # the hardware the user says this is
    attention_q_heads: int | None = None
    threads: int | None = None
    parts: tuple[str, ...] = PARTS
    progress: bool = False
    # Tests inject a stand-in; normally rkvsim.kernels.make_kernel.
    kernel_factory: Callable[[Method], object] | None = None
    kernel_source: str = "rkvsim.kernels"
    seed: int = 0


@dataclass
class CollectResult:
    out: Path
    planned: int
    skipped: int
    measured: int
    wall_s: float
    rows: dict = field(default_factory=dict)


def _plan(cfg: CollectConfig, ctx: Context, heads) -> list[Task]:
    tasks: list[Task] = []
    if "operators" in cfg.parts:
        tasks += dense_tasks(cfg.model, cfg.grid, ctx)
    if "attention" in cfg.parts:
        factory = cfg.kernel_factory or default_kernel_factory()
        tasks += attention_tasks(cfg.model, cfg.methods, cfg.grid, heads, ctx, factory)
    if "compression" in cfg.parts:
        tasks += compression_tasks(cfg.model, cfg.methods, cfg.grid, heads, ctx)
    # Two grid points can map to the same row (e.g. prompts quantizing the same token count).
    unique, seen = [], set()
    for t in tasks:
        if (t.table.name, t.key) not in seen:
            seen.add((t.table.name, t.key))
            unique.append(t)
    return unique


def _load() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the host inflate CPU timings, and a
    reader of the profile should be able to see that they were there."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _merge_methods(existing: dict | None, meta: dict) -> None:
    """A rerun may add methods to a profile; meta lists all methods it holds."""
    if not existing:
        return
    labels = list(existing.get("methods", []))
    labels += [m for m in meta["methods"] if m not in labels]
    settings = dict(existing.get("method_settings", {}))
    settings.update(meta["method_settings"])
    meta["methods"], meta["method_settings"] = labels, settings
    meta["started"] = existing.get("started", meta["started"])
    meta["runs"] = list(existing.get("runs", []))


def _progress(enabled: bool, total: int):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def collect(cfg: CollectConfig) -> CollectResult:
    import torch

    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = devmod.detect(cfg.device)
    hardware = devmod.hardware_name(info, cfg.gpu)
    dtype = torch.float16 if info.kind == "cuda" else torch.float32  # CPU fp16 GEMMs are ~500x slower
    try:
        heads = attention_heads(cfg.model, info.kind, cfg.attention_q_heads)
    except ValueError as e:
        raise devmod.ProfilerError(str(e)) from None
    ctx = Context(info.device, dtype, cfg.grid.policy)

    meta = collected_meta(model=cfg.model, methods=cfg.methods, hardware=hardware, device=info,
                          grid=cfg.grid, dtype=ctx.dtype_name, heads=heads, kernel_source=cfg.kernel_source)
    run = {"started": now_utc(), "load_avg_at_start": _load()}
    meta.update(started=run["started"], status="running", runs=[])
    cfg.out.mkdir(parents=True, exist_ok=True)
    meta_path = cfg.out / META_FILE
    existing = read_json_if_exists(meta_path)
    if existing is not None:
        why = mismatch(existing, meta)
        if why:
            raise devmod.ProfilerError(f"cannot resume into {cfg.out}: {why}")
    elif any((cfg.out / TABLES[p].filename).exists() for p in PARTS):
        raise devmod.ProfilerError(f"{cfg.out} holds tables but no {META_FILE}; use an empty --out")
    _merge_methods(existing, meta)
    write_json(meta_path, meta, sort_keys=True, default=str)

    writers = {name: TableWriter(cfg.out, TABLES[name]) for name in PARTS}
    torch.manual_seed(cfg.seed)
    tasks = _plan(cfg, ctx, heads)
    pending = [t for t in tasks if t.key not in writers[t.table.name]]
    skipped = len(tasks) - len(pending)
    oom: list[dict] = []
    try:
        with _progress(cfg.progress, len(pending)) as bar:
            job = bar.add_task("profiling", total=len(pending))
            for task in pending:
                bar.update(job, description=f"{task.table.name}: {task.label}")
                row = _execute(task)
                if row is None:
                    oom.append({"table": task.table.name, "task": task.label})
                else:
                    writers[task.table.name].append(row)
                bar.advance(job)
    finally:
        for w in writers.values():
            w.close()

    rows = {name: len(w.keys) for name, w in writers.items()}
    wall = time.perf_counter() - t0
    # Rows that did not fit in memory are listed, never invented; a rerun retries them.
    meta["out_of_memory"] = oom
    # One entry per invocation, so a resumed profile shows every run that added rows to it.
    run.update(finished=now_utc(), load_avg_at_end=_load(), planned=len(tasks), skipped=skipped,
               measured=len(pending), wall_s=round(wall, 3))
    meta["runs"].append(run)
    meta.update(status="complete" if not oom else "incomplete", finished=run["finished"], rows=rows)
    write_json(meta_path, meta, sort_keys=True, default=str)
    return CollectResult(cfg.out, len(tasks), skipped, len(pending), wall, rows)


def _execute(task: Task) -> dict | None:
    """The task's row, or None when the configuration does not fit in device memory."""
    import torch
    try:
        return task.execute()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def print_summary(res: CollectResult, file=None) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in res.rows.items())
    print(f"rkvprof: {res.out}: measured {res.measured}, kept {res.skipped} from before, "
          f"{res.wall_s:.1f} s; rows: {counts}", file=file or sys.stdout)
