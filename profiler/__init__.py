"""rkvsim.profiler"""
