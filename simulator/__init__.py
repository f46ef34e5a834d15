"""rkvsim.simulator"""
