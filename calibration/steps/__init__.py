"""rkvsim.calibration.steps."""
