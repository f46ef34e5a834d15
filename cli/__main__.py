"""`python -m rkvsim.cli ARGS` is `rkvsim ARGS`."""
import sys

from rkvsim.cli.main import rkvsim

sys.exit(rkvsim())
