"""Per-method output lengths: the workload gives each request's uncompressed length; under a
compressed method it is scaled by a ratio drawn from the length-inflation model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rkvsim.models import Method

from rkvsim.simulator.config import Scenario, ScenarioError


def shipped_dataset() -> Path:
    from rkvsim.calibration.lengths.inflation import SHIPPED_DATA
    return SHIPPED_DATA


def load_inflation(scn: Scenario, base_dir: Path):
    """The fitted inflation model for a scenario, or None when verbosity is off."""
    v = scn.verbosity
    if v.data is None:
        return None
    from rkvsim.calibration.lengths.inflation import fit_inflation, load_dataset
    path = shipped_dataset() if v.data == "shipped" else Path(v.data)
    if not path.is_absolute() and v.data != "shipped":
        path = (base_dir / path) if (base_dir / path).exists() else path
    if not path.is_dir():
        raise ScenarioError(f"verbosity.data: {path} is not a generation dataset folder; use 'shipped' or a path "
                            "written by python -m rkvsim.calibration.generation.collect")
    model = fit_inflation(load_dataset(path), seed=scn.seed)
    n = model.info["n_prompts"]
    if n < v.min_prompts:
        raise ScenarioError(f"verbosity.data: {path} has {n} prompts with paired generations, fewer than "
                            f"verbosity.min_prompts={v.min_prompts}; collect more (python -m rkvsim.calibration.generation.collect resumes) or lower it")
    return model


def method_ratios(method: Method, fp16_length: np.ndarray, inflation) -> np.ndarray:
    """Length ratio of `method` over FP16 per request, at its FP16 length (the inflation
    model's quantile map, deterministic: see calibration.lengths.inflation); 1 without a model or
    for FP16."""
    label = inflation.for_method(method) if inflation is not None else None
    if label is None:
        return np.ones(len(fp16_length))
    return inflation.ratios(label, fp16_length)


def method_outputs(method: Method, prompt: np.ndarray, output: np.ndarray, inflation,
                   max_len: int) -> np.ndarray:
    """Output lengths under `method`: each request's uncompressed length times its ratio."""
    if inflation is None or inflation.for_method(method) is None:
        return output
    inflated = np.rint(output * method_ratios(method, output, inflation)).astype(np.int64)
    # A longer answer still ends at the context window.
    return np.clip(inflated, 1, np.maximum(max_len - prompt, 1))
