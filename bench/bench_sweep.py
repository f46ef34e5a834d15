"""Sweep throughput: N points of R requests each (one method per point), on the `local` and `ray`
backends, through the same code path as `rkvsim sweep`.

    python bench/bench_sweep.py --points 1000 --requests 1000            # both backends
    python bench/bench_sweep.py --points 100 --backends local,ray        # a quicker estimate

The points are a Latin hypercube over arrival rate, max batch size, prompt length and method
(ShareGPT-like lognormal lengths, LLaMA-2-7B on one A6000). Prints wall time, points/s and,
when fewer than 1000 points ran, the 1000-point time extrapolated linearly (said as such).
Both backends' rows are compared: they must be identical. Goal (issue 8): 1,000 x 1,000 in
<= 10 minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

BASE = {
    "name": "bench_sweep", "seed": 0, "model": "llama-2-7b", "hardware": "a6000", "methods": ["fp16"],
    "scheduler": {"max_batch_size": 128, "max_batched_tokens": 8192},
    "workload": {"num_requests": 1000, "arrival": {"process": "poisson", "rate": 4.0},
                 "prompt": {"dist": "lognormal", "median": 256, "sigma": 1.0, "min": 4, "max": 2048},
                 "output": {"dist": "lognormal", "median": 200, "sigma": 0.8, "min": 4, "max": 1024}},
}


def write_sweep(folder: Path, points: int, requests: int, step_by_step: bool = False) -> Path:
    base = json.loads(json.dumps(BASE))
    base["workload"]["num_requests"] = requests
    base["step_by_step"] = step_by_step
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "bench", "base": "base.yaml", "seeds": 1, "design": "lhs", "samples": points, "lhs_seed": 0,
            "axes": {"workload.arrival.rate": {"low": 0.5, "high": 8.0, "log": True},
                     "scheduler.max_batch_size": {"low": 16, "high": 256, "log": True, "integer": True},
                     "workload.prompt.median": {"low": 64, "high": 1024, "log": True},
                     "methods": ["fp16", "kivi-4", "kivi-2", "gear-4", "streamingllm-512", "h2o-512"]},
            "report": {"x": "workload.arrival.rate"}}
    f = folder / "sweep.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--backends", default="local,ray")
    ap.add_argument("--workers", type=int, help="default: this machine's cores")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--cpu-sample", type=int, default=0, help="also time this many points in-process (CPU s)")
    ap.add_argument("--step-by-step", action="store_true", help="no event skipping (the reference mode)")
    ap.add_argument("--compare", action="store_true",
                    help="also run the same points step by step on the local backend: both wall times, the ratio, "
                         "and whether the rows are identical")
    args = ap.parse_args()

    import pandas as pd

    from rkvsim.planning.backends import default_workers
    from rkvsim.planning.spec import load_sweep
    from rkvsim.planning.sweep import run_sweep

    workers = args.workers or default_workers()
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep."))
    try:
        sweep = load_sweep(write_sweep(tmp, args.points, args.requests, args.step_by_step))
        out, rows = {}, {}
        for backend in [b for b in args.backends.split(",") if b]:
            t0 = time.perf_counter()
            res = run_sweep(sweep, tmp / f"out-{backend}", backend=backend, workers=workers)
            wall = time.perf_counter() - t0   # Ray start-up and the report included
            rows[backend] = res.rows
            out[backend] = {"points": args.points, "requests_per_point": args.requests, "workers": workers,
                            "wall_s": round(wall, 1), "tasks_s": round(res.wall_s, 1),
                            "points_per_s": round(args.points / wall, 2),
                            "extrapolated_1000_points_s": None if args.points >= 1000 else round(wall * 1000 / args.points, 0)}
            ext = out[backend]["extrapolated_1000_points_s"]
            print(f"{backend}: {args.points} points x {args.requests} requests in {wall:.1f} s wall "
                  f"({args.points / wall:.2f} points/s, {workers} workers)"
                  + (f"; 1000 points extrapolated linearly: {ext:.0f} s ({ext / 60:.1f} min)" if ext else ""))
        if args.cpu_sample:
            # CPU seconds per point, measured in-process on the first points: what the sweep would
            # take on idle cores (wall time above includes whatever else the machine is running).
            from rkvsim.planning.tasks import run_task
            t0 = time.process_time()
            for pt, s in sweep.tasks[:args.cpu_sample]:
                run_task(sweep.base, sweep.base_dir, pt.overrides, s, pt.index, pt.key)
            per = (time.process_time() - t0) / min(args.cpu_sample, len(sweep.tasks))
            idle = per * 1000 / workers
            out["cpu"] = {"sampled_points": min(args.cpu_sample, len(sweep.tasks)), "cpu_s_per_point": round(per, 3),
                          "idle_estimate_1000_points_s": round(idle, 0)}
            print(f"CPU per point (first {out['cpu']['sampled_points']} points, in-process): {per:.2f} s; "
                  f"1000 points on {workers} idle cores: about {idle:.0f} s ({idle / 60:.1f} min)")
        if len(rows) == 2:
            a, b = rows.values()
            pd.testing.assert_frame_equal(a, b)
            print("local and ray rows identical:", len(a), "rows")
        if args.compare and not args.step_by_step:
            ref = load_sweep(write_sweep(tmp, args.points, args.requests, step_by_step=True))
            t0 = time.perf_counter()
            res = run_sweep(ref, tmp / "out-step", backend="local", workers=workers)
            step_wall = time.perf_counter() - t0
            skip_wall = out["local"]["wall_s"] if "local" in out else None
            pd.testing.assert_frame_equal(res.rows, rows.get("local", next(iter(rows.values()))))
            out["step_by_step"] = {"wall_s": round(step_wall, 1), "ratio": round(step_wall / skip_wall, 2) if skip_wall else None}
            print(f"step by step (local): {step_wall:.1f} s wall"
                  + (f"; skipping is x{step_wall / skip_wall:.2f} faster" if skip_wall else "")
                  + f"; rows identical: {len(res.rows)} rows")
        if args.json:
            Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), **out}, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
