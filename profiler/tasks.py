"""A unit of profiling work: one table row, known by its key before it is measured."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rkvsim.profiler.schema import SCHEMA_VERSION, TableSchema, row_key
from rkvsim.profiler.timing import TimingPolicy, measure


@dataclass
class Context:
    """Where and how every task of a collection runs."""
    device: str            # torch device string
    dtype: torch.dtype
    policy: TimingPolicy

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=self.dtype, device=self.device)


@dataclass
class Task:
    table: TableSchema
    row: dict                          # every column except the measured ones
    run: Callable[[], dict]            # measures; returns the remaining columns
    label: str

    @property
    def key(self) -> tuple:
        return row_key(self.table, self.row)

    def execute(self) -> dict:
        measured = self.run()
        return {"schema_version": SCHEMA_VERSION, **self.row, **measured}


def timed(fn: Callable[[], object], ctx: Context) -> dict:
    """Measured columns for a callable that needs nothing else recorded."""
    return measure(fn, ctx.policy, ctx.device).as_row()
