"""What-if questions on top of the simulator: sweeps over scenario fields and capacity plans."""
