"""rkvsim.calibration.generation."""
