"""rkvprof's own commands: `collect` (kernels and dense ops on this device, or a real engine's
steps with --engine), `engine build` and `import-vidur`. Mounted by rkvsim.cli.main."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rkvsim.models import parse_method, resolve_model, specs

from rkvsim.profiler import engine_cli
from rkvsim.models.files import UnreadableFile
from rkvsim.profiler.device import ProfilerError

# Every method that has a kernel (its spec names one), at its default setting.
DEFAULT_METHODS = ",".join(k for k, s in specs().items() if s.kernel)


def one_line_errors(fn, also: tuple = ()):
    """A ProfilerError (or one of `also`) becomes one line on stderr and exit 2: a refusal the user
    can act on, not a traceback. Anything else is a bug and keeps its traceback."""
    def run(args) -> int:
        try:
            return fn(args)
        except (ProfilerError, UnreadableFile, *also) as e:
            print(f"rkvprof: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    return run


def add_parser(sub) -> None:
    from rkvsim.profiler.collect import PARTS
    from rkvsim.profiler.grids import GRIDS

    c = sub.add_parser("collect", help="time attention per method, compression steps and dense ops")
    c.add_argument("--model", required=True, help="model name or hub id (rkvsim.models)")
    c.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated method labels (default: {DEFAULT_METHODS}; e.g. kivi-2, h2o-1024)")
    from rkvsim.profiler.engine_collect import ENGINE_GRIDS
    c.add_argument("--grid", default="quick", choices=sorted(set(GRIDS) | set(ENGINE_GRIDS)),
                   help="kernel grids: " + ", ".join(GRIDS) + "; engine grids (--engine): " + ", ".join(ENGINE_GRIDS))
    c.add_argument("--out", required=True, type=Path, help="profile folder (resumed if it exists)")
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    c.add_argument("--gpu", default=None,
                   help="hardware the profile is for; must match the detected device (cpu: only 'cpu')")
    c.add_argument("--attention-heads", type=int, default=None,
                   help="query heads to time attention with (default: the model's; cut on CPU for big models)")
    c.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    c.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    engine_cli.add_collect_args(c)   # --engine llamacpp --kv ...
    c.set_defaults(func=one_line_errors(_collect))
    engine_cli.add_parser(sub)       # rkvprof engine build llamacpp
    sub.choices["engine"].set_defaults(func=one_line_errors(engine_cli.run))

    i = sub.add_parser("import-vidur", help="convert Vidur-format profile CSVs into rkvprof tables")
    i.add_argument("src", type=Path, help="folder holding <model>-{fp16,kivi,gear,h2o,stream,hf}/ folders, or "
                                           "Vidur's repository layout (compute/<gpu>/<org>/<model>/mlp.csv, ...)")
    i.add_argument("--gpu", required=True, help="hardware the profiles were measured on, e.g. a6000, a100, h100")
    i.add_argument("--model", default=None, help="model the profiles are for (required for the per-method "
                                                 "layout; in the repository layout, a comma-separated subset)")
    i.add_argument("--commit", default=None, help="repository layout: the Vidur commit the files come from (provenance)")
    i.add_argument("--out", required=True, type=Path)
    i.set_defaults(func=one_line_errors(_import))


def _methods(text: str) -> list:
    methods, seen = [], set()
    for part in text.split(","):
        if part.strip():
            m = parse_method(part)
            if m.label not in seen:
                seen.add(m.label)
                methods.append(m)
    if not methods:
        raise ValueError("--methods is empty")
    return methods


def _collect(args) -> int:
    if engine_cli.wants_engine(args):
        return engine_cli.run(args)
    from rkvsim.profiler.collect import PARTS, CollectConfig, collect, print_summary
    from rkvsim.profiler.grids import get_grid

    parts = tuple(s.strip() for s in args.parts.split(",") if s.strip())
    bad = [s for s in parts if s not in PARTS]
    if bad:
        raise ProfilerError(f"unknown --parts {bad}; known: {', '.join(PARTS)}")
    try:
        model, methods, grid = resolve_model(args.model), _methods(args.methods), get_grid(args.grid)
    except (KeyError, ValueError) as e:
        raise ProfilerError(str(e.args[0]) if e.args else str(e)) from None
    cfg = CollectConfig(model=model, methods=methods, grid=grid, out=args.out, device=args.device, gpu=args.gpu, attention_q_heads=args.attention_heads,
                        threads=args.threads, parts=parts,
                        progress=sys.stderr.isatty() if args.progress is None else args.progress)
    print_summary(collect(cfg))
    return 0


def _import(args) -> int:
    from rkvsim.profiler.vidur_import import import_vidur
    from rkvsim.profiler.vidur_repo import import_vidur_repo, is_repo_layout

    if is_repo_layout(args.src):
        models = [m for m in (args.model or "").split(",") if m.strip()] or None
        res = import_vidur_repo(args.src, args.gpu, args.out, models, args.commit)
    elif args.model is None:
        raise ProfilerError("--model is required for a per-method layout (<model>-<method>/ folders); "
                            "e.g. --model meta-llama/Llama-2-7b-hf")
    else:
        res = import_vidur(args.src, args.gpu, args.model, args.out)
    counts = ", ".join(f"{k} {v}" for k, v in res.rows.items())
    print(f"rkvprof: imported {len(res.meta['files'])} files from {res.meta['source_path']} into {res.out}: {counts}")
    return 0
