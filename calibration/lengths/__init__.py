"""rkvsim.calibration.lengths."""
