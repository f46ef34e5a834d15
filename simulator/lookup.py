"""Pure functions of a small non-negative integer (a context length, a batch size) that the
simulator asks for every step, tabulated: one index instead of a formula or a Python call; and
the reductions the step and the run planner ask for several times each, without numpy's wrappers."""
from __future__ import annotations

import numpy as np


class Tabulated:
    """make(0..n-1)[at]: tabulated once, and again (doubling n) when `at` reaches past the table.
    make takes the int64 array 0..n-1 and returns the values element by element, so the table's
    size never changes a value."""

    def __init__(self, make, dtype=np.float64, min_size: int = 64):
        self.make, self.dtype, self.min_size = make, dtype, min_size
        self.tab = np.empty(0, dtype)

    def __call__(self, at):
        try:
            return self.tab[at]
        except IndexError:
            n = max(self.min_size, 1 << int(np.max(at)).bit_length())
            self.tab = np.asarray(self.make(np.arange(n, dtype=np.int64)), self.dtype)
            return self.tab[at]


def by_size(cost) -> Tabulated:
    """cost(n) for batch sizes n >= 1 (a pure function of n), computed once per size for the
    model's life instead of once per run; size 0 is never costed (a step has a batch)."""
    return Tabulated(lambda sizes: [np.nan] + [float(cost(n)) for n in range(1, len(sizes))])


# The ufuncs' reductions themselves (ndarray.sum/min/max call them through a Python wrapper).
array_sum, array_min, array_max = np.add.reduce, np.minimum.reduce, np.maximum.reduce


def int_sum(x: np.ndarray):
    """x.sum() of a 1-d array as a Python number: a numpy reduction costs about 0.8 us whatever
    the size, a list about 10 ns an element (batches are mostly small). Only integers are summed
    as a list (exact in any order; floats would round differently from numpy's pairwise sum)."""
    return sum(x.tolist()) if len(x) <= 64 and x.dtype.kind in "iub" else array_sum(x).item()
