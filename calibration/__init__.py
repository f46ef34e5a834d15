"""rkvsim.calibration"""
