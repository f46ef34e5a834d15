"""rkvsim.calibration.quality."""
