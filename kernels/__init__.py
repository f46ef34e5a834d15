"""rkvsim.kernels"""
