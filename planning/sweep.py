"""`rkvsim sweep`: run every (point, seed) of a sweep not yet in OUT, on local processes or Ray,
writing each as it finishes; then the tidy table, the crossovers and the report."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rkvsim.planning.backends import default_workers, run_local, run_ray
from rkvsim.planning.crossover import Crossover, find_crossovers
from rkvsim.planning.spec import Sweep
from rkvsim.models.files import write_text
from rkvsim.planning.store import Store, part_name


@dataclass
class SweepResult:
    rows: object               # pandas DataFrame
    ran: int                   # tasks run now
    skipped: int               # tasks already in OUT (resumed)
    wall_s: float
    crossovers: list[Crossover]
    report: Path


def report_axes(sweep: Sweep, df) -> tuple[str | None, list[str] | None]:
    """The curve/crossover axis and the heatmap pair: as the file says, else the first numeric axes."""
    import pandas as pd
    numeric = [a for a in sweep.axes if a in df.columns and pd.api.types.is_numeric_dtype(df[a])]
    x = sweep.report.x or (numeric[0] if numeric else None)
    heat = sweep.report.heatmap or (list(sweep.axes)[:2] if len(sweep.axes) >= 2 else None)
    return x, heat


def run_sweep(sweep: Sweep, out: Path, backend: str = "local", workers: int | None = None,
              address: str | None = None, progress=None) -> SweepResult:
    store = Store(out, sweep)
    done = store.done()
    todo = [(pt, s) for pt, s in sweep.tasks if part_name(pt, s) not in done]
    by_id = {part_name(pt, s): (pt, s) for pt, s in todo}
    calls = [(tid, (sweep.base, sweep.base_dir, pt.overrides, s, pt.index, pt.key)) for tid, (pt, s) in by_id.items()]
    workers = workers or default_workers()
    task = progress.add_task(f"sweep {sweep.name} ({backend})", total=len(sweep.tasks),
                             completed=len(sweep.tasks) - len(todo)) if progress is not None else None

    def on_done(tid: str, rows: list) -> None:
        pt, s = by_id[tid]
        store.write_part(pt, s, rows)
        if progress is not None:
            progress.advance(task)

    t0 = time.perf_counter()
    if todo:
        if backend == "ray":
            run_ray(calls, on_done, workers, address)
        else:
            run_local(calls, on_done, workers)
    wall = time.perf_counter() - t0
    df = store.consolidate(sweep)
    x, heat = report_axes(sweep, df)
    crossovers: list[Crossover] = []
    if x is not None and len(df):
        others = [a for a in sweep.axes if a != x]
        crossovers = find_crossovers(df, x, sweep.report.metric, others)
    from rkvsim.planning.sweep_report import render
    text = render(sweep.name, df, list(sweep.axes), x, sweep.report.metric, heat, crossovers)
    report = Path(out) / "report.html"
    write_text(report, text)
    return SweepResult(df, len(todo), len(sweep.tasks) - len(todo), wall, crossovers, report)
