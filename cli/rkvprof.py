"""`python -m rkvsim.cli.rkvprof ARGS` is `rkvprof ARGS`."""
import sys

from rkvsim.cli.main import rkvprof

if __name__ == "__main__":
    sys.exit(rkvprof())
