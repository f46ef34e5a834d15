"""Simulator speed and memory: N ShareGPT-length requests on one LLaMA-2-7B / A6000 replica.

    python bench/bench_sim.py --requests 1000000 --method fp16

Prints simulated requests per wall second, engine events per second and peak RSS.
Goal (issue 2): 1,000,000 requests in <= 60 s on one core within 2 GB.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--method", default="fp16")
    ap.add_argument("--rate", type=float, default=12.0, help="Poisson arrivals per second")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default="vllm-v1", help="scheduler.policy (vllm-v1, vllm-v0, lmdeploy)")
    ap.add_argument("--no-prefix-caching", action="store_true", help="vllm-v1 without its prefix cache")
    args = ap.parse_args()

    from rkvsim.simulator.config import Scenario
    from rkvsim.simulator.pipeline import run_scenario
    from rkvsim.simulator.simulation import build_workload

    scn = Scenario.model_validate({
        "name": "bench", "model": "llama-2-7b", "hardware": "a6000", "methods": [args.method],
        "scheduler": {"policy": args.policy, "max_batch_size": args.max_batch, "max_batched_tokens": 8192,
                      **({"enable_prefix_caching": False} if args.no_prefix_caching else {})},
        "workload": {"num_requests": args.requests, "arrival": {"process": "poisson", "rate": args.rate},
                     "lengths": {"source": "sharegpt", "max_prompt": 2048, "max_output": 2048}},
    })
    t0 = time.perf_counter()
    wl = build_workload(scn, args.seed, ".")
    t1 = time.perf_counter()
    (run,) = run_scenario(scn, args.seed, workload=wl, inflation=None).runs
    t2 = time.perf_counter()
    steps = sum(len(r.steps) for r in run.replicas)
    events = steps + args.requests  # one engine-iteration event per step, one arrival event per request
    done = int(np.isfinite(run.log.finish).sum())
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sim_s = float(np.nanmax(run.log.finish))
    print(f"policy            {args.policy}{' (no prefix caching)' if args.no_prefix_caching else ''}")
    print(f"requests          {args.requests:,} ({done:,} completed, {int(run.log.rejected.sum()):,} rejected)")
    print(f"workload build    {t1 - t0:.2f} s")
    print(f"simulation wall   {t2 - t1:.2f} s  ({sim_s:,.0f} simulated s, {steps:,} engine steps)")
    print(f"requests / wall s {args.requests / (t2 - t1):,.0f}")
    print(f"events / wall s   {events / (t2 - t1):,.0f}")
    print(f"peak RSS          {rss_mb:,.0f} MB")


if __name__ == "__main__":
    main()
