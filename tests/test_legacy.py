"""Artifacts pickled before the layout change (module names such as rkvsim.calibration.step_fit)
still load."""
import pickle

from rkvsim.calibration import legacy
from rkvsim.calibration.steps.fit import FitError


def test_a_pickle_naming_an_old_module_loads():
    old = pickle.dumps(FitError("x"), protocol=0).replace(b"rkvsim.calibration.steps.fit",
                                                          b"rkvsim.calibration.step_fit")
    assert b"calibration.step_fit" in old
    got = legacy.loads(old)
    assert isinstance(got, FitError) and str(got) == "x"


def test_old_names_are_importable_only_while_loading():
    import sys
    with legacy.old_module_names("rkvsim.calibration.length_metrics"):
        assert sys.modules["rkvsim.calibration.length_metrics"].__name__ == "rkvsim.calibration.lengths.metrics"
    assert "rkvsim.calibration.length_metrics" not in sys.modules
