"""Module names that artifacts pickled before the layout change (rkvsim 44398e1 and earlier) refer
to: a step fit (`rkvprof fit`) and a length predictor (`rkvsim lengths train`) saved then name
`rkvsim.calibration.step_fit.StepFit` and the like. Loading maps those names to where the classes
live now, so such artifacts keep working instead of asking for a refit."""
from __future__ import annotations

import importlib
import io
import pickle
import sys
from contextlib import contextmanager

RENAMED = {
    "rkvsim.calibration.step_fit": "rkvsim.calibration.steps.fit",
    "rkvsim.calibration.step_features": "rkvsim.calibration.steps.features",
    "rkvsim.calibration.step_compile": "rkvsim.calibration.steps.compile",
    "rkvsim.calibration.length_predictor": "rkvsim.calibration.lengths.predictor",
    "rkvsim.calibration.length_features": "rkvsim.calibration.lengths.features",
    "rkvsim.calibration.length_metrics": "rkvsim.calibration.lengths.metrics",
    "rkvsim.calibration.length_data": "rkvsim.calibration.lengths.data",
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return super().find_class(RENAMED.get(module, module), name)


def loads(data: bytes):
    """pickle.loads that reads the old module names too."""
    return _Unpickler(io.BytesIO(data)).load()


@contextmanager
def old_module_names(*old: str):
    """The old names importable while a loader that keeps its own unpickler (joblib) runs."""
    added = []
    try:
        for name in old:
            if name not in sys.modules:
                sys.modules[name] = importlib.import_module(RENAMED[name])
                added.append(name)
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)
