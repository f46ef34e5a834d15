"""Wall time of an rkvprof collection (default: the quick grid, SmolLM2-135M, all six methods).

    python bench/bench_profile.py [--model smollm2-135m] [--grid quick] [--threads N] [--keep DIR]

Runs into a temporary folder (or --keep DIR) and prints wall time, rows and rows/s per table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    from rkvsim.profiler.cli import DEFAULT_METHODS
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--grid", default="quick")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep", type=Path, default=None, help="write the profile here instead of a temp dir")
    args = p.parse_args(argv)

    import torch

    from rkvsim.models import parse_method, resolve_model
    from rkvsim.profiler.collect import CollectConfig, collect
    from rkvsim.profiler.grids import get_grid

    with tempfile.TemporaryDirectory(prefix="rkvprof-bench-") as tmp:
        out = args.keep or Path(tmp) / "profile"
        cfg = CollectConfig(model=resolve_model(args.model), methods=[parse_method(m) for m in args.methods.split(",")],
                            grid=get_grid(args.grid), out=out, device="cpu", threads=args.threads)
        t0 = time.perf_counter()
        res = collect(cfg)
        wall = time.perf_counter() - t0
        total = sum(res.rows.values())
        print(f"bench_profile: model={args.model} grid={args.grid} methods={args.methods} "
              f"torch_threads={torch.get_num_threads()} cpu_count={os.cpu_count()} "
              f"loadavg_1m={os.getloadavg()[0]:.2f}")
        for name, n in res.rows.items():
            print(f"  {name:12s} {n:5d} rows")
        print(f"  total        {total:5d} rows in {wall:.1f} s wall = {total / wall:.2f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
