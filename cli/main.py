"""`rkvsim` and `rkvprof`: two thin parsers, each mounting the commands that the packages own.

Every package keeps its commands' flags and handlers in its own `cli.py` (`add_parser(sub)`,
each subcommand with `set_defaults(func=...)`); nothing here knows a flag. Handlers import what
they need lazily, so `rkvsim run` never loads scikit-learn, torch or Ray.
"""
from __future__ import annotations

import argparse
import sys

from rkvsim.calibration import cli as calibration_cli
from rkvsim.planning import cli as planning_cli
from rkvsim.profiler import cli as profiler_cli
from rkvsim.simulator import cli as simulator_cli
from rkvsim.validation import cli as validation_cli

RKVSIM_DOC = "Forecast serving throughput and latency per KV-cache compression method."
RKVPROF_DOC = "Profile kernels, dense operators or a real engine on this device; fit and install profiles."


def _dispatch(p: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = p.parse_args(argv)
    return args.func(args)


def rkvsim_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rkvsim", description=RKVSIM_DOC)
    sub = p.add_subparsers(dest="command", required=True)
    simulator_cli.add_parser(sub)      # run
    calibration_cli.add_parser(sub)    # negatives, lengths
    planning_cli.add_parser(sub)       # sweep, plan
    validation_cli.add_parser(sub)     # validate, validate-serving
    return p


def rkvprof_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rkvprof", description=RKVPROF_DOC)
    sub = p.add_subparsers(dest="command", required=True)
    profiler_cli.add_parser(sub)                # collect, engine build, import-vidur
    calibration_cli.add_rkvprof_parser(sub)     # fit, install
    return p


def rkvsim(argv: list[str] | None = None) -> int:
    return _dispatch(rkvsim_parser(), argv)


def rkvprof(argv: list[str] | None = None) -> int:
    return _dispatch(rkvprof_parser(), argv)


if __name__ == "__main__":
    sys.exit(rkvsim())
